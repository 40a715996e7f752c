"""What happens in one synthetic clip: shots, backgrounds, objects and their tracks.

A clip is a list of shots separated by hard cuts (background and objects change at once). Each
shot has a background (plain or two-tone), one to ``max_objects`` objects with distinct colours,
and maybe one pause (a static stretch: nothing moves for ``pause_seconds``). Every object moves
along one axis at constant speed, or stands still; some enter from off-screen or leave the frame.

The vocabulary is closed and small on purpose: the world must be learnable by a nano model at
112-224 px and 8-16 frames (2 fps sampling), so colours are six hues 60 degrees apart at full
saturation on dark, desaturated backgrounds, and shapes are three with very different fill ratios
(circle ~0.79, square 1.0, triangle 0.5 of their bounding box).

Everything here is pure data: the spec is sampled from a numpy Generator and is rendered by
``render.py``; questions are derived from the spec by ``questions.py``. Coordinates are pixels,
x to the right, y down, origin at the top-left corner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Saturated hues 60 degrees apart: the largest separation six colours can have, and robust to
# H.264's 4:2:0 chroma subsampling at object edges.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "yellow": (240, 225, 20),
    "green": (30, 200, 40),
    "cyan": (20, 215, 225),
    "blue": (40, 70, 250),
    "magenta": (225, 35, 220),
}
# Dark, desaturated, so no background is ever nearer to an object colour than to its own.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (80, 80, 80),
    "navy": (20, 25, 75),
    "dark green": (20, 65, 35),
    "brown": (80, 50, 20),
    "maroon": (75, 20, 30),
}
SHAPES = ("circle", "square", "triangle")
# unit step per direction in (x, y); "up" is -y because rows grow downwards
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
STILL = "still"
SAMPLE_FPS = 2.0  # Keye-VL's default video sampling rate; timestamps in the questions sit on its grid
MOTIONS = (*DIRECTIONS, STILL)
ENTRIES = ("enters", "leaves", "stays")
BACKGROUND_SPLITS = ("plain", "vertical", "horizontal")

# Objects are kept this far apart (centre distance >= (r1 + r2) * factor): 1.45 covers the
# circumscribed radius of every shape (triangle corners sit at sqrt(2) r) plus a pixel of slack.
_COLLISION_FACTOR = 1.45


ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")  # the 3 x 3 cell words


def moved(dx: float, dy: float, still: float) -> str:
    """The way a centre moved by (dx, dy): the larger axis's direction (DIRECTIONS), or STILL under ``still``."""
    if max(abs(dx), abs(dy)) < still:
        return STILL
    step = (1 if dx > 0 else -1, 0) if abs(dx) >= abs(dy) else (0, 1 if dy > 0 else -1)
    return next(d for d, s in DIRECTIONS.items() if s == step)


def where(x: float, y: float, width: int, height: int) -> str:
    """Coarse position of a point on a 3 x 3 grid: 'top left', 'middle centre', ... (the words of the
    frame listings and of the reasoning chains, which never quote pixel coordinates)."""
    col = COLUMNS[min(2, max(0, int(3 * x / width)))]
    row = ROWS[min(2, max(0, int(3 * y / height)))]
    return f"{row} {col}"


