"""The world as text: a clip's ground truth written out, for the nano base's text pretraining and the text
oracle (questions answered from that text, no pixels).

``listing(clip)`` writes one line per 2 fps frame, as the video layout gives one block per frame: the time,
the background, then each object in view with its centre on a 1-99 grid, in reading order::

    0.0s blue: red circle 23 45, green square 60 70
    0.5s blue: red circle 27 45, green square 60 70
    1.0s yellow/gray: cyan triangle 50 12

Positions that fine make motion, pauses and entries answerable from the text (a 3x3 cell stays the same for
several frames of a slow object), and the background makes cuts answerable. ``conversation(clip, ...)``
puts the listing in a user turn and asks the clip's questions in turns, as the world's dense rows do;
``oracle_messages(clip, question)`` is the one-question form the text oracle scores. ``lookup_turns``
asks colour / shape lookups over a window of one to three frames, the shortest form of the binding step,
over the grid listing or (``cells``) the 3x3 cell words the world's frame listings use (what the recipe's
model writes when asked for the frames, and the lookup probe's layout), so the skill is not tied to one
layout. ``motion_turns`` asks which way each object of one shot moves over 2-4 of its frames: the same
object compared across frames, written as short as the lookups.

Every turn carries its question's key words (the colours, shapes and directions it names), so a stage can
guide attention to them (``keye.train.stages.text``).

Pretraining clips come from their own world seed (``TEXT_SEED`` by default), never from the held-out
clips of seed 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from keye.data.world.generate import (FRAMES_PROMPT, WorldConfig, caption, dense_questions, frame_listing, frame_objects,
                                      frame_texts, make_clip)
from keye.data.world.questions import QA
from keye.data.world.scene import COLORS, DIRECTIONS, SHAPES, Clip

TEXT_SEED = 1_000_000  # the world seed text pretraining draws its clips from (the held-out clips are seed 0's)
LISTING_INTRO = "Frames (time, background: colour shape x y, x and y from 1 to 99):"


def _grid(value: float, size: int) -> int:
    """A pixel coordinate on the listing's 1-99 grid (a frame edge maps to 1 and 99)."""
    return int(min(99, max(1, 1 + int(value * 99 / size))))


def listing(clip: Clip, frames: slice = slice(None)) -> str:
    """The clip's frames (all, or a ``frames`` slice of its 2 fps frames) as text, one line per frame."""
    return _listing_lines(clip, list(frame_objects(clip))[frames])


def _listing_lines(clip: Clip, frames: list) -> str:
    """``listing``'s lines for ``frames``, items of ``frame_objects(clip)`` (any subset, in the given order)."""
    lines = []
    for seconds, seen in frames:
        shot = clip.shots[_shot_at(clip, seconds)]
        objects = ", ".join(f"{obj.name} {_grid(x, clip.width)} {_grid(y, clip.height)}" for x, y, obj in seen)
        lines.append(f"{seconds:.1f}s {shot.background.listed}: {objects or 'nothing'}")
    return "\n".join(lines)


def _shot_at(clip: Clip, seconds: float) -> int:
    """The shot holding the 2 fps frame at ``seconds``."""
    return clip.shot_of(int(round(seconds * clip.fps)))


_KEY_WORDS = re.compile(rf"\b({'|'.join([*COLORS, *SHAPES, *DIRECTIONS])})\b")


def key_words(question: str) -> list[str]:
    """The words a question asks to look up: the colours, shapes and directions its first clause names
    (up to the first ":" or "?"; the answer choices of "left, right, up, down" after it are no key), and
    those of its option lines ("A. the red circle")."""
    head = re.split(r"[:?]", question, maxsplit=1)[0]
    options = [line for line in question.splitlines()[1:] if re.match(r"[A-Z]\. ", line)]
    return [m.group(0) for text in (head, *options) for m in _KEY_WORDS.finditer(text)]


@dataclass(frozen=True)
class Turn:
    """One question and its answer; ``context`` is what the user turn shows before the question (the listing)."""

    question: str
    answer: str
    context: str = ""
    separator: str = "\n"  # between the context and the question


def messages(turns: list[Turn]) -> list[dict]:
    """Chat messages for ``turns``: each user turn is its context (if any), a newline, its question."""
    out = []
    for turn in turns:
        text = f"{turn.context}{turn.separator}{turn.question}" if turn.context else turn.question
        out += [{"role": "user", "content": text}, {"role": "assistant", "content": turn.answer}]
    return out


def _answer(qa: QA, chain: bool) -> str:
    return f"<think>{qa.cot}</think>{qa.answer}" if chain else qa.answer


@dataclass(frozen=True)
class TextMix:
    """What the text pretraining samples hold: whole clips (the listing and one question of every kind the
    clip allows, in a random order, with the turns below mixed in), or in their stead short lookups or
    motion windows (``lookup_turns``, ``motion_turns``)."""

    chains: float = 0.0  # share of answers written as <think>chain</think>answer
    captions: float = 0.0  # probability of a turn asking for the clip's caption
    # probability of a turn asking for the world's frame listing (the frames rows' task, in 3x3 cell words)
    frames: float = 0.0
    lookups: float = 0.0  # share of samples that are colour / shape lookups over 1-3 frames instead of a clip
    cells: float = 0.0  # share of the lookups written in the frame listings' cell words instead of the grid
    # share of samples asking which way each object of one shot moves, over 2-4 of its frames
    motions: float = 0.0


