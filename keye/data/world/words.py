"""The scored words of the world's frame listings and chains: which type a word is, how a tokenized turn's
labels group into words, and what the frame before already says of each listing word. Shared by the
perception probes (``keye.eval.perception``) and the next-token stages (``keye.train.stages.lm``)."""

from __future__ import annotations

import torch

from keye.data.world.scene import COLORS, COLUMNS, ROWS, SHAPES


def word_type(word: str) -> str | None:
    """The scored type of a listing word, or None for what the format gives away."""
    if word in COLORS:
        return "colour"
    if word in SHAPES:
        return "shape"
    if word in ROWS or word in COLUMNS:
        return "position"
    if word == "nothing":
        return "nothing"
    return None


def label_words(tokenizer, labels_L: torch.Tensor) -> list[list[int]]:
    """Positions of the labelled tokens grouped into words (a token starting with a space, or after a
    punctuation token, begins a word)."""
    words: list[list[int]] = []
    for p in (labels_L != -100).nonzero().flatten().tolist():
        piece = tokenizer.convert_ids_to_tokens(int(labels_L[p]))
        starts = piece.startswith("Ġ") or not words or not piece.isalpha()
        if starts:
            words.append([p])
        else:
            words[-1].append(p)
    return words


def scored_words(tokenizer, labels_L: torch.Tensor) -> list[tuple[list[int], str]]:
    """The labelled words that ``word_type`` scores, in order: (their token positions, their type)."""
    words = ((positions, word_type(tokenizer.decode(labels_L[positions]).strip()))
             for positions in label_words(tokenizer, labels_L))
    return [(positions, kind) for positions, kind in words if kind is not None]


MENTIONS = ("first", "same", "changed")


def listing_mentions(texts: list[tuple[float, str]]) -> list[str | None]:
    """For each content word of the listing of ``frame_texts`` (per listed object its colour, shape, row and
    column word; a frame's "nothing"), in order: "first" when the object is not listed in the frame before,
    "same" when the word is that object's word there too, "changed" when it is not (a move to another cell);
    None for "nothing". Most words are "same", and a decoder can write them without looking at the frame."""
    out: list[str | None] = []
    before: dict[str, list[str]] = {}  # "red circle" -> its words in the frame before (names are unique in a frame)
    for _, text in texts:
        now = {} if text == "nothing" else {" ".join(w[:2]): w for w in (entry.split() for entry in text.split(", "))}
        for name, words in now.items():
            earlier = before.get(name)
            out += ["first" if earlier is None else "same" if earlier[i] == word else "changed"
                    for i, word in enumerate(words)]
        out += [] if now else [None]
        before = now
    return out
