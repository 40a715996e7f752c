"""Which visual tokens show the object a question asks about: the world's per-frame boxes (``frame_boxes``)
laid over a clip's merged-token grid, for the next-token stages' grounded attention (``grounding`` in
``keye.train.stages.lm``).

A question names its objects as "the red triangle", "the triangle" or "the red object"; every box whose
phrase fits one of those references is asked about, and a merged token is on it when its cell overlaps the box.
Questions that name no object ("How many objects move left?") have no targets.

A motion or entry question ("Which way does the red circle move: ...", "Does the red circle enter the
frame, ...") is answered by comparing where its object is in the first and the last sampled frame that show
it; its grounding also names those two frames' tokens (``first``, ``last``), the reads a mention head makes.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from keye.data.world.scene import COLORS, SHAPES

_REFERENCE = re.compile(rf"\bthe (?:({'|'.join(COLORS)}) )?({'|'.join(SHAPES)}|object)\b")
# the questions answered by where their object is in its first and last frames, by their wording; the text
# stage's mention heads read the same two kinds over listings
MENTION_QUESTIONS = {"motion": re.compile(r"Which way does the (\w+ \w+) move"),
                     "entry": re.compile(r"Does the (\w+ \w+) enter the frame")}
NEAREST = 0.26  # seconds: a sampled frame further than this from every listed frame has no boxes (the world lists 2 fps)


def asked_objects(question: str) -> list[tuple[str | None, str | None]]:
    """(colour or None, shape or None) of every object ``question`` names; "the object" alone names none."""
    refs = [(c, None if s == "object" else s) for c, s in _REFERENCE.findall(question.lower())]
    return [(c or None, s) for c, s in refs if c or s]


def scene_categories(clip, kind: str, question: str) -> dict[str, str]:
    """How crowded the scene is that ``question`` asks about, for scoring by it: ``shots``, the clip's shots,
    and, where the question names one object of the clip, ``company``: its kind and the objects in that
    object's shot ("motion, 3 objects"). A read that holds for an object alone and fails beside others shows
    there, where the kind's accuracy hides it."""
    out = {"shots": str(len(clip.shots))}
    refs = asked_objects(question)
    if len(refs) != 1:
        return out
    named = [shot for shot in clip.shots for obj in shot.objects if fits(obj.name, refs[0])]
    if len(named) == 1:
        n = len(named[0].objects)
        out["company"] = f"{kind}, {n} object{'s' if n != 1 else ''}"
    return out


def asks_track(question: str) -> bool:
    """Whether ``question`` is answered by the asked object's first and last frames (motion, entry)."""
    return any(pattern.match(question.lstrip()) for pattern in MENTION_QUESTIONS.values())


def fits(phrase: str, reference: tuple[str | None, str | None]) -> bool:
    """Whether a box's phrase ("red triangle") is the object ``reference`` names."""
    color, _, shape = phrase.partition(" ")
    return (reference[0] is None or reference[0] == color) and (reference[1] is None or reference[1] == shape)


def cells_on(boxes_K4: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h * w,) bool, raster order: the cells of an h x w grid over the frame (0-1 coordinates) that overlap
    any of the boxes (x0, y0, x1, y1)."""
    if not len(boxes_K4):
        return torch.zeros(h * w, dtype=torch.bool)
    y_H, x_W = torch.arange(h, dtype=torch.float64) / h, torch.arange(w, dtype=torch.float64) / w
    x0, y0, x1, y1 = boxes_K4.to(torch.float64).unbind(-1)
    cols_KW = (x_W[None] < x1[:, None]) & (x_W[None] + 1 / w > x0[:, None])
    rows_KH = (y_H[None] < y1[:, None]) & (y_H[None] + 1 / h > y0[:, None])
    return (rows_KH[:, :, None] & cols_KW[:, None, :]).any(0).flatten()


class Grounding(NamedTuple):
    """One answer's grounding: which of the conversation's questions it answers, the position whose
    next-token prediction is the answer's first token, and the positions of the visual tokens that show
    the objects its question names; for a motion or entry question seen in two frames or more, those of
    the first and of the last frame that shows its object (else empty)."""

    question: int
    position: int
    targets: list[int]
    first: tuple[int, ...] = ()
    last: tuple[int, ...] = ()


def labelled_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of labelled positions (not -100) in ``labels`` (L,): the assistant turns."""
    labelled = (labels != -100).int()
    edges = torch.diff(labelled, prepend=labelled.new_zeros(1), append=labelled.new_zeros(1))
    return list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()))