def conversation(clip: Clip, rng: np.random.Generator, config: WorldConfig, mix: TextMix = TextMix()) -> list[Turn]:
    """The listing with the first question, then the other questions turn by turn."""
    turns = [(qa.question, _answer(qa, rng.random() < mix.chains)) for qa in dense_questions(config, clip, rng)]
    if rng.random() < mix.frames:
        turns.insert(int(rng.integers(len(turns) + 1)), (FRAMES_PROMPT, frame_listing(frame_texts(clip))))
    if rng.random() < mix.captions:
        turns.insert(int(rng.integers(len(turns) + 1)), ("Describe the video.", caption(clip)))
    context = f"{LISTING_INTRO}\n{listing(clip)}"
    return [Turn(q, a, context if i == 0 else "") for i, (q, a) in enumerate(turns)]


def lookup_turns(clip: Clip, rng: np.random.Generator, max_frames: int = 3, min_objects: int = 2,
                 cells: float = 0.0) -> list[Turn]:
    """Colour and shape lookups over a window of 1 to ``max_frames`` frames of one shot of ``clip``, each
    frame showing at least ``min_objects`` objects (with one, the first-listed guess is always right and
    teaches nothing): "What colour is the triangle?" for each object whose shape is unique in the window,
    "What shape is the blue object?" for each whose colour is. The window is narrowed when no window of the
    drawn width qualifies; empty when not even one frame does.

    With probability ``cells`` the window is written in cell words instead of the grid: as the frames rows
    write it ("0.0s: red circle top left, blue square middle centre. 0.5s: ..."), or, for one frame, half
    the time as the lookup probe does (the objects, then the question on the same line)."""
    frames = list(frame_objects(clip))
    shot_of = [_shot_at(clip, seconds) for seconds, _ in frames]
    for width in range(int(rng.integers(1, max_frames + 1)), 0, -1):
        starts = [i for i in range(len(frames) - width + 1) if shot_of[i] == shot_of[i + width - 1]
                  and min(len(seen) for _, seen in frames[i:i + width]) >= min_objects]
        if starts:
            break
    else:
        return []
    start = starts[int(rng.integers(len(starts)))]
    window = slice(start, start + width)
    seen = {obj.name: obj for _, objs in frames[window] for _, _, obj in objs}
    objs = list(seen.values())
    questions = [(f"What colour is the {o.shape}?", o.color) for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    questions += [(f"What shape is the {o.color} object?", o.shape) for o in objs if sum(p.color == o.color for p in objs) == 1]
    order = rng.permutation(len(questions))
    context, separator = f"{LISTING_INTRO}\n{_listing_lines(clip, frames[window])}", "\n"
    if cells > 0 and rng.random() < cells:
        texts = frame_texts(clip)[window]
        if width == 1 and rng.random() < 0.5:
            context, separator = texts[0][1], ". "
        else:
            context = frame_listing(texts)
    return [Turn(*questions[k], *((context, separator) if i == 0 else ())) for i, k in enumerate(order)]


def motion_turns(clip: Clip, rng: np.random.Generator, max_frames: int = 4) -> list[Turn]:
    """"Which way does the red circle move" for each object of one shot of ``clip``, over a listing of 2 to
    ``max_frames`` of the shot's frames (more when the objects' first and last frames in view need it): the
    same object compared across frames, the step the motion kinds, movers and pauses share, written short
    as the lookups are. The frames always hold the shot's ends and each asked object's first and last
    frames in view, so the listing shows its whole displacement; objects seen in fewer than two of them
    are not asked. Empty when no object of the drawn shot qualifies."""
    frames = list(frame_objects(clip))
    s = int(rng.integers(len(clip.shots)))
    in_shot = [i for i, (seconds, _) in enumerate(frames) if _shot_at(clip, seconds) == s]
    if len(in_shot) < 2:
        return []
    ends: set[int] = {in_shot[0], in_shot[-1]}
    objects = {}
    for obj in clip.shots[s].objects:
        seen = [i for i in in_shot if any(o is obj for _, _, o in frames[i][1])]
        if len(seen) >= 2:
            objects[obj.name] = obj
            ends |= {seen[0], seen[-1]}
    if not objects:
        return []
    middle = [i for i in in_shot if i not in ends]
    extra = int(rng.integers(0, max(0, max_frames - len(ends)) + 1))
    chosen = sorted(ends | {middle[k] for k in rng.permutation(len(middle))[:extra]})
    context = _listing_lines(clip, [frames[i] for i in chosen])
    names = [objects[n] for n in rng.permutation(sorted(objects))]
    return [Turn(f"Which way does the {o.name} move: left, right, up, down, or does it stay still?", o.motion,
                 *((f"{LISTING_INTRO}\n{context}", "\n") if i == 0 else ())) for i, o in enumerate(names)]


def oracle_text(clip: Clip, question: str) -> str:
    """The listing, then ``question``: the user turn the text oracle asks."""
    return f"{LISTING_INTRO}\n{listing(clip)}\n{question}"


def oracle_messages(clip: Clip, question: str) -> list[dict]:
    """The text oracle's prompt: the listing, then one question (the reply is the model's)."""
    return [{"role": "user", "content": oracle_text(clip, question)}]



def pretraining_clip(index: int, config: WorldConfig, redraw: int = 0) -> tuple[Clip, np.random.Generator]:
    """Pretraining clip ``index`` of ``config``'s world and the generator its questions are drawn from;
    ``redraw`` > 0 gives another clip in its place (for a sample the first clip cannot serve)."""
    return make_clip(config, "text", f"text-{index:08d}" + (f"-{redraw}" if redraw else ""))
