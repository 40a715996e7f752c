"""Question kinds over a clip spec: each is a small registered function returning every question
it can ask about the clip, with a reference answer, a chain of thought and five hint levels.

Every kind declares its closed answer space, so the random-guess baseline of a kind is
1 / len(answer space) and a model's accuracy can be read against it. The generator draws one
question per pick by first drawing an answer uniformly among the answers the clip allows, so the
answer distribution stays close to uniform and a majority-class guess does not beat the baseline
by much.

Hints follow the progressive levels used for hinted RL rollouts: an observation, a strategy, the
tool or formula, the first step, and the full solution (HINT_LEVELS).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from keye.data.world.scene import COLORS, DIRECTIONS, ENTRIES, MOTIONS, SHAPES, STILL, Clip, SceneConfig, WorldObject, where

HINT_LEVELS = ("observation", "strategy", "tool", "first_step", "solution")


@dataclass
class QA:
    """One question about a clip. ``crop`` is set for think-with-image questions only."""

    kind: str
    question: str
    answer: str
    cot: str
    hints: tuple[str, str, str, str, str]
    options: list[str] | None = None
    crop: dict | None = None  # {"frame": clip frame index, "time": seconds, "box": [x0, y0, x1, y1]}


@dataclass(frozen=True)
class QuestionKind:
    name: str
    reasoning: bool  # needs several frames and steps; drives the thinking / auto-think modes
    answer_space: Callable[[SceneConfig], list[str]]
    generate: Callable[[Clip], list[QA]] = field(repr=False)


QUESTION_KINDS: dict[str, QuestionKind] = {}


def question_kind(name: str, *, reasoning: bool, answer_space: Callable[[SceneConfig], list[str]]):
    def wrap(fn: Callable[[Clip], list[QA]]) -> Callable[[Clip], list[QA]]:
        QUESTION_KINDS[name] = QuestionKind(name, reasoning, answer_space, fn)
        return fn

    return wrap


def choose_question(kind: str, clip: Clip, rng: np.random.Generator, exclude: set[str] = frozenset()) -> QA | None:
    """Draw an answer uniformly among those the clip allows, then a question with that answer."""
    candidates = [qa for qa in QUESTION_KINDS[kind].generate(clip) if qa.question not in exclude]
    if not candidates:
        return None
    answers = sorted({qa.answer for qa in candidates})
    answer = answers[int(rng.integers(len(answers)))]
    pool = [qa for qa in candidates if qa.answer == answer]
    return pool[int(rng.integers(len(pool)))]


# ---------------------------------------------------------------- facts about a clip


def _t(clip: Clip, frame: int) -> str:
    return f"{frame / clip.fps:.1f}s"


def _unique(clip: Clip, key: Callable[[WorldObject], str]) -> list[tuple[int, WorldObject]]:
    counts = Counter(key(obj) for _, obj in clip.objects)
    return [(s, obj) for s, obj in clip.objects if counts[key(obj)] == 1]


def _visible_span(clip: Clip, s: int, obj: WorldObject) -> tuple[int, int]:
    """First and last sampled (2 fps grid) clip frame at which the object is fully in view."""
    start = clip.shots[s].start
    visible = clip.fully_visible_T(s, obj)
    on_grid = visible & ((start + np.arange(len(visible))) % clip.grid_step == 0)
    idx = np.flatnonzero(on_grid if on_grid.any() else visible)
    return start + int(idx[0]), start + int(idx[-1])


def _last_sampled(clip: Clip, s: int) -> int:
    """The last frame of shot s that a 2 fps sampler sees."""
    stop = clip.shots[s].stop
    return (stop - 1) // clip.grid_step * clip.grid_step


def _cell(clip: Clip, s: int, obj: WorldObject, frame: int) -> str:
    """The object's 3 x 3 grid cell at a clip frame, in the frame listings' words ('top left')."""
    shot = clip.shots[s]
    x, y = shot.centers_T2(obj, clip.fps)[frame - shot.start]
    return where(x, y, clip.width, clip.height)


# how a chain says that an object moved, where the grid cell alone may not show it (a short move can
# stay inside one cell)
_SHIFTS = {"right": "further right", "left": "further left", "up": "higher", "down": "lower"}


def _track(clip: Clip, s: int, obj: WorldObject) -> str:
    """'the red circle is in the top left at 1.0s and further right, in the top centre, at 3.0s', over
    its fully visible frames. Chains speak in grid cells and times, as the frame listings do: a model
    that sees 16 tokens per frame can read those, not pixel coordinates."""
    a, b = _visible_span(clip, s, obj)
    start = f"the {obj.name} is in the {_cell(clip, s, obj, a)} at {_t(clip, a)}"
    if obj.motion == STILL:
        return f"{start} and still there at {_t(clip, b)}"
    return f"{start} and {_SHIFTS[obj.motion]}, in the {_cell(clip, s, obj, b)}, at {_t(clip, b)}"


def _first_position(clip: Clip, s: int, obj: WorldObject) -> str:
    a, _ = _visible_span(clip, s, obj)
    return f"At {_t(clip, a)} the {obj.name} is in the {_cell(clip, s, obj, a)}"


def _motion_reason(obj: WorldObject) -> str:
    return "it stays still" if obj.motion == STILL else f"it moves {obj.motion}"


def _scene_list(clip: Clip) -> str:
    parts = []
    for s, shot in enumerate(clip.shots):
        names = " and ".join(f"the {o.name}" for o in shot.objects)
        parts.append(f"Scene {s + 1} ({_t(clip, shot.start)} to {_t(clip, _last_sampled(clip, s))}) shows {names}.")
    return " ".join(parts)


def _count_words(n: int) -> str:
    return f"{n} object" if n == 1 else f"{n} objects"


def _hints(observation: str, strategy: str, tool: str, first_step: str, cot: str, answer: str) -> tuple[str, ...]:
    return (observation, strategy, tool, first_step, f"{cot} The answer is {answer}.")


# ---------------------------------------------------------------- attribute kinds


@question_kind("color", reasoning=False, answer_space=lambda cfg: list(COLORS))
def _color(clip: Clip) -> list[QA]:
    out = []
    for s, obj in _unique(clip, lambda o: o.shape):
        a, _ = _visible_span(clip, s, obj)
        cot = f"The only {obj.shape} in the video appears in scene {s + 1}; at {_t(clip, a)} its pixels are {obj.color}."
        out.append(QA("color", f"What colour is the {obj.shape}?", obj.color, cot, _hints(
            f"Exactly one {obj.shape} appears in the video.",
            f"Find the {obj.shape} and read off its colour.",
            f"The possible colours are {', '.join(COLORS)}.",
            f"The {obj.shape} is fully visible at {_t(clip, a)} in scene {s + 1}.",
            cot, obj.color)))
    return out


@question_kind("shape", reasoning=False, answer_space=lambda cfg: list(SHAPES))
def _shape(clip: Clip) -> list[QA]:
    out = []
    for s, obj in _unique(clip, lambda o: o.color):
        a, _ = _visible_span(clip, s, obj)
        cot = f"The only {obj.color} object in the video appears in scene {s + 1}; at {_t(clip, a)} it is a {obj.shape}."
        out.append(QA("shape", f"What shape is the {obj.color} object?", obj.shape, cot, _hints(
            f"Exactly one {obj.color} object appears in the video.",
            f"Find the {obj.color} object and look at its outline.",
            "A circle is round, a square has four equal sides, a triangle has three corners and a point on top.",
            f"The {obj.color} object is fully visible at {_t(clip, a)} in scene {s + 1}.",
            cot, obj.shape)))
    return out


@question_kind("count", reasoning=True, answer_space=lambda cfg: [str(i) for i in range(1, cfg.max_objects * len(cfg.shot_weights) + 1)])
def _count(clip: Clip) -> list[QA]:
    per_shot = [len(shot.objects) for shot in clip.shots]
    total = sum(per_shot)
    cot = f"{_scene_list(clip)} {' + '.join(map(str, per_shot))} = {total}, so {_count_words(total)} appear."
    return [QA("count", "How many objects appear in the video in total?", str(total), cot, _hints(
        f"The video has {len(clip.shots)} scene{'s' if len(clip.shots) > 1 else ''}; objects may also enter or leave.",
        "Count the distinct objects in each scene, then add the counts.",
        "Total = sum over scenes of the objects in that scene; objects within a scene have different colours.",
        f"Scene 1 shows {_count_words(per_shot[0])}.",
        cot, str(total)))]


# ---------------------------------------------------------------- motion and time kinds


@question_kind("motion", reasoning=False, answer_space=lambda cfg: list(MOTIONS))
def _motion(clip: Clip) -> list[QA]:
    out = []
    for s, obj in _unique(clip, lambda o: o.name):
        cot = f"{_track(clip, s, obj).capitalize()}: {_motion_reason(obj)}."
        question = f"Which way does the {obj.name} move: left, right, up, down, or does it stay still?"
        out.append(QA("motion", question, obj.motion, cot, _hints(
            f"The {obj.name} is in scene {s + 1}.",
            f"Compare the position of the {obj.name} in an early frame and a late frame.",
            "Further right later = moves right, further left = left, lower = down, higher = up, same place = still.",
            f"{_first_position(clip, s, obj)}.",
            cot, obj.motion)))
    return out


@question_kind("entry", reasoning=False, answer_space=lambda cfg: list(ENTRIES))
def _entry(clip: Clip) -> list[QA]:
    out = []
    for s, obj in _unique(clip, lambda o: o.name):
        shot = clip.shots[s]
        a, b = _visible_span(clip, s, obj)
        where = {
            "enters": f"at {_t(clip, shot.start)} it is not fully in view and from {_t(clip, a)} it is, so it enters the frame",
            "leaves": f"it is fully in view until {_t(clip, b)} and out of view by {_t(clip, _last_sampled(clip, s))}, so it leaves the frame",
            "stays": f"it is fully in view from {_t(clip, shot.start)} to {_t(clip, _last_sampled(clip, s))}, so it stays in view",
        }[obj.entry]
        cot = f"The {obj.name} is in scene {s + 1}: {where}."
        question = f"Does the {obj.name} enter the frame, leave the frame, or stay in view?"
        out.append(QA("entry", question, obj.entry, cot, _hints(
            f"Watch the edges of the frame in scene {s + 1}.",
            f"Check whether the {obj.name} is inside the frame at the start and at the end of its scene.",
            "Outside at the start and inside later = enters; inside first and outside at the end = leaves; inside throughout = stays.",
            f"Scene {s + 1} runs from {_t(clip, shot.start)} to {_t(clip, _last_sampled(clip, s))}.",
            cot, obj.entry)))
    # Most objects stay in view; asking only where the clip also has an entering or leaving object
    # keeps "stays" from being a near-certain blind guess.
    return out if any(qa.answer != "stays" for qa in out) else []


@question_kind("cuts", reasoning=False, answer_space=lambda cfg: [str(i) for i in range(len(cfg.shot_weights))])
def _cuts(clip: Clip) -> list[QA]:
    n = len(clip.shots) - 1
    changes = [
        f"at {_t(clip, shot.start)} the background changes from {prev.background.describe()} to {shot.background.describe()}"
        for prev, shot in zip(clip.shots, clip.shots[1:])
    ]
    cot = (f"{'; '.join(changes).capitalize()}. " if changes else "The background never changes. ") + f"That is {n} cut{'s' if n != 1 else ''}."
    return [QA("cuts", "How many scene cuts are in the video?", str(n), cot, _hints(
        "A scene cut replaces the background and all objects at once.",
        "Go through the frames and count the moments where the background suddenly changes.",
        "Cuts = number of abrupt background changes = scenes - 1.",
        f"The first scene starts with {clip.shots[0].background.describe()}.",
        cot, str(n)))]


@question_kind("pause", reasoning=False, answer_space=lambda cfg: ["yes", "no"])
def _pause(clip: Clip) -> list[QA]:
    pauses = [(s, shot.pause) for s, shot in enumerate(clip.shots) if shot.pause is not None]
    if pauses:
        s, (a, b) = pauses[0]
        cot = f"In scene {s + 1}, from {_t(clip, a)} to {_t(clip, b - clip.grid_step)}, every object stays where it is, so nothing moves."
        answer = "yes"
    else:
        movers = "; ".join(f"in scene {s + 1} the {shot.objects[0].name} keeps moving {shot.objects[0].motion}" for s, shot in enumerate(clip.shots))
        cot = f"{movers.capitalize()}, so something moves at every moment."
        answer = "no"
    return [QA("pause", "Is there a moment when nothing in the video moves?", answer, cot, _hints(
        "Some objects move and some may stop.",
        "Look for several consecutive frames that are identical.",
        "Nothing moves when every object has the same position in consecutive frames.",
        f"In scene 1 the {clip.shots[0].objects[0].name} moves {clip.shots[0].objects[0].motion}.",
        cot, answer))]


@question_kind("order", reasoning=True, answer_space=lambda cfg: ["A", "B"])
def _order(clip: Clip) -> list[QA]:
    unique = _unique(clip, lambda o: o.name)
    out = []
    for s1, o1 in unique:
        for s2, o2 in unique:
            if s1 >= s2:
                continue
            for first_is_a in (True, False):
                options = [f"the {o1.name}", f"the {o2.name}"] if first_is_a else [f"the {o2.name}", f"the {o1.name}"]
                answer = "A" if first_is_a else "B"
                question = f"Which appears first in the video?\nA. {options[0]}\nB. {options[1]}"
                cot = (
                    f"The {o1.name} is in scene {s1 + 1}, which starts at {_t(clip, clip.shots[s1].start)}; the {o2.name} is in scene "
                    f"{s2 + 1}, which starts at {_t(clip, clip.shots[s2].start)}. So the {o1.name} comes first, option {answer}."
                )
                out.append(QA("order", question, answer, cot, _hints(
                    "The two objects are in different scenes.",
                    "Find the scene of each object and compare when the scenes start.",
                    "Earlier scene = earlier appearance; scenes are separated by cuts where the background changes.",
                    f"The {o1.name} is in scene {s1 + 1}.",
                    cot, answer), options=options))
    return out


# ---------------------------------------------------------------- multi-step reasoning kinds


@question_kind("mover_color", reasoning=True, answer_space=lambda cfg: list(COLORS))
def _mover_color(clip: Clip) -> list[QA]:
    by_motion = Counter(obj.motion for _, obj in clip.objects)
    steps = " ".join(f"{_track(clip, s, o).capitalize()}: {_motion_reason(o)}." for s, o in clip.objects)
    out = []
    for s, obj in clip.objects:
        if by_motion[obj.motion] != 1:
            continue
        target = "does not move" if obj.motion == STILL else f"moves {obj.motion}"
        cot = f"{steps} Only the {obj.name} {target}, and it is {obj.color}."
        out.append(QA("mover_color", f"What colour is the object that {target}?", obj.color, cot, _hints(
            f"Exactly one object {target}.",
            "Work out how each object moves, pick the one that matches, then read its colour.",
            "Compare where each object is early and late: further right = right, further left = left, lower = down, higher = up.",
            f"{_track(clip, *clip.objects[0]).capitalize()}.",
            cot, obj.color)))
    return out


@question_kind("mover_count", reasoning=True, answer_space=lambda cfg: [str(i) for i in range(cfg.max_objects * len(cfg.shot_weights) + 1)])
def _mover_count(clip: Clip) -> list[QA]:
    steps = " ".join(f"{_track(clip, s, o).capitalize()}: {_motion_reason(o)}." for s, o in clip.objects)
    out = []
    for direction in DIRECTIONS:
        n = sum(obj.motion == direction for _, obj in clip.objects)
        cot = f"{steps} So {_count_words(n)} move{'s' if n == 1 else ''} {direction}."
        out.append(QA("mover_count", f"How many objects move {direction}?", str(n), cot, _hints(
            "Objects move left, right, up, down or not at all, in every scene of the video.",
            f"Work out each object's direction, then count those that move {direction}.",
            "Compare where each object is early and late: further right = right, further left = left, lower = down, higher = up.",
            f"{_track(clip, *clip.objects[0]).capitalize()}.",
            cot, str(n))))
    return out


# ---------------------------------------------------------------- think-with-image


def _quadrant(x: float, y: float, width: int, height: int) -> str | None:
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    if abs(x - cx) < 2 or abs(y - cy) < 2:
        return None  # on a midline: no unambiguous quadrant
    return f"{'top' if y < cy else 'bottom'}-{'left' if x < cx else 'right'}"


@question_kind("zoom", reasoning=True, answer_space=lambda cfg: list(SHAPES))
def _zoom(clip: Clip) -> list[QA]:
    """Think-with-image: the answer works from a zoomed crop of one frame, given as an extra image turn."""
    W, H = clip.width, clip.height
    # frames on the 2 fps grid, so a 2 fps sampler sees exactly the frame the question names
    frames = range(0, clip.num_frames, clip.grid_step)
    out = []
    for f in frames:
        s = clip.shot_of(f)
        shot = clip.shots[s]
        centers = {obj: shot.centers_T2(obj, clip.fps)[f - shot.start] for obj in shot.objects}
        for obj in shot.objects:
            if not clip.fully_visible_T(s, obj)[f - shot.start]:
                continue
            x, y = centers[obj]
            quadrant = _quadrant(x, y, W, H)
            if quadrant is None:
                continue
            half = int(np.ceil(1.7 * obj.radius))
            box = [max(0, int(x) - half), max(0, int(y) - half), min(W, int(x) + half + 2), min(H, int(y) + half + 2)]
            others = [o for o in shot.objects if o is not obj]
            crowded = any(_quadrant(*centers[o], W, H) in (quadrant, None) or _box_hits(box, centers[o], o.radius) for o in others)
            if crowded:
                continue
            t = _t(clip, f)
            cot = f"The zoomed view of the {quadrant} of the frame at {t} shows a {obj.color} {obj.shape}."
            out.append(QA("zoom", f"What shape is the object in the {quadrant} of the frame at {t}?", obj.shape, cot, _hints(
                f"At {t} one object is in the {quadrant} of the frame.",
                f"Zoom into the {quadrant} of the frame at {t} and look at the object's outline.",
                "A circle is round, a square has four equal sides, a triangle has three corners and a point on top.",
                f"The object in the {quadrant} at {t} is {obj.color}.",
                cot, obj.shape), crop={"frame": f, "time": round(f / clip.fps, 3), "box": box, "quadrant": quadrant}))
    return out


def _box_hits(box: list[int], xy, radius: float) -> bool:
    x0, y0, x1, y1 = box
    r = radius + 1.0
    return not (xy[0] + r < x0 or xy[0] - r >= x1 or xy[1] + r < y0 or xy[1] - r >= y1)
