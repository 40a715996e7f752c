"""The world's words, for keye-nano's tokenizer to hold whole.

keye-nano's byte-level BPE is trained on general English (``keye.processing.nano_corpus``), so on its
own it cuts the world's closed vocabulary into pieces: "triangle" came out as ``Ġtri ang le`` and
"magenta" as ``m ag ent a``, and "middle" shared its ``le`` with "triangle"; a one-word answer was up
to four tokens that all had to come out right. Real Keye tokenizers (Qwen's 151k vocabulary) hold such
words whole. ``world_words`` lists the words that the world's texts use often, plus every word answer;
``keye.processing.build_nano_tokenizer`` makes them whole tokens. Frame listings became 40% shorter and
reference chains 26%, so steps and think answers are cheaper; held-out accuracy did not change
(model card).

    keye nano-vocab            # rebuild keye/models/assets/keye-nano-tokenizer
    keye nano-vocab --check    # exit 1 if the committed tokenizer differs from a rebuild
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Iterator

from tokenizers import pre_tokenizers

from keye.data.modes import DIRECT_ANALYSIS, THINK_ANALYSIS
from keye.data.world.generate import (WorldConfig, caption_row, dense_questions, dense_rng, frames_row,
                                      make_clip, questions_for_clip, qa_row)
from keye.data.world.questions import QUESTION_KINDS
from keye.data.world.scene import SceneConfig

# Tags the processor adds as special / added tokens: never part of a BPE word.
_TAGS = re.compile(r"<\|?/?[a-z_]+\|?>")


def world_texts(config: WorldConfig | None = None, clips: int = 200) -> Iterator[str]:
    """Every text a model of the world reads or writes, for ``clips`` train clips: role names, questions,
    answers, chains, hints, frame listings, captions and the auto-think analyses."""
    config = config or WorldConfig()
    yield from (THINK_ANALYSIS, DIRECT_ANALYSIS)
    for i in range(clips):
        clip_id = f"train-{i:05d}"
        clip, rng = make_clip(config, "train", clip_id)
        single, zooms = questions_for_clip(config, clip, rng)
        rows = [qa_row(clip, qa, clip_id) for qa in single + zooms]
        rows += [frames_row(clip), caption_row(clip)]
        for row in rows:
            for message in row["messages"]:
                yield from (message["role"], message["content"])  # the chat template writes both
        for qa in [*single, *zooms, *dense_questions(config, clip, dense_rng(config, clip_id))]:
            yield from (qa.question, qa.answer, qa.cot, *qa.hints)


def word_counts(texts: Iterator[str]) -> Counter:
    """Byte-level pre-tokens (GPT-2 split: ``Ġword`` after a space, ``word`` at a message's start) of
    the texts, with special tags cut out, counted."""
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts: Counter = Counter()
    for text in texts:
        for piece in _TAGS.split(text):
            counts.update(word for word, _ in split.pre_tokenize_str(piece))
    return counts


def domain_words(counts: Counter, min_count: int = 20) -> list[str]:
    """Letter words seen at least ``min_count`` times, most frequent first (ties by spelling, so the
    build is deterministic)."""
    frequent = [w for w, c in counts.items() if c >= min_count and w.lstrip("Ġ").isalpha()]
    return sorted(frequent, key=lambda w: (-counts[w], w))


def answer_words() -> list[str]:
    """Every word answer of every question kind as the assistant turn starts it (no leading space),
    however rare: exact match then needs one right token."""
    answers = {a for kind in QUESTION_KINDS.values() for a in kind.answer_space(SceneConfig())}
    return sorted(a for a in answers if a.isalpha())


def world_words(clips: int = 200, min_count: int = 20) -> list[str]:
    """Byte-level words (``Ġ`` = after a space) for the nano tokenizer to hold whole, in merge order."""
    frequent = domain_words(word_counts(world_texts(clips=clips)), min_count)
    return frequent + [w for w in answer_words() if w not in frequent]


def nano_tokenizer_is_current(words: list[str] | None = None) -> bool:
    """Whether the committed keye-nano tokenizer equals a rebuild holding ``words`` (default: the world's) whole."""
    from transformers import AutoTokenizer

    from keye.processing import NANO_TOKENIZER_DIR, build_nano_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build_nano_tokenizer(tmp, whole_words=words or world_words()).get_vocab()
    return rebuilt == AutoTokenizer.from_pretrained(str(NANO_TOKENIZER_DIR)).get_vocab()


def rebuild_nano_tokenizer() -> list[str]:
    """Write keye-nano's tokenizer with the world's words whole into the package; returns the words."""
    from keye.processing import NANO_TOKENIZER_DIR, build_nano_tokenizer

    words = world_words()
    build_nano_tokenizer(NANO_TOKENIZER_DIR, whole_words=words)
    return words
