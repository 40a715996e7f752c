"""SFT conversation modes over QA rows that carry a reference answer and chain of thought.

Keye-VL-1.5 trains one model for several answer styles, switched by a suffix on the last user
text (``/think``, ``/no_think``; none = auto-think, where the model first says in
``<analysis>`` whether the question needs thinking). The suffix is the processor's job
(``KeyeProcessor.apply_chat_template(think_mode=...)``), so a rendered row carries ``think_mode``
and the assistant text of that style; the text never contains the suffix itself.

Registered modes (one small function each):

* ``non_thinking``: the bare answer; think_mode "no_think".
* ``thinking``: ``<think>{cot}</think>{answer}``; think_mode "think".
* ``auto_think``: ``<analysis>{why}</analysis>`` then the thinking or the non-thinking body, chosen by
  the row's ``reasoning`` flag (multi-frame, multi-step questions think); think_mode None.
* ``think_with_image``: rows whose answer works from a crop given as an extra image turn; kept as
  written (their assistant turns already think); think_mode "think".
* ``video``: the row's own conversation unchanged, think_mode from whether it thinks.

A rendered row is again a ShareGPT ``messages`` + ``videos`` / ``images`` row, so it goes through
``keye.data.conversations.parse_row`` like any other data.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import numpy as np

from keye.errors import KeyeInputError

THINK_ANALYSIS = "This question needs information from several frames and more than one step, so I will think first."
DIRECT_ANALYSIS = "This question can be answered directly from what the video shows."

Renderer = Callable[[dict], dict]
CONVERSATION_MODES: dict[str, Renderer] = {}
# which rows a mode can render: think-with-image needs the crop turn, video a video, the others a single QA row
_APPLIES: dict[str, Callable[[dict], bool]] = {}


def register_mode(name: str, applies: Callable[[dict], bool]) -> Callable[[Renderer], Renderer]:
    def wrap(fn: Renderer) -> Renderer:
        CONVERSATION_MODES[name] = fn
        _APPLIES[name] = applies
        return fn

    return wrap


def _single_question(row: dict) -> bool:
    """A single-turn QA row: what the answer-style modes rewrite (a row without a reference ``answer``, such
    as a frame listing, is only ever kept as written)."""
    return not row.get("images") and len(row["messages"]) == 2 and "answer" in row


def _with_assistant(row: dict, text: str, think_mode: str | None, mode: str) -> dict:
    messages = [dict(m) for m in row["messages"]]
    messages[-1] = {"role": "assistant", "content": text}
    return {**row, "messages": messages, "think_mode": think_mode, "mode": mode}


def _cot(row: dict) -> str:
    if not row.get("cot"):
        raise KeyeInputError(f"row {row.get('id')!r} has no 'cot': the thinking modes need a reference chain of thought")
    return row["cot"]


@register_mode("non_thinking", applies=_single_question)
def _non_thinking(row: dict) -> dict:
    return _with_assistant(row, row["answer"], "no_think", "non_thinking")


@register_mode("thinking", applies=_single_question)
def _thinking(row: dict) -> dict:
    return _with_assistant(row, f"<think>{_cot(row)}</think>{row['answer']}", "think", "thinking")


@register_mode("auto_think", applies=_single_question)
def _auto_think(row: dict) -> dict:
    if row.get("reasoning"):
        text = f"<analysis>{THINK_ANALYSIS}</analysis><think>{_cot(row)}</think>{row['answer']}"
    else:
        text = f"<analysis>{DIRECT_ANALYSIS}</analysis>{row['answer']}"
    return _with_assistant(row, text, None, "auto_think")


@register_mode("think_with_image", applies=lambda row: bool(row.get("images")))
def _think_with_image(row: dict) -> dict:
    return {**row, "think_mode": "think", "mode": "think_with_image"}


@register_mode("video", applies=lambda row: bool(row.get("videos")))
def _video(row: dict) -> dict:
    thinks = any("<think>" in m["content"] for m in row["messages"] if m["role"] == "assistant")
    return {**row, "think_mode": "think" if thinks else "no_think", "mode": "video"}


def render_mode(row: dict, mode: str) -> dict:
    if mode not in CONVERSATION_MODES:
        raise KeyeInputError(f"unknown conversation mode {mode!r}; known: {sorted(CONVERSATION_MODES)}")
    if not _APPLIES[mode](row):
        raise KeyeInputError(f"row {row.get('id')!r} cannot be rendered in mode {mode!r}")
    return CONVERSATION_MODES[mode](row)


def assign_modes(rows: list[dict], weights: dict[str, float], seed: int = 0) -> list[dict]:
    """Render each row in one mode drawn from ``weights`` among the modes that apply to it.

    The draw depends only on (seed, row id), so the mixture is stable when rows are added, removed
    or reordered. Rows no weighted mode applies to are dropped.
    """
    unknown = set(weights) - set(CONVERSATION_MODES)
    if unknown:
        raise KeyeInputError(f"unknown conversation modes {sorted(unknown)}; known: {sorted(CONVERSATION_MODES)}")
    out = []
    for row in rows:
        names = [m for m, w in weights.items() if w > 0 and _APPLIES[m](row)]
        if not names:
            continue
        p = np.asarray([weights[m] for m in names], dtype=np.float64)
        digest = hashlib.sha256(f"{seed}/{row['id']}".encode()).digest()
        u = int.from_bytes(digest[:8], "little") / 2**64
        out.append(CONVERSATION_MODES[names[int(np.searchsorted(np.cumsum(p / p.sum()), u, side="right"))]](row))
    return out


def with_hint(row: dict, level: int) -> dict:
    """The row with hint levels 1..``level`` appended to the question (0 = no hint), for hinted
    RL rollouts: observation, strategy, tool / formula, first step, full solution."""
    hints = row.get("hints") or []
    if not 0 <= level <= len(hints):
        raise KeyeInputError(f"hint level {level} out of range for row {row.get('id')!r} with {len(hints)} hints")
    if level == 0:
        return row
    messages = [dict(m) for m in row["messages"]]
    text = "\n".join(f"Hint {i + 1}: {h}" for i, h in enumerate(hints[:level]))
    messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n{text}"}
    return {**row, "messages": messages, "hint_level": level}


_BLOCK = re.compile(r"<(analysis|think)>.*?</\1>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)


def extract_answer(text: str) -> str:
    """The final answer of a generation in any mode: drops <analysis>/<think> blocks, prefers an
    <answer>...</answer> span, strips whitespace and a trailing period. An unfinished <think> gives ""."""
    text = _BLOCK.sub("", text)
    if "<think>" in text:
        return ""
    match = _ANSWER.search(text)
    if match:
        text = match.group(1)
    return text.strip().rstrip(".").strip()