def subject_targets(input_ids: torch.Tensor, labels: torch.Tensor, questions: list[str], word_ids: dict[str, int]
                    ) -> list[tuple[int, tuple[int, ...]]]:
    """Per assistant turn that names its question's object (a chain's opening: "The only triangle ...", "The
    red circle is ..."), the position whose next-token prediction is the turn's first word of that name, and
    the positions of the question's words that name it. ``word_ids``: colour and shape word -> its one token
    id. Turns pair with ``questions`` (the user texts) in order, as in ``grounding_targets``; a conversation
    where they do not pair one to one gets none."""
    runs = labelled_runs(labels)
    if len(runs) != len(questions):
        return []
    out, before = [], 0
    for (start, end), question in zip(runs, questions):
        ids = {word_ids[w] for ref in asked_objects(question) for w in ref if w in word_ids}
        asked = tuple(i for i in range(before, start) if int(input_ids[i]) in ids)
        named = next((p for p in range(start, end) if int(labels[p]) in ids), None)
        if asked and named is not None:
            out.append((named - 1, asked))
        before = end
    return out


def grounding_targets(input_ids: torch.Tensor, labels: torch.Tensor, questions: list[str], video_token_id: int,
                      frame_grids: list[tuple[int, int]], timestamps: list[float], frame_boxes: list[list]
                      ) -> list[Grounding]:
    """Per answered question that names an object seen in some sampled frame, its ``Grounding``.

    ``input_ids`` / ``labels`` (L,): one rendered conversation of a single clip, its assistant turns labelled
    (each a run of labels, in the order of ``questions``, the user turns' texts); ``frame_grids``: each
    sampled frame's merged-token grid (h, w), whose tokens are the frame's ``video_token_id`` positions in
    raster order; ``timestamps``: the frames' seconds; ``frame_boxes``: [[seconds, [[phrase, x0, y0, x1, y1],
    ...]], ...] as the world writes them. A conversation whose labelled runs do not pair one to one with its
    questions is not grounded (empty list), since the positions could not be told apart."""
    video_L = torch.nonzero(input_ids == video_token_id).flatten().tolist()
    sizes = [h * w for h, w in frame_grids]
    if sum(sizes) != len(video_L) or len(timestamps) != len(frame_grids):
        raise ValueError(f"{len(video_L)} video tokens, but the frames' grids hold {sum(sizes)} "
                         f"({len(frame_grids)} grids, {len(timestamps)} timestamps)")
    starts = [start for start, _ in labelled_runs(labels)]
    if len(starts) != len(questions):
        return []
    listed = torch.tensor([float(t) for t, _ in frame_boxes], dtype=torch.float64)
    out, offset, per_frame = [], 0, []
    for (h, w), seconds, size in zip(frame_grids, timestamps, sizes):
        nearest = int((listed - seconds).abs().argmin()) if len(listed) else -1
        near = nearest >= 0 and abs(float(listed[nearest]) - seconds) <= NEAREST
        per_frame.append((offset, h, w, frame_boxes[nearest][1] if near else []))
        offset += size
    for q, (start, question) in enumerate(zip(starts, questions)):
        references = asked_objects(question)
        if not references:
            continue
        frames = []  # the asked objects' token positions, per sampled frame that shows them
        for offset, h, w, boxes in per_frame:
            asked = [b[1:] for b in boxes if any(fits(b[0], r) for r in references)]
            cells = torch.nonzero(cells_on(torch.tensor(asked, dtype=torch.float64).reshape(-1, 4), h, w)).flatten()
            if len(cells):
                frames.append(tuple(video_L[offset + c] for c in cells.tolist()))
        if frames:
            ends = (frames[0], frames[-1]) if asks_track(question) and len(frames) > 1 else ((), ())
            out.append(Grounding(q, start - 1, [t for cells in frames for t in cells], *ends))
    return out