@dataclass(frozen=True)
class SceneConfig:
    """Sizes and rates of the clips. Durations are in seconds, sizes in pixels (even, for yuv420p)."""

    height: int = 112
    width: int = 112
    # Native rate of the written mp4. 2.0 = Keye's sampling rate: a 2 fps sampler then takes every
    # frame, so the times questions name are exactly the sampled ones. Higher even rates put cuts
    # and pauses on the 2 fps grid, but a linspace sampler may land a native frame off it.
    fps: float = 2.0
    durations: tuple[float, ...] = (4.0, 5.0, 6.0)
    # shots per clip: weight of 1, 2, 3, ... shots (cuts = shots - 1)
    shot_weights: tuple[float, ...] = (0.45, 0.4, 0.15)
    # >= 4 samples at 2 fps per shot, so every shot shows motion to a 2 fps sampler
    min_shot_seconds: float = 2.0
    max_objects: int = 3
    # object radius as a fraction of min(height, width)
    radius_range: tuple[float, float] = (0.08, 0.12)
    # an in-view mover travels at least this share of the frame along its axis
    min_travel: float = 0.3
    # weights of the motion kinds for every object after the first (the first always moves in view,
    # so outside a pause something visible always moves)
    motion_weights: dict[str, float] = field(default_factory=lambda: {"still": 1.0, "stays": 2.0, "enters": 1.0, "leaves": 1.0})
    pause_probability: float = 0.6
    pause_seconds: float = 1.5
    # entering / leaving objects are fully visible for at least this long
    min_visible_seconds: float = 1.0
    two_tone_probability: float = 0.4


@dataclass(frozen=True)
class WorldObject:
    """One object of a shot. ``velocity_xy`` is in pixels per second of motion (pauses excluded)."""

    shape: str
    color: str
    radius: float
    start_xy: tuple[float, float]
    velocity_xy: tuple[float, float]
    entry: str  # "enters", "leaves" or "stays"

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def motion(self) -> str:
        """One of DIRECTIONS or STILL."""
        vx, vy = self.velocity_xy
        if vx == 0 and vy == 0:
            return STILL
        step = (int(np.sign(vx)), int(np.sign(vy)))
        return next(d for d, s in DIRECTIONS.items() if s == step)


@dataclass(frozen=True)
class Background:
    colors: tuple[str, ...]  # one colour for "plain", two for the two-tone splits
    split: str  # "plain", "vertical" (left | right) or "horizontal" (top / bottom)

    @property
    def listed(self) -> str:
        """How frame listings name it, the text base's and the video task's alike: "navy", "navy/gray"."""
        return "/".join(self.colors)

    def describe(self) -> str:
        if self.split == "plain":
            return f"a plain {self.colors[0]} background"
        halves = ("left", "right") if self.split == "vertical" else ("top", "bottom")
        return f"a background that is {self.colors[0]} on the {halves[0]} and {self.colors[1]} on the {halves[1]}"


@dataclass(frozen=True)
class Shot:
    """Frames [start, stop) of the clip. ``pause`` = frames [a, b) in clip indices where nothing moves."""

    start: int
    stop: int
    background: Background
    objects: tuple[WorldObject, ...]
    pause: tuple[int, int] | None = None

    @property
    def num_frames(self) -> int:
        return self.stop - self.start

    def motion_seconds(self, fps: float) -> np.ndarray:
        """(T_shot,) float: seconds of motion elapsed at each frame of the shot (frozen during the pause)."""
        moving = np.ones(self.num_frames, dtype=np.float64)
        moving[0] = 0.0
        if self.pause is not None:
            a, b = self.pause[0] - self.start, self.pause[1] - self.start
            # frame i moves relative to i-1 unless both lie inside the pause
            moving[a + 1 : b] = 0.0
        return np.cumsum(moving) / fps

    def centers_T2(self, obj: WorldObject, fps: float) -> np.ndarray:
        """(T_shot, 2) float: the object's centre (x, y) at every frame of the shot."""
        t_T1 = self.motion_seconds(fps)[:, None]
        return np.asarray(obj.start_xy)[None, :] + t_T1 * np.asarray(obj.velocity_xy)[None, :]


