"""Text probes of a decoder, built from the world's scenes (no pixels).

``lookup_probe``: one frame's object listing as the world's frames write it ("red triangle top left, cyan
square middle centre") and a question that picks one object out of it ("What colour is the triangle?" /
"What shape is the blue object?"). Answering means finding the named attribute in the listing and reading
the word beside it: the binding step every world question about one object of several needs. A decoder that
cannot learn this cannot bind, whatever its perception. Frames hold 1, 2 or 3 objects equally often. Each
item carries the first-listed guess (the first colour, or shape, of the listing): it scores about 60%, the
plateau that decoders trained from scratch on this task sit on.

Frames come from clips of their own seed and split ("probe"), never from the world's val / test clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keye.data.world.generate import WorldConfig, frame_objects, make_clip
from keye.data.world.scene import where

PROBE_SEED = 1_000_003


@dataclass(frozen=True)
class ProbeItem:
    id: str
    question: str  # the listing, then the question
    answer: str
    kind: str  # "color" or "shape"
    objects: int  # objects in the frame (1-3)
    first_listed: str  # the first-listed guess


def lookup_probe(n: int = 400, seed: int = PROBE_SEED) -> list[ProbeItem]:
    """``n`` lookup questions, half about colours and half about shapes, deterministic in ``seed``."""
    config = WorldConfig(seed=seed)
    rng = np.random.default_rng(seed)
    items: list[ProbeItem] = []
    clip_index = 0
    while len(items) < n:
        clip, _ = make_clip(config, "probe", f"probe-{clip_index:05d}")
        clip_index += 1
        count = int(rng.integers(1, 4))  # 1, 2 or 3 objects, equally often
        frames = [seen for _, seen in frame_objects(clip) if len(seen) == count]
        if not frames:
            continue
        seen = frames[rng.integers(len(frames))]
        objs = [obj for _, _, obj in seen]
        listing = ", ".join(f"{obj.name} {where(x, y, clip.width, clip.height)}" for x, y, obj in seen)
        kind = "color" if len(items) % 2 == 0 else "shape"
        key = (lambda o: o.shape) if kind == "color" else (lambda o: o.color)
        unique = [o for o in objs if sum(key(p) == key(o) for p in objs) == 1]
        if not unique:
            continue
        target = unique[rng.integers(len(unique))]
        if kind == "color":
            question, answer, first = f"What colour is the {target.shape}?", target.color, objs[0].color
        else:
            question, answer, first = f"What shape is the {target.color} object?", target.shape, objs[0].shape
        items.append(ProbeItem(f"lookup-{len(items):04d}", f"{listing}. {question}", answer, kind, len(objs), first))
    return items
