"""Reading answers out of generations: reasoning apart from the answer, option letters, normalisation.

Keye-VL outputs come in three shapes (Keye-VL-1.5 report sec. 4): non-thinking (the bare answer),
thinking (``<think>...</think>`` then the answer) and auto-think (``<analysis>...</analysis>``
saying whether to think, then either). RL-tuned checkpoints may also wrap the answer in
``<answer>...</answer>`` or ``\\boxed{...}``. ``keye.data.modes.extract_answer`` removes the
reasoning blocks and unwraps ``<answer>``; this module adds ``\\boxed{}``, multiple-choice letters
and option text on top of it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from keye.data.modes import extract_answer

LETTERS = string.ascii_uppercase
_REASONING = re.compile(r"<(analysis|think)>(.*?)(?:</\1>|$)", re.S)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
# A leading capital letter counts only when delimited ("B", "(B)", "[B]", "B.", "B)", "B:", "B\n..."):
# a bare "A" before a word is usually the article ("A red ball").
_LEAD_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])(?:[.:,)]|\s*$|\s*\n))")
_SAID_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*[\(\[]?([A-Z])\b")
_OPTION_PREFIX = re.compile(r"^\s*[\(\[]?([A-Z])[\)\].:]\s*")
_PUNCT = re.compile(r"[^\w\s]")


@dataclass
class Answer:
    """One generation, split. ``text``: the final answer; ``thinking``: the ``<analysis>`` and
    ``<think>`` contents joined by a blank line ("" when the model did not think); ``mode``: the
    mode asked for ("auto", "think", "no_think"); ``raw``: the decoded generation as produced."""

    text: str
    thinking: str
    mode: str
    raw: str

    def __str__(self) -> str:
        return self.text


def split_reasoning(raw: str, mode: str = "auto") -> Answer:
    """Keep the thinking apart from the answer. An unfinished ``<think>`` (generation cut off)
    leaves the answer empty and its text in ``thinking``."""
    thinking = "\n\n".join(m.group(2).strip() for m in _REASONING.finditer(raw))
    return Answer(text=final_answer(raw), thinking=thinking, mode=mode, raw=raw)


def final_answer(text: str) -> str:
    """The answer a generation commits to: reasoning removed, ``<answer>`` and the last
    ``\\boxed{}`` unwrapped, whitespace and a trailing period stripped."""
    text = extract_answer(text)
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1].strip().rstrip(".").strip()
    return text


def normalize(text: str) -> str:
    """For exact-match scoring of open answers: lower case, punctuation and articles dropped,
    whitespace collapsed ("The Circle." == "circle")."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def option_text(option: str) -> str:
    """``"B. a red ball"`` -> ``"a red ball"`` (Video-MME writes the letter into each option)."""
    return _OPTION_PREFIX.sub("", option, count=1).strip()


def extract_choice(text: str, options: list[str]) -> str | None:
    """The option letter a generation picks among ``options`` (texts, with or without "A. "
    prefixes), or None when it picks none or is ambiguous.

    Tried in order on the final answer (``final_answer``): a delimited leading letter ("B", "(B)",
    "B. ..."), the whole answer equal to one option's text, "answer/option is B", then the one
    option whose text the answer contains (the longest, when one option's text contains another's).
    """
    letters = LETTERS[: len(options)]
    answer = final_answer(text)
    if not answer:
        return None
    m = _LEAD_LETTER.match(answer)
    lead = m and next(g for g in m.groups() if g)
    if lead and lead in letters:
        return lead
    texts = [normalize(option_text(o)) for o in options]
    said = normalize(option_text(answer))
    exact = [letters[i] for i, t in enumerate(texts) if t and t == said]
    if len(exact) == 1:
        return exact[0]
    m = _SAID_LETTER.search(answer)
    if m and m.group(1) in letters:
        return m.group(1)
    contained = [(len(t), letters[i]) for i, t in enumerate(texts) if t and re.search(rf"\b{re.escape(t)}\b", said)]
    if contained:
        contained.sort(reverse=True)
        if len(contained) == 1 or contained[0][0] > contained[1][0]:
            return contained[0][1]
    return None


def is_correct(generation: str, reference: str, options: list[str] | None = None) -> bool:
    """Whether a generation's final answer matches ``reference``: the option letter ``extract_choice``
    reads when ``reference`` is one of the ``options``' letters, else the normalised final answer
    (an empty answer never matches)."""
    if options and reference in LETTERS[: len(options)]:
        return extract_choice(generation, options) == reference
    answer = normalize(final_answer(generation))
    return bool(answer) and answer == normalize(reference)
