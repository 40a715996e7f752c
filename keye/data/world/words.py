"""The scored words of the world's frame listings and chains: which type a word is, how a tokenized turn's
labels group into words, and what the frame before already says of each listing word. Shared by the
perception probes (``keye.eval.perception``) and the next-token stages (``keye.train.stages.lm``); and the
placements a chain states, checked against a frame listing by the RL stage's placement reward and by the world
evals."""

from __future__ import annotations

import re

import torch

from keye.data.world.scene import BACKGROUNDS, COLORS, COLUMNS, ROWS, SHAPES


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
    if word in BACKGROUNDS:
        return "background"
    return None


def label_words(tokenizer, labels_L: torch.Tensor) -> list[list[int]]:
    """Positions of the labelled tokens grouped into words (a token starting with a space, a punctuation
    token, or a token after one begins a word: "navy/gray" is three)."""
    words: list[list[int]] = []
    previous = ""
    for p in (labels_L != -100).nonzero().flatten().tolist():
        piece = tokenizer.convert_ids_to_tokens(int(labels_L[p]))
        if piece.startswith("Ġ") or not words or not piece.isalpha() or not previous.isalpha():
            words.append([p])
        else:
            words[-1].append(p)
        previous = piece.removeprefix("Ġ")
    return words


_TWO_WORD_NAMES = {tuple(name.split()) for name in BACKGROUNDS if " " in name}  # ("dark", "green")


def scored_words(tokenizer, labels_L: torch.Tensor) -> list[tuple[list[int], str]]:
    """The labelled words that ``word_type`` scores, in order: (their token positions, their type). A
    background named in two words ("dark green") is one word."""
    words = [(positions, tokenizer.decode(labels_L[positions]).strip())
             for positions in label_words(tokenizer, labels_L)]
    out, i = [], 0
    while i < len(words):
        if i + 1 < len(words) and (words[i][1], words[i + 1][1]) in _TWO_WORD_NAMES:
            positions, text, i = words[i][0] + words[i + 1][0], f"{words[i][1]} {words[i + 1][1]}", i + 2
        else:
            (positions, text), i = words[i], i + 1
        if (kind := word_type(text)) is not None:
            out.append((positions, kind))
    return out


MENTIONS = ("first", "same", "changed")


def listing_mentions(texts: list[tuple[float, str]], backgrounds: list[str] | None = None) -> list[str | None]:
    """For each content word of the listing of ``frame_texts`` (per listed object its colour, shape, row and
    column word; a frame's "nothing"), in order: "first" when the object is not listed in the frame before,
    "same" when the word is that object's word there too, "changed" when it is not (a move to another cell);
    None for "nothing". Most words are "same", and a decoder can write them without looking at the frame.
    With ``backgrounds`` (``frame_backgrounds``: one per frame, listed first) each frame's background colours
    come first: "first" in the first frame and after a cut, "same" otherwise."""
    out: list[str | None] = []
    before: dict[str, list[str]] = {}  # "red circle" -> its words in the frame before (names are unique in a frame)
    for f, (_, text) in enumerate(texts):
        if backgrounds is not None:
            colours = backgrounds[f].split("/")
            out += ["same" if f and backgrounds[f] == backgrounds[f - 1] else "first"] * len(colours)
        now = {} if text == "nothing" else {" ".join(w[:2]): w for w in (entry.split() for entry in text.split(", "))}
        for name, words in now.items():
            earlier = before.get(name)
            out += ["first" if earlier is None else "same" if earlier[i] == word else "changed"
                    for i, word in enumerate(words)]
        out += [] if now else [None]
        before = now
    return out


# A chain's placement claims, in the words the world's chains and frame listings use: "the red circle is in the
# top left at 1.0s and further right, in the top centre, at 3.0s", "At 0.5s the blue square is in the middle
# centre". Within a sentence, a cell phrase belongs to the last object named before it, and to the first time
# after it (up to the next cell), else the last time before it.
_CELL = re.compile(r"\b(top|middle|bottom) (left|centre|right)\b")
_OBJECT = re.compile(r"\b([a-z]+) (circle|square|triangle)\b")
_TIME = re.compile(r"\b(\d+\.\d)s\b")
_SENTENCE = re.compile(r"[^.]*(?:\.(?=\d)[^.]*)*(?:\.|$)")  # a period between digits does not end one


def placement_claims(text: str) -> list[tuple[str, str, str]]:
    """(object, seconds as written, cell) for every placement a chain states."""
    claims = []
    for sentence in _SENTENCE.findall(text.lower()):
        cells = list(_CELL.finditer(sentence))
        for i, cell in enumerate(cells):
            objects = [m for m in _OBJECT.finditer(sentence, 0, cell.start()) if m.group(1) not in ("the", "a", "an")]
            stop = cells[i + 1].start() if i + 1 < len(cells) else len(sentence)
            after = list(_TIME.finditer(sentence, cell.end(), stop))
            before = list(_TIME.finditer(sentence, 0, cell.start()))
            when = after[0] if after else (before[-1] if before else None)
            if objects and when is not None:
                claims.append((objects[-1].group(0), when.group(1), cell.group(0)))
    return claims


def confirmed_claims(text: str, listing: list) -> tuple[int, int]:
    """(placement claims in ``text``, how many of them ``listing`` confirms): [seconds, "red circle top left,
    ..."] per frame, as the world's frames rows hold it."""
    at = {f"{float(t):.1f}": objects for t, objects in listing}
    claims = placement_claims(text)
    return len(claims), sum(when in at and f"{obj} {cell}" in at[when] for obj, when, cell in claims)