@dataclass(frozen=True)
class Clip:
    clip_id: str
    split: str
    fps: float
    height: int
    width: int
    shots: tuple[Shot, ...]

    @property
    def num_frames(self) -> int:
        return self.shots[-1].stop

    @property
    def grid_step(self) -> int:
        """Frames between two samples of a 2 fps sampler (the frame rate Keye-VL samples at)."""
        return grid_step(self.fps)

    def shot_of(self, frame: int) -> int:
        return next(s for s, shot in enumerate(self.shots) if shot.start <= frame < shot.stop)

    @property
    def objects(self) -> list[tuple[int, WorldObject]]:
        """(shot index, object) for every object of the clip, in shot order."""
        return [(s, obj) for s, shot in enumerate(self.shots) for obj in shot.objects]

    def fully_visible_T(self, shot_index: int, obj: WorldObject) -> np.ndarray:
        """(T_shot,) bool: the object's whole bounding square lies inside the frame."""
        xy = self.shots[shot_index].centers_T2(obj, self.fps)
        r = obj.radius
        return (xy[:, 0] - r >= 0) & (xy[:, 0] + r <= self.width - 1) & (xy[:, 1] - r >= 0) & (xy[:, 1] + r <= self.height - 1)

    def to_json(self) -> dict:
        return asdict(self)


def grid_step(fps: float) -> int:
    """Frames per 2 fps sample when fps is a multiple of 2 (then cuts and pauses land on sampled
    frames, so a 2 fps sampler sees exactly what the questions name); 1 otherwise."""
    step = fps / SAMPLE_FPS
    return int(round(step)) if abs(step - round(step)) < 1e-9 and step >= 1 else 1


