"""Write a synthetic world to disk: mp4 clips, crops, and jsonl conversations per split.

Layout of ``out_dir``::

    videos/<clip_id>.mp4          one clip per id (ids are "<split>-<index>", so splits never share a clip)
    crops/<qa_id>.png             zoomed crops for think-with-image questions
    train.jsonl val.jsonl test.jsonl               single-turn video QA rows (kinds from config.kinds)
    train_dense.jsonl             TRAIN clips only: one multi-turn conversation per clip asking one
                                  question of every kind the clip allows (dense QA for pretraining)
    frames.jsonl                  TRAIN clips only: per sampled frame, the objects in view and where
                                  (a grounding task: every answer token needs the pixels), with each
                                  object's box (``frame_boxes``) for stage 0's region term and each
                                  frame's background (``frame_backgrounds``), which the listing names
                                  with ``listing_backgrounds``
    train_zoom.jsonl val_zoom.jsonl test_zoom.jsonl think-with-image rows (video, then a crop image turn)
    captions.jsonl                captions of the TRAIN clips only, for alignment (no held-out leakage)
    captions_val.jsonl captions_test.jsonl         captions of the held-out clips, for caption eval
    clips.jsonl                   the scene spec of every clip (the ground truth the rows derive from)
    world.json                    config, answer space and reasoning flag per kind, hint levels, counts

Every row is ShareGPT / LLaMA-Factory "messages" + "videos" (+ "images") layout with
``<video>`` / ``<image>`` placeholders, paths relative to ``out_dir``, so the world reads like
real data downstream.

Determinism: each clip is drawn from a Generator seeded by (config.seed, clip id), so clips can
be generated in any order or in parallel, and the same config always gives byte-identical jsonl.
Resumable: media already on disk is kept; jsonl and world.json are rewritten atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from keye.data.world.questions import HINT_LEVELS, QA, QUESTION_KINDS, choose_question
from keye.data.world.render import object_box, render_clip, zoom_crop
from keye.data.world.scene import STILL, Clip, SceneConfig, sample_clip, where
from keye.config import from_dict
from keye.errors import ConfigError
from keye.fileio import atomic_path, atomic_write_text
from keye.video.writer import write_video

SPLITS = ("train", "val", "test")
THINK_WITH_IMAGE_KIND = "zoom"
CAPTION_PROMPT = "Describe the video."
FRAMES_PROMPT = "List the objects in each frame and where they are."
WORLD_VERSION = 4


def _default_kinds() -> dict[str, float]:
    return {name: 1.0 for name in QUESTION_KINDS if name != THINK_WITH_IMAGE_KIND}


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides the world's content. ``kinds`` weights the single-turn question kinds."""

    seed: int = 0
    scene: SceneConfig = field(default_factory=SceneConfig)
    clips: dict[str, int] = field(default_factory=lambda: {"train": 400, "val": 50, "test": 100})
    questions_per_clip: int = 4
    zoom_per_clip: int = 1
    kinds: dict[str, float] = field(default_factory=_default_kinds)
    crop_size: int = 112
    crf: int = 18
    # frame listings (frames.jsonl) name each frame's background ("0.5s navy: red circle top left."), as the
    # text base's listings do, so a decoder trained on them must see the background a cut changes
    listing_backgrounds: bool = False
    # kinds the dense conversation (train_dense.jsonl) asks every question of (each object's motion, ...), where
    # it asks the others once: more answers of a kind for the same vision pass; the single-turn rows and the
    # held-out splits do not change
    dense_every: list[str] = field(default_factory=list)

    def __post_init__(self):
        scene = self.scene
        if scene.height % 2 or scene.width % 2 or min(scene.height, scene.width) < 32:
            raise ConfigError(f"world scene size {scene.width}x{scene.height}: needs even sides >= 32 (H.264 yuv420p)")
        if scene.fps < 2.0:
            raise ConfigError(f"world scene.fps={scene.fps}: must be >= 2 so the 2 fps sampling grid exists")
        if set(self.clips) - set(SPLITS) or any(n < 0 for n in self.clips.values()):
            raise ConfigError(f"world clips={self.clips}: keys must be among {SPLITS}, counts >= 0")
        unknown = set(self.kinds) - (set(QUESTION_KINDS) - {THINK_WITH_IMAGE_KIND})
        if unknown:
            raise ConfigError(f"world kinds: unknown {sorted(unknown)}; known: {sorted(set(QUESTION_KINDS) - {THINK_WITH_IMAGE_KIND})}")
        if not any(w > 0 for w in self.kinds.values()) and self.questions_per_clip > 0:
            raise ConfigError("world kinds: at least one kind needs a positive weight")
        if set(self.dense_every) - set(self.kinds):
            raise ConfigError(f"world dense_every: {sorted(set(self.dense_every) - set(self.kinds))} not among the "
                              f"world's kinds {sorted(self.kinds)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorldConfig:
        """Strict (keye.config): unknown keys and mistyped values raise ConfigError naming the key."""
        return from_dict(cls, data, source="world")


def clip_ids(config: WorldConfig) -> list[tuple[str, str]]:
    """(split, clip_id) for every clip of the world."""
    return [(split, f"{split}-{i:05d}") for split in SPLITS for i in range(config.clips.get(split, 0))]


def _clip_streams(config: WorldConfig, clip_id: str) -> list[np.random.Generator]:
    """Independent Generators of one clip, seeded by (config.seed, clip id): the scene, its single-turn
    questions, its dense conversation. Spawn children are stable by index, so a stream added at the end
    leaves the earlier ones (and the rows drawn from them) unchanged."""
    digest = hashlib.sha256(f"{config.seed}/{clip_id}".encode()).digest()
    return [np.random.default_rng(seq) for seq in np.random.SeedSequence(int.from_bytes(digest[:16], "little")).spawn(3)]


def make_clip(config: WorldConfig, split: str, clip_id: str) -> tuple[Clip, np.random.Generator]:
    """The clip spec for an id and the Generator its questions are drawn from (independent streams,
    so changing the question mixture never changes the videos)."""
    scene_rng, question_rng, _ = _clip_streams(config, clip_id)
    return sample_clip(clip_id, split, config.scene, scene_rng), question_rng


def clips_of_rows(config: WorldConfig, rows: list[dict]) -> dict[str, Clip]:
    """Every clip the rows ask about, rebuilt once each from the world's config (clips are deterministic, so
    these are the clips the world wrote), keyed by clip id; a row's split is its own, or its id's prefix."""
    clips: dict[str, Clip] = {}
    for row in rows:
        clip_id = row["clip_id"]
        if clip_id not in clips:
            clips[clip_id] = make_clip(config, row.get("split") or clip_id.split("-")[0], clip_id)[0]
    return clips


def dense_rng(config: WorldConfig, clip_id: str) -> np.random.Generator:
    """The stream the dense conversation's questions are drawn from."""
    return _clip_streams(config, clip_id)[2]


def answer_spaces(config: WorldConfig) -> dict[str, list[str]]:
    return {name: kind.answer_space(config.scene) for name, kind in QUESTION_KINDS.items()}


# ---------------------------------------------------------------- rows


def _video_rel(clip_id: str) -> str:
    return f"videos/{clip_id}.mp4"


def _qa_fields(clip: Clip, qa: QA, qa_id: str) -> dict:
    return {
        "id": qa_id,
        "clip_id": clip.clip_id,
        "split": clip.split,
        "kind": qa.kind,
        "reasoning": QUESTION_KINDS[qa.kind].reasoning,
        "question": qa.question,
        "answer": qa.answer,
        "options": qa.options,
        "cot": qa.cot,
        "hints": list(qa.hints),
    }


def qa_row(clip: Clip, qa: QA, qa_id: str) -> dict:
    """A single-turn video QA row; the assistant says the bare answer (non-thinking)."""
    return {
        **_qa_fields(clip, qa, qa_id),
        "messages": [{"role": "user", "content": f"<video>{qa.question}"}, {"role": "assistant", "content": qa.answer}],
        "videos": [_video_rel(clip.clip_id)],
    }


def zoom_row(clip: Clip, qa: QA, qa_id: str) -> dict:
    """Think-with-image: the assistant asks for a zoom, the crop comes back as an image turn, then it answers."""
    where = f"the {qa.crop['quadrant']} of the frame at {qa.crop['time']:.1f}s"
    return {
        **_qa_fields(clip, qa, qa_id),
        "crop": {k: qa.crop[k] for k in ("time", "box")},
        "messages": [
            {"role": "user", "content": f"<video>{qa.question}"},
            {"role": "assistant", "content": f"<think>I need a closer look at {where}.</think>"},
            {"role": "user", "content": "<image>"},
            {"role": "assistant", "content": f"<think>{qa.cot}</think>{qa.answer}"},
        ],
        "videos": [_video_rel(clip.clip_id)],
        "images": [f"crops/{qa_id}.png"],
    }


def dense_row(clip: Clip, qas: list[QA]) -> dict:
    """One conversation about a clip: the video once, then a question and its bare answer per turn.

    Video tokens dominate a sample's length, so asking every kind in one sequence gives many
    supervised answers for the price of one vision pass (LLaVA-style multi-turn QA).
    """
    messages = []
    for i, qa in enumerate(qas):
        messages.append({"role": "user", "content": ("<video>" if i == 0 else "") + qa.question})
        messages.append({"role": "assistant", "content": qa.answer})
    return {
        "id": f"{clip.clip_id}-dense",
        "clip_id": clip.clip_id,
        "split": clip.split,
        "kinds": [qa.kind for qa in qas],
        "messages": messages,
        "videos": [_video_rel(clip.clip_id)],
    }


def dense_questions(config: WorldConfig, clip: Clip, rng: np.random.Generator) -> list[QA]:
    """One question of every weighted kind the clip can ask (every question of the ``dense_every`` kinds), in a
    random order."""
    qas = []
    for name in sorted(k for k, w in config.kinds.items() if w > 0):
        if name in config.dense_every:
            qas += QUESTION_KINDS[name].generate(clip)
        elif (qa := choose_question(name, clip, rng)) is not None:
            qas.append(qa)
    return [qas[i] for i in rng.permutation(len(qas))]


def frame_objects(clip: Clip):
    """(seconds, [(x, y, object), ...]) for every 2 fps frame: the objects whose centre is inside the
    frame, in reading order (top to bottom, then left to right, by centre)."""
    tracks = [[shot.centers_T2(obj, clip.fps) for obj in shot.objects] for shot in clip.shots]  # once per object
    for frame in range(0, clip.num_frames, clip.grid_step):
        s = clip.shot_of(frame)
        shot = clip.shots[s]
        seen = []
        for obj, centers_T2 in zip(shot.objects, tracks[s]):
            x, y = centers_T2[frame - shot.start]
            if 0 <= x < clip.width and 0 <= y < clip.height:
                seen.append((x, y, obj))
        yield round(frame / clip.fps, 3), sorted(seen, key=lambda v: (v[1], v[0]))  # by row, then column


def frame_texts(clip: Clip) -> list[tuple[float, str]]:
    """(seconds, 'red circle top left, blue square middle centre') for every 2 fps frame.

    An object is listed while its centre is inside the frame, in reading order, so what comes first is
    decided by the pixels, not by how the spec was drawn; a frame showing none says 'nothing'.
    """
    return [(t, ", ".join(f"{obj.name} {where(x, y, clip.width, clip.height)}" for x, y, obj in seen) or "nothing")
            for t, seen in frame_objects(clip)]


def frame_boxes(clip: Clip) -> list[tuple[float, list[list]]]:
    """(seconds, [[phrase, x0, y0, x1, y1], ...]) for every 2 fps frame: the listed objects' boxes in
    coordinates relative to the frame (0-1), the grounding layout of region/phrase datasets. Stage 0's
    region term pairs each ViT patch with the phrase of the box its centre falls in."""
    out = []
    for t, seen in frame_objects(clip):
        boxes = []
        for x, y, obj in seen:
            box = object_box(obj.shape, x, y, obj.radius, clip.width, clip.height)
            x0, y0, x1, y1 = box  # a centre in view always leaves part of the object in view
            boxes.append([obj.name, round(x0 / clip.width, 4), round(y0 / clip.height, 4),
                          round(x1 / clip.width, 4), round(y1 / clip.height, 4)])
        out.append((t, boxes))
    return out


def frame_backgrounds(clip: Clip) -> list[str]:
    """Each 2 fps frame's background as the listings name it: "navy", or "navy/gray" for a two-tone one."""
    return [clip.shots[clip.shot_of(frame)].background.listed for frame in range(0, clip.num_frames, clip.grid_step)]


def frame_listing(texts: list[tuple[float, str]], backgrounds: list[str] | None = None) -> str:
    """``frame_texts`` as one answer: '0.0s: red circle top left, blue square middle centre. 0.5s: ...', or
    with ``backgrounds`` (one per frame) '0.0s navy: red circle top left, ...'."""
    if backgrounds is None:
        return " ".join(f"{t:.1f}s: {text}." for t, text in texts)
    return " ".join(f"{t:.1f}s {background}: {text}."
                    for (t, text), background in zip(texts, backgrounds, strict=True))


def _describe_row(clip: Clip, task: str, prompt: str, text: str, **extra) -> dict:
    """A single-turn row where the assistant describes the whole clip (captions, frame listings)."""
    return {
        "id": f"{clip.clip_id}-{task}",
        "clip_id": clip.clip_id,
        "split": clip.split,
        **extra,
        "messages": [{"role": "user", "content": f"<video>{prompt}"}, {"role": "assistant", "content": text}],
        "videos": [_video_rel(clip.clip_id)],
    }


def frames_row(clip: Clip, backgrounds: bool = False) -> dict:
    """The listing as a conversation, plus ``frame_texts`` ([seconds, text] per frame) and ``frame_boxes``
    for frame-level contrastive pretraining of the ViT (stage 0 pairs each frame with its own text, and
    each patch with the phrase of its box), and ``frame_backgrounds`` (one per frame). With ``backgrounds``
    the listing names each frame's background too."""
    texts, named = frame_texts(clip), frame_backgrounds(clip)
    return _describe_row(clip, "frames", FRAMES_PROMPT, frame_listing(texts, named if backgrounds else None),
                         frame_texts=[list(p) for p in texts], frame_backgrounds=named,
                         frame_boxes=[[t, boxes] for t, boxes in frame_boxes(clip)])


def caption(clip: Clip) -> str:
    """A templated description of every shot, its objects, motions, pause and cut."""
    scenes = []
    for s, shot in enumerate(clip.shots):
        things = ", ".join(_describe_object(o) for o in shot.objects)
        text = f"Scene {s + 1}: {shot.background.describe()} with {things}."
        if shot.pause:
            text += f" Everything stops from {shot.pause[0] / clip.fps:.1f}s to {(shot.pause[1] - clip.grid_step) / clip.fps:.1f}s."
        if s + 1 < len(clip.shots):
            text += f" At {clip.shots[s + 1].start / clip.fps:.1f}s the scene cuts."
        scenes.append(text)
    return " ".join(scenes)


_EDGE = {"left": "left", "right": "right", "up": "top", "down": "bottom"}
_OPPOSITE_EDGE = {"left": "right", "right": "left", "up": "bottom", "down": "top"}


def _describe_object(obj) -> str:
    if obj.motion == STILL:
        return f"a {obj.name} that stays still"
    if obj.entry == "enters":
        return f"a {obj.name} entering from the {_OPPOSITE_EDGE[obj.motion]} and moving {obj.motion}"
    if obj.entry == "leaves":
        return f"a {obj.name} moving {obj.motion} and leaving at the {_EDGE[obj.motion]}"
    return f"a {obj.name} moving {obj.motion}"


def caption_row(clip: Clip) -> dict:
    text = caption(clip)
    return _describe_row(clip, "caption", CAPTION_PROMPT, text, caption=text)


def questions_for_clip(config: WorldConfig, clip: Clip, rng: np.random.Generator) -> tuple[list[QA], list[QA]]:
    """(single-turn questions, think-with-image questions) of one clip, without repeats."""
    names = sorted(k for k, w in config.kinds.items() if w > 0)  # order-free, like the JSON it round-trips through
    weights = [config.kinds[k] for k in names]
    asked: set[str] = set()
    single: list[QA] = []
    while len(single) < config.questions_per_clip and names:
        p = np.asarray(weights, dtype=np.float64)
        i = int(rng.choice(len(names), p=p / p.sum()))
        qa = choose_question(names[i], clip, rng, exclude=asked)
        if qa is None:  # this clip cannot ask this kind (any more): drop it for this clip
            del names[i], weights[i]
            continue
        asked.add(qa.question)
        single.append(qa)
    zooms: list[QA] = []
    for _ in range(config.zoom_per_clip):
        qa = choose_question(THINK_WITH_IMAGE_KIND, clip, rng, exclude=asked)
        if qa is None:
            break
        asked.add(qa.question)
        zooms.append(qa)
    return single, zooms


# ---------------------------------------------------------------- writing


def _build_clip(args: tuple[WorldConfig, str, str, str]) -> dict:
    """Spec, rows and (if missing) media of one clip. Runs in a worker process when num_workers > 0."""
    config, split, clip_id, out_dir = args
    out = Path(out_dir)
    clip, rng = make_clip(config, split, clip_id)
    single, zooms = questions_for_clip(config, clip, rng)
    zoom_ids = [f"{clip_id}-z{i}" for i in range(len(zooms))]
    video_path = out / _video_rel(clip_id)
    crop_paths = [out / "crops" / f"{qid}.png" for qid in zoom_ids]
    wrote = False
    if not video_path.exists() or not all(p.exists() for p in crop_paths):
        frames_THWC = render_clip(clip)
        if not video_path.exists():
            write_video(video_path, frames_THWC, fps=clip.fps, crf=config.crf)
            wrote = True
        for qa, path in zip(zooms, crop_paths):
            if not path.exists():
                _write_png(path, zoom_crop(frames_THWC[qa.crop["frame"]], tuple(qa.crop["box"]), config.crop_size))
    return {
        "split": split,
        "clip": clip.to_json(),
        "qa": [qa_row(clip, qa, f"{clip_id}-q{i}") for i, qa in enumerate(single)],
        "zoom": [zoom_row(clip, qa, qid) for qa, qid in zip(zooms, zoom_ids)],
        "caption": caption_row(clip),
        "dense": dense_row(clip, dense_questions(config, clip, dense_rng(config, clip_id))),
        "frames": frames_row(clip, config.listing_backgrounds),
        "wrote_video": wrote,
    }


def _write_png(path: Path, image_HWC: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image_HWC).save(tmp, format="PNG")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def generate_world(out_dir: str | os.PathLike, config: WorldConfig | None = None, progress: bool = True, num_workers: int = 0) -> dict:
    """Generate (or finish generating) the world in ``out_dir``; returns world.json's content plus timing.

    Raises ConfigError when ``out_dir`` already holds a world made from a different config.
    """
    config = config or WorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world_json = out / "world.json"
    if world_json.exists():
        previous = json.loads(world_json.read_text())
        if _stored_config(previous) != config.to_dict():
            raise ConfigError(f"{world_json}: this folder holds a world made from a different config; use a new folder")

    jobs = [(config, split, clip_id, str(out)) for split, clip_id in clip_ids(config)]
    t0 = time.perf_counter()
    if num_workers > 0:
        with ProcessPoolExecutor(num_workers) as pool:
            results = list(_progress(pool.map(_build_clip, jobs, chunksize=4), len(jobs), progress))
    else:
        results = list(_progress(map(_build_clip, jobs), len(jobs), progress))
    seconds = time.perf_counter() - t0

    by_split = {split: [r for r in results if r["split"] == split] for split in SPLITS}
    for split, rs in by_split.items():
        _write_jsonl(out / f"{split}.jsonl", [row for r in rs for row in r["qa"]])
        _write_jsonl(out / f"{split}_zoom.jsonl", [row for r in rs for row in r["zoom"]])
        _write_jsonl(out / ("captions.jsonl" if split == "train" else f"captions_{split}.jsonl"), [r["caption"] for r in rs])
    # the dense and frame-listing tasks are training data: held-out clips keep only single-turn rows
    _write_jsonl(out / "train_dense.jsonl", [r["dense"] for r in by_split["train"]])
    _write_jsonl(out / "frames.jsonl", [r["frames"] for r in by_split["train"]])
    _write_jsonl(out / "clips.jsonl", [r["clip"] for r in results])
    info = {
        "version": WORLD_VERSION,
        "config": config.to_dict(),
        "answer_spaces": answer_spaces(config),
        "reasoning_kinds": sorted(k for k, kind in QUESTION_KINDS.items() if kind.reasoning),
        "hint_levels": list(HINT_LEVELS),
        "counts": {
            split: {"clips": len(rs), "qa": sum(len(r["qa"]) for r in rs), "zoom": sum(len(r["zoom"]) for r in rs)}
            for split, rs in by_split.items()
        },
    }
    atomic_write_text(world_json, json.dumps(info, indent=2, sort_keys=True) + "\n")
    written = sum(r["wrote_video"] for r in results)
    return {**info, "videos_written": written, "seconds": seconds, "clips_per_second": len(results) / max(seconds, 1e-9)}


def _stored_config(world_json: dict) -> dict | None:
    """The config a world.json records, read through WorldConfig so that one written before a field existed
    compares at that field's default; None when it does not parse."""
    try:
        return WorldConfig.from_dict(world_json.get("config", {})).to_dict()
    except ConfigError:
        return None


def _progress(iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="world clips", unit="clip")


def majority_shares(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """Per kind (sorted): the share of ``rows`` that always answering its most common answer gets right,
    and how many rows it has."""
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_kind[r["kind"]][r["answer"]] += 1
    return {k: (c.most_common(1)[0][1] / c.total(), c.total()) for k, c in sorted(by_kind.items())}


def guess_baselines(rows: list[dict], spaces: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Per kind: the accuracy of a uniform random guess over the answer space, and of always
    answering the most common answer in ``rows`` (the stronger of the two blind baselines)."""
    return {kind: {"random": 1.0 / len(spaces[kind]), "majority": share, "n": n}
            for kind, (share, n) in majority_shares(rows).items()}