def sample_clip(clip_id: str, split: str, config: SceneConfig, rng: np.random.Generator) -> Clip:
    """Draw one clip spec. Same ``rng`` state -> same clip (the generator seeds it from the clip id)."""
    fps, step = config.fps, grid_step(config.fps)
    # shot bounds and pauses are drawn in whole sampling steps, then scaled to frames
    num_steps = max(1, int(round(float(rng.choice(config.durations)) * fps / step)))
    min_shot = max(1, int(round(config.min_shot_seconds * fps / step)))
    max_shots = max(1, min(len(config.shot_weights), num_steps // min_shot))
    weights = np.asarray(config.shot_weights[:max_shots], dtype=np.float64)
    num_shots = int(rng.choice(max_shots, p=weights / weights.sum())) + 1
    bounds = [b * step for b in _shot_bounds(num_steps, num_shots, min_shot, rng)]
    shots, previous = [], None
    for start, stop in zip(bounds[:-1], bounds[1:]):
        background = _sample_background(config, rng, exclude=previous.colors if previous else ())
        shots.append(_sample_shot(start, stop, background, config, rng))
        previous = background
    return Clip(clip_id, split, fps, config.height, config.width, tuple(shots))


def _shot_bounds(num_steps: int, num_shots: int, min_shot: int, rng: np.random.Generator) -> list[int]:
    slack = num_steps - num_shots * min_shot
    cuts = np.sort(rng.integers(0, slack + 1, size=num_shots - 1)) if num_shots > 1 else np.array([], dtype=int)
    return [0, *[int(c) + (i + 1) * min_shot for i, c in enumerate(cuts)], num_steps]


def _sample_background(config: SceneConfig, rng: np.random.Generator, exclude: tuple[str, ...]) -> Background:
    # A cut must change every background pixel, so the next shot never reuses a background colour.
    names = [n for n in BACKGROUNDS if n not in exclude]
    if rng.random() < config.two_tone_probability:
        pair = rng.choice(len(names), size=2, replace=False)
        split = BACKGROUND_SPLITS[1 + int(rng.integers(2))]
        return Background((names[pair[0]], names[pair[1]]), split)
    return Background((names[int(rng.integers(len(names)))],), "plain")


def _sample_shot(start: int, stop: int, background: Background, config: SceneConfig, rng: np.random.Generator) -> Shot:
    fps, step = config.fps, grid_step(config.fps)
    n = (stop - start) // step  # in sampling steps
    pause = None
    pause_len = max(2, int(round(config.pause_seconds * fps / step)))
    margin = max(1, int(round(0.5 * fps / step)))  # at least half a second of motion on each side of the pause
    if rng.random() < config.pause_probability and n >= pause_len + 2 * margin:
        a = start + step * int(rng.integers(margin, n - pause_len - margin + 1))
        pause = (a, a + pause_len * step)
    shot = Shot(start, stop, background, (), pause)
    moving_seconds = float(shot.motion_seconds(fps)[-1])

    num_objects = int(rng.integers(1, config.max_objects + 1))
    colors = [list(COLORS)[i] for i in rng.choice(len(COLORS), size=num_objects, replace=False)]
    # sorted: a config read back from JSON (sort_keys) must draw the same clips as the one written
    kinds = sorted(config.motion_weights)
    kind_w = np.asarray([config.motion_weights[k] for k in kinds], dtype=np.float64)
    placed: list[WorldObject] = []
    for i, color in enumerate(colors):
        kind = "stays" if i == 0 else kinds[int(rng.choice(len(kinds), p=kind_w / kind_w.sum()))]
        for _ in range(30):  # rejection sampling against overlaps; a crowded shot just gets fewer objects
            obj = _sample_object(color, kind, shot, moving_seconds, config, rng)
            if obj is not None and not any(_collide(shot, obj, other, fps) for other in placed):
                placed.append(obj)
                break
        else:
            if i == 0:  # the guaranteed in-view mover: a single object on an empty shot always fits
                raise RuntimeError(f"could not place the first object in a {config.width}x{config.height} shot")
    return Shot(start, stop, background, tuple(placed), pause)


def _sample_object(
    color: str, kind: str, shot: Shot, moving_seconds: float, config: SceneConfig, rng: np.random.Generator
) -> WorldObject | None:
    W, H = config.width, config.height
    lo_r, hi_r = config.radius_range
    r = float(np.round(rng.uniform(lo_r, hi_r) * min(W, H), 1))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    m = 2.0  # keep a couple of background pixels between a fully visible object and the border
    if kind == "still":
        xy = (float(rng.uniform(r + m, W - 1 - r - m)), float(rng.uniform(r + m, H - 1 - r - m)))
        return WorldObject(shape, color, r, xy, (0.0, 0.0), "stays")

    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    dx, dy = DIRECTIONS[direction]
    along, across = (W, H) if dx else (H, W)
    lo, hi = r + m, along - 1 - r - m  # centre range along the axis that keeps the object inside
    perp = float(rng.uniform(r + m, across - 1 - r - m))
    # positions s along the axis for a positive direction; negative directions are mirrored below
    if kind == "stays":
        travel_min = config.min_travel * along
        if hi - lo < travel_min:
            return None
        travel = rng.uniform(travel_min, hi - lo)
        s0 = rng.uniform(lo, hi - travel)
        s1 = s0 + travel
    else:
        outside = -r - 1.0
        # fully visible for min_visible_seconds: s(t) must pass lo early enough
        need = config.min_visible_seconds / moving_seconds if moving_seconds > 0 else 2.0
        if need >= 1.0:
            return None
        # enters: s(t) = outside + (s1 - outside) * t / M >= lo  for t >= (1 - need) M
        s1_min = outside + (lo - outside) / (1.0 - need)
        if s1_min > hi:
            return None
        s0, s1 = outside, rng.uniform(s1_min, hi)
        if kind == "leaves":  # the time-reverse of entering from the far side
            s0, s1 = along - 1 - s1, along - 1 - outside
    if dx < 0 or dy < 0:
        s0, s1 = along - 1 - s0, along - 1 - s1
    speed = (s1 - s0) / moving_seconds
    start = (float(s0), perp) if dx else (perp, float(s0))
    velocity = (float(speed), 0.0) if dx else (0.0, float(speed))
    return WorldObject(shape, color, r, start, velocity, kind)


def _collide(shot: Shot, a: WorldObject, b: WorldObject, fps: float) -> bool:
    gap_T = np.linalg.norm(shot.centers_T2(a, fps) - shot.centers_T2(b, fps), axis=1)
    return bool((gap_T < (a.radius + b.radius) * _COLLISION_FACTOR + 1.0).any())
