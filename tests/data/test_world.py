"""The synthetic world: ground truth checked against the pixels, determinism, resume, splits.

Every answer check reads the rendered (or decoded) frames and recomputes the fact from pixels by
colour segmentation, never from the spec the answer was derived from.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from keye.data.world import QUESTION_KINDS, SceneConfig, WorldConfig, generate_world, guess_baselines, make_clip, render_clip
from keye.data.world.scene import BACKGROUNDS, COLORS, where
from keye.errors import ConfigError

SCENE = SceneConfig(height=64, width=64, fps=4.0, durations=(4.0, 5.0))
CONFIG = WorldConfig(seed=7, scene=SCENE, clips={"train": 8, "val": 3, "test": 3}, questions_per_clip=8, zoom_per_clip=2)

_NAMES = list(COLORS) + list(BACKGROUNDS)
_PALETTE = np.array([*COLORS.values(), *BACKGROUNDS.values()], dtype=np.int32)
_N_OBJ = len(COLORS)


# ---------------------------------------------------------------- pixel analysis (independent of the spec)


def segment(frames_THWC: np.ndarray) -> np.ndarray:
    """(T, H, W) index into _NAMES of the nearest palette colour."""
    d = ((frames_THWC[..., None, :].astype(np.int32) - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def shape_of(mask_HW: np.ndarray) -> str:
    ys, xs = np.nonzero(mask_HW)
    fill = mask_HW.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.92 else "circle" if fill > 0.66 else "triangle"


def shot_starts(labels_THW: np.ndarray) -> list[int]:
    """Frames where every pixel that is background in both frames changed background colour."""
    starts = [0]
    for t in range(1, len(labels_THW)):
        a, b = labels_THW[t - 1], labels_THW[t]
        both_bg = (a >= _N_OBJ) & (b >= _N_OBJ)
        if both_bg.sum() and (a[both_bg] != b[both_bg]).mean() > 0.9:
            starts.append(t)
    return starts


class PixelFacts:
    """Per shot and object colour: shape, direction, entry and first frame, from pixels only."""

    def __init__(self, frames_THWC: np.ndarray, grid_step: int):
        self.frames = frames_THWC
        self.labels = segment(frames_THWC)
        T, H, W = self.labels.shape
        self.starts = shot_starts(self.labels)
        bounds = [*self.starts, T]
        self.objects: dict[tuple[int, str], dict] = {}
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            for c, color in enumerate(COLORS):
                tracks = []
                for t in range(a, b):
                    mask = self.labels[t] == c
                    if mask.sum() < 4:
                        tracks.append(None)
                        continue
                    ys, xs = np.nonzero(mask)
                    inside = ys.min() > 0 and xs.min() > 0 and ys.max() < H - 1 and xs.max() < W - 1
                    tracks.append(((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, inside, mask))
                if all(tr is None for tr in tracks):
                    continue
                full = [(a + i, tr) for i, tr in enumerate(tracks) if tr is not None and tr[2]]
                (_, first), (_, last) = full[0], full[-1]
                dx, dy = last[0] - first[0], last[1] - first[1]
                if max(abs(dx), abs(dy)) < 1:
                    motion = "still"
                elif abs(dx) > abs(dy):
                    motion = "right" if dx > 0 else "left"
                else:
                    motion = "down" if dy > 0 else "up"
                starts_full, ends_full = tracks[0] is not None and tracks[0][2], tracks[-1] is not None and tracks[-1][2]
                entry = "stays" if starts_full and ends_full else "enters" if ends_full else "leaves"
                first_seen = a + next(i for i, tr in enumerate(tracks) if tr is not None)
                self.objects[(s, color)] = {
                    "shape": shape_of(full[len(full) // 2][1][3]),
                    "motion": motion,
                    "entry": entry,
                    "first": first_seen,
                }

    def find(self, name: str) -> dict:
        color, shape = name.split()
        hits = [o for (s, c), o in self.objects.items() if c == color and o["shape"] == shape]
        assert len(hits) == 1, f"{name}: {len(hits)} matches in the pixels"
        return hits[0]

    def has_pause(self) -> bool:
        bounds = [*self.starts, len(self.frames)]
        return any(
            np.array_equal(self.frames[t], self.frames[t + 1]) for a, b in zip(bounds[:-1], bounds[1:]) for t in range(a, b - 1)
        )


def _pixel_answer(row: dict, facts: PixelFacts) -> str:
    """Recompute the row's answer from the pixels alone."""
    q, kind = row["question"], row["kind"]
    objs = facts.objects
    if kind == "color":
        shape = re.match(r"What colour is the (\w+)\?", q)[1]
        (color,) = {c for (s, c), o in objs.items() if o["shape"] == shape}
        return color
    if kind == "shape":
        color = re.match(r"What shape is the (\w+) object\?", q)[1]
        (shape,) = {o["shape"] for (s, c), o in objs.items() if c == color}
        return shape
    if kind == "count":
        return str(len(objs))
    if kind == "motion":
        return facts.find(re.match(r"Which way does the (\w+ \w+) move", q)[1])["motion"]
    if kind == "entry":
        return facts.find(re.match(r"Does the (\w+ \w+) enter", q)[1])["entry"]
    if kind == "cuts":
        return str(len(facts.starts) - 1)
    if kind == "pause":
        return "yes" if facts.has_pause() else "no"
    if kind == "order":
        a, b = (facts.find(o.removeprefix("the "))["first"] for o in row["options"])
        return "A" if a < b else "B"
    if kind == "mover_color":
        target = "still" if "does not move" in q else q.rstrip("?").split()[-1]
        (color,) = {c for (s, c), o in objs.items() if o["motion"] == target}
        return color
    if kind == "mover_count":
        direction = q.rstrip("?").split()[-1]
        return str(sum(o["motion"] == direction for o in objs.values()))
    raise AssertionError(f"no pixel check for kind {kind}")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, CONFIG, progress=False)
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- tests


def test_moved_names_each_objects_motion_from_its_track():
    from keye.data.world.scene import STILL, moved

    seen = set()
    for i in range(30):
        clip, _ = make_clip(CONFIG, "train", f"train-{i:05d}")
        for s, obj in clip.objects:
            track = clip.shots[s].centers_T2(obj, clip.fps)
            dx, dy = track[-1] - track[0]
            assert moved(dx, dy, still=0.5) == obj.motion, (clip.clip_id, obj)
            seen.add(obj.motion)
    assert STILL in seen and len(seen) == 5
    assert moved(3.0, -0.4, still=0.5) == "right" and moved(0.2, -0.3, still=0.5) == STILL


def test_rendered_objects_sit_where_the_spec_says():
    checked = 0
    for i in range(12):
        clip, _ = make_clip(CONFIG, "train", f"train-{i:05d}")
        labels = segment(render_clip(clip))
        for s, shot in enumerate(clip.shots):
            for obj in shot.objects:
                c = list(COLORS).index(obj.color)
                xy = shot.centers_T2(obj, clip.fps)
                for t in np.flatnonzero(clip.fully_visible_T(s, obj)):
                    ys, xs = np.nonzero(labels[shot.start + t] == c)
                    assert abs((xs.min() + xs.max()) / 2 - xy[t, 0]) <= 1.0
                    assert abs((ys.min() + ys.max()) / 2 - xy[t, 1]) <= 1.0
                    assert shape_of(labels[shot.start + t] == c) == obj.shape
                    checked += 1
    assert checked > 100


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_answer_is_true_to_the_pixels(world, split):
    rows = _rows(world / f"{split}.jsonl")
    kinds = Counter(r["kind"] for r in rows)
    facts = {}
    for row in rows:
        if row["clip_id"] not in facts:
            clip, _ = make_clip(CONFIG, split, row["clip_id"])
            facts[row["clip_id"]] = PixelFacts(render_clip(clip), clip.grid_step)
        assert _pixel_answer(row, facts[row["clip_id"]]) == row["answer"], row
    assert len(kinds) >= 5


def test_all_kinds_are_emitted_and_checked(tmp_path):
    config = WorldConfig(seed=3, scene=SCENE, clips={"train": 30, "val": 0, "test": 0}, questions_per_clip=6, zoom_per_clip=0)
    generate_world(tmp_path, config, progress=False)
    rows = _rows(tmp_path / "train.jsonl")
    assert {r["kind"] for r in rows} == set(config.kinds)
    facts = {}
    for row in rows:
        if row["clip_id"] not in facts:
            clip, _ = make_clip(config, "train", row["clip_id"])
            facts[row["clip_id"]] = PixelFacts(render_clip(clip), clip.grid_step)
        assert _pixel_answer(row, facts[row["clip_id"]]) == row["answer"], row


def test_dense_conversations_ask_every_kind_and_are_true_to_the_pixels(world):
    rows = _rows(world / "train_dense.jsonl")
    assert [r["clip_id"] for r in rows] == [f"train-{i:05d}" for i in range(8)]  # train clips only, one each
    single = {r["clip_id"]: r for r in _rows(world / "train.jsonl")}
    for row in rows:
        clip, _ = make_clip(CONFIG, "train", row["clip_id"])
        facts = PixelFacts(render_clip(clip), clip.grid_step)
        turns = row["messages"]
        assert [m["role"] for m in turns] == ["user", "assistant"] * len(row["kinds"])
        assert turns[0]["content"].startswith("<video>") and "".join(m["content"] for m in turns).count("<video>") == 1
        assert len(set(row["kinds"])) == len(row["kinds"]) >= 4  # every kind at most once, most kinds asked
        for kind, ask, answer in zip(row["kinds"], turns[::2], turns[1::2]):
            question = ask["content"].removeprefix("<video>")
            options = re.findall(r"^[AB]\. (.*)$", question, flags=re.M) or None
            qa = {"kind": kind, "question": question.split("\n")[0] if options else question, "options": options}
            assert _pixel_answer(qa, facts) == answer["content"], (row["id"], question)
        assert single[row["clip_id"]]["videos"] == row["videos"]


def _grid_cell(x: float, y: float, size: int) -> str:
    return f"{('top', 'middle', 'bottom')[min(2, int(3 * y / size))]} {('left', 'centre', 'right')[min(2, int(3 * x / size))]}"


def test_frame_listing_names_what_each_sampled_frame_shows(world):
    rows = _rows(world / "frames.jsonl")
    assert len(rows) == 8
    for row in rows:
        clip, _ = make_clip(CONFIG, "train", row["clip_id"])
        labels = segment(render_clip(clip))
        entries = re.findall(r"(\d+\.\d)s: ([^.]*)\.", row["messages"][1]["content"])
        assert [float(t) for t, _ in entries] == [f / clip.fps for f in range(0, clip.num_frames, clip.grid_step)]
        for t, listing in entries:
            frame = labels[int(round(float(t) * clip.fps))]
            listed = {} if listing == "nothing" else dict(item.split(" ", 1) for item in listing.split(", "))
            for c, color in enumerate(COLORS):
                mask = frame == c
                if color in listed:  # listed: visible, of that shape when whole, in that grid cell
                    shape, cell = listed[color].split(" ", 1)
                    ys, xs = np.nonzero(mask)
                    assert len(xs), (row["id"], t, color)
                    inside = xs.min() > 0 and ys.min() > 0 and xs.max() < clip.width - 1 and ys.max() < clip.height - 1
                    if inside:
                        assert shape_of(mask) == shape
                        cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2  # within 1 px of the spec's centre
                        assert cell in {_grid_cell(cx + dx, cy + dy, clip.width) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
                else:  # not listed: at most a sliver of an object whose centre is outside
                    assert mask.sum() <= (clip.width * 0.12) ** 2 * 2.5, (row["id"], t, color)


def test_listing_backgrounds_name_each_frames_background_in_the_listing_and_change_nothing_else(tmp_path, world):
    import dataclasses
    import os
    import shutil

    import torch

    from keye.data.world.words import listing_mentions, scored_words
    from keye.processing import load_nano_processor

    for media in ("videos", "crops"):  # kept media is not re-encoded
        shutil.copytree(world / media, tmp_path / media, copy_function=os.link)
    generate_world(tmp_path, dataclasses.replace(CONFIG, listing_backgrounds=True), progress=False)
    for name in ["train.jsonl", "val.jsonl", "test.jsonl", "train_zoom.jsonl", "test_zoom.jsonl", "captions.jsonl",
                 "train_dense.jsonl", "clips.jsonl"]:
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes(), name
    tokenizer = load_nano_processor().tokenizer
    for plain, row in zip(_rows(world / "frames.jsonl"), _rows(tmp_path / "frames.jsonl"), strict=True):
        assert {k: v for k, v in row.items() if k != "messages"} == {k: v for k, v in plain.items() if k != "messages"}
        content = row["messages"][1]["content"]
        entries = re.findall(r"(\d+\.\d)s ([a-z /]+): ([^.]*)\.", content)
        assert [[float(t), text] for t, _, text in entries] == row["frame_texts"]
        assert [background for _, background, _ in entries] == row["frame_backgrounds"]
        clip, _ = make_clip(CONFIG, "train", row["clip_id"])
        labels = segment(render_clip(clip))
        for t, background, _ in entries:  # the colours named cover the frame's background pixels
            frame = labels[int(round(float(t) * clip.fps))]
            counts = Counter(_NAMES[i] for i in frame.flatten().tolist() if i >= _N_OBJ)
            assert {name for name, n in counts.items() if n > frame.size // 10} == set(background.split("/"))
        # the scored words line up with the mentions: a background is "first" at the clip's start and at a cut
        words = scored_words(tokenizer, torch.tensor(tokenizer(content, add_special_tokens=False)["input_ids"]))
        mentions = listing_mentions([tuple(p) for p in row["frame_texts"]], row["frame_backgrounds"])
        assert len(words) == len(mentions)
        named = row["frame_backgrounds"]
        assert [m for (_, kind), m in zip(words, mentions) if kind == "background"] == [
            "first" if f == 0 or named[f] != named[f - 1] else "same"
            for f in range(len(named)) for _ in named[f].split("/")]


def test_dense_every_asks_each_question_of_a_kind_and_changes_nothing_else(tmp_path, world):
    """``dense_every``: the dense conversation asks every motion question the clip allows (one per object), true
    to the pixels, beside the other kinds once each; every other file is byte for byte the same."""
    import dataclasses
    import os
    import shutil

    for media in ("videos", "crops"):  # kept media is not re-encoded
        shutil.copytree(world / media, tmp_path / media, copy_function=os.link)
    config = dataclasses.replace(CONFIG, dense_every=["motion"])
    generate_world(tmp_path, config, progress=False)
    for name in ["train.jsonl", "val.jsonl", "test.jsonl", "train_zoom.jsonl", "captions.jsonl", "frames.jsonl",
                 "clips.jsonl"]:
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes(), name
    more = 0
    for plain, row in zip(_rows(world / "train_dense.jsonl"), _rows(tmp_path / "train_dense.jsonl"), strict=True):
        clip, _ = make_clip(CONFIG, "train", row["clip_id"])
        facts = PixelFacts(render_clip(clip), clip.grid_step)
        asked = [m["content"].removeprefix("<video>") for m in row["messages"][::2]]
        motion = [q for q, kind in zip(asked, row["kinds"]) if kind == "motion"]
        assert sorted(motion) == sorted(qa.question for qa in QUESTION_KINDS["motion"].generate(clip))
        assert sorted(k for k in row["kinds"] if k != "motion") == sorted(k for k in plain["kinds"] if k != "motion")
        for kind, question, answer in zip(row["kinds"], asked, row["messages"][1::2]):
            if kind == "motion":
                assert _pixel_answer({"kind": kind, "question": question}, facts) == answer["content"], question
        more += len(motion) - plain["kinds"].count("motion")
    assert more >= 4
    with pytest.raises(ConfigError, match="dense_every"):
        dataclasses.replace(CONFIG, kinds={"color": 1.0}, dense_every=["motion"])


def test_frame_boxes_bound_the_rendered_pixels_of_each_listed_object(world):
    """Each box holds every pixel of its object and is tight to them (within 2.5 px: a triangle's apex
    and the ends of its base are thinner than a pixel), clipped to the frame, in the listing's order."""
    for row in _rows(world / "frames.jsonl"):
        clip, _ = make_clip(CONFIG, "train", row["clip_id"])
        labels = segment(render_clip(clip))
        assert [t for t, _ in row["frame_boxes"]] == [t for t, _ in row["frame_texts"]]
        for (t, boxes), (_, listing) in zip(row["frame_boxes"], row["frame_texts"]):
            assert [b[0] for b in boxes] == ([] if listing == "nothing" else [" ".join(o.split()[:2]) for o in listing.split(", ")])
            frame = labels[int(round(t * clip.fps))]
            for phrase, x0, y0, x1, y1 in boxes:
                ys, xs = np.nonzero(frame == _NAMES.index(phrase.split()[0]))
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
                # pixel i is drawn when the shape holds the point x = i
                for lo, hi, n, size in ((x0, x1, xs, clip.width), (y0, y1, ys, clip.height)):
                    assert lo * size - 0.01 <= n.min() < lo * size + 2.5, (row["id"], t, phrase)
                    assert hi * size - 2.5 < n.max() <= hi * size + 0.01, (row["id"], t, phrase)


def test_reasoning_chains_speak_in_the_frame_listings_cells(world):
    """Chains place objects in the grid cells the frame listings use, never in pixel coordinates, and
    every placement (and every 'further right' / 'lower' ...) agrees with the listing at that time."""
    from keye.data.world.generate import frame_texts

    rows_, cols_ = ("top", "middle", "bottom"), ("left", "centre", "right")
    steps = {"further right": (0, 1), "further left": (0, -1), "lower": (1, 0), "higher": (-1, 0)}
    name, cell, t = r"(\w+ \w+)", r"(\w+ \w+)", r"(\d+\.\d)s"
    checked = moved = 0
    for split in ("train", "val", "test"):
        for row in _rows(world / f"{split}.jsonl"):
            text = row["cot"] + " ".join(row["hints"])
            assert not re.search(r"\(\d+, \d+\)|\bx grows|\by grows", text), text
            clip, _ = make_clip(CONFIG, split, row["clip_id"])
            listed = {round(sec, 1): listing for sec, listing in frame_texts(clip)}
            places = re.findall(rf"[Tt]he {name} is in the {cell} at {t}", text)
            places += [(n, c, s) for s, n, c in re.findall(rf"At {t} the {name} is in the {cell}", text)]
            for what, where, sec in places:
                assert f"{what} {where}" in listed[float(sec)], (row["id"], what, where, sec)
                checked += 1
            for what, a, sa, shift, b, sb in re.findall(rf"[Tt]he {name} is in the {cell} at {t} and ([a-z ]+), in the {cell}, at {t}", text):
                assert f"{what} {b}" in listed[float(sb)] and float(sb) > float(sa)
                (ra, ca), (rb, cb) = [(rows_.index(c.split()[0]), cols_.index(c.split()[1])) for c in (a, b)]
                dr, dc = steps[shift]
                # the cell never moves against the stated direction, nor along the other axis
                assert (rb - ra) * dr >= 0 and (cb - ca) * dc >= 0 and (rb - ra if dr == 0 else cb - ca) == 0
                moved += 1
    assert checked > 50 and moved > 20


def test_decoded_mp4_keeps_colours_and_cuts(world):
    row = next(r for r in _rows(world / "train.jsonl"))
    clip, _ = make_clip(CONFIG, "train", row["clip_id"])
    with av.open(str(world / row["videos"][0])) as container:
        decoded_THWC = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded_THWC.shape == (clip.num_frames, clip.height, clip.width, 3)
    labels = segment(decoded_THWC)
    assert shot_starts(labels) == [shot.start for shot in clip.shots]
    for s, shot in enumerate(clip.shots):
        for obj in shot.objects:
            xy = shot.centers_T2(obj, clip.fps)
            for t in np.flatnonzero(clip.fully_visible_T(s, obj)):
                x, y = (int(round(v)) for v in xy[t])
                assert _NAMES[labels[shot.start + t, y, x]] == obj.color


def test_zoom_crops_show_the_answer(world):
    rows = _rows(world / "train_zoom.jsonl")
    assert rows
    for row in rows:
        crop_labels = segment(np.asarray(Image.open(world / row["images"][0]).convert("RGB"))[None])[0]
        present = [c for c in range(_N_OBJ) if (crop_labels == c).sum() > 10]
        assert len(present) == 1, row["id"]
        assert shape_of(crop_labels == present[0]) == row["answer"]
        # the crop really is the named quadrant of the frame at the named time
        clip, _ = make_clip(CONFIG, "train", row["clip_id"])
        frame = render_clip(clip)[int(round(row["crop"]["time"] * clip.fps))]
        x0, y0, x1, y1 = row["crop"]["box"]
        quadrant = re.search(r"in the (\w+-\w+) of the frame", row["question"])[1]
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        assert quadrant == f"{'top' if cy < clip.height / 2 else 'bottom'}-{'left' if cx < clip.width / 2 else 'right'}"
        assert (segment(frame[None])[0][y0:y1, x0:x1] == present[0]).any()
        assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
        assert row["messages"][-1]["content"].endswith(row["answer"])


def test_rows_are_complete_and_answers_in_their_space(world):
    info = json.loads((world / "world.json").read_text())
    for split in ("train", "val", "test"):
        for row in _rows(world / f"{split}.jsonl") + _rows(world / f"{split}_zoom.jsonl"):
            assert row["answer"] in info["answer_spaces"][row["kind"]]
            assert len(row["hints"]) == len(info["hint_levels"]) == 5
            assert row["hints"][-1].endswith(f"The answer is {row['answer']}.")
            assert row["reasoning"] == (row["kind"] in info["reasoning_kinds"])
            if row["reasoning"]:
                assert row["cot"]
            text = "".join(m["content"] for m in row["messages"])
            assert text.count("<video>") == len(row["videos"]) and text.count("<image>") == len(row.get("images", []))
            assert all((world / p).exists() for p in row["videos"] + row.get("images", []))
            if row["options"]:
                assert row["answer"] in "AB"[: len(row["options"])]
    assert info["counts"]["train"]["clips"] == 8


def test_splits_never_share_a_clip(world):
    clips = {split: {r["clip_id"] for r in _rows(world / f"{split}.jsonl") + _rows(world / f"{split}_zoom.jsonl")} for split in ("train", "val", "test")}
    assert not (clips["train"] & clips["val"]) and not (clips["train"] & clips["test"]) and not (clips["val"] & clips["test"])
    specs = [json.dumps(c["shots"], sort_keys=True) for c in _rows(world / "clips.jsonl")]
    assert len(set(specs)) == len(specs) == 14
    # captions.jsonl (alignment data) holds train clips only
    assert {r["split"] for r in _rows(world / "captions.jsonl")} == {"train"}
    assert {r["split"] for r in _rows(world / "captions_test.jsonl")} == {"test"}


def test_same_seed_same_bytes_and_resume(tmp_path, world):
    generate_world(tmp_path, CONFIG, progress=False, num_workers=2)  # parallel == serial, byte for byte
    names = ["train.jsonl", "val.jsonl", "test.jsonl", "train_zoom.jsonl", "captions.jsonl", "clips.jsonl", "world.json",
             "train_dense.jsonl", "frames.jsonl"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes(), name
    # resume: a missing clip is rewritten, existing media untouched, jsonl unchanged
    victim, kept = tmp_path / "videos/train-00001.mp4", tmp_path / "videos/train-00002.mp4"
    victim.unlink()
    kept_mtime = kept.stat().st_mtime_ns
    info = generate_world(tmp_path, CONFIG, progress=False)
    assert info["videos_written"] == 1 and victim.exists() and kept.stat().st_mtime_ns == kept_mtime
    assert (tmp_path / "train.jsonl").read_bytes() == (world / "train.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="different config"):
        generate_world(tmp_path, WorldConfig(seed=8, scene=SCENE, clips=CONFIG.clips), progress=False)
    # a world.json written before a config field existed resumes as that field's default
    info = json.loads((tmp_path / "world.json").read_text())
    del info["config"]["listing_backgrounds"]
    (tmp_path / "world.json").write_text(json.dumps(info))
    generate_world(tmp_path, CONFIG, progress=False)
    assert (tmp_path / "world.json").read_bytes() == (world / "world.json").read_bytes()


def test_another_seed_gives_another_world():
    a, _ = make_clip(CONFIG, "train", "train-00000")
    b, _ = make_clip(WorldConfig(seed=8, scene=SCENE), "train", "train-00000")
    assert a.to_json() != b.to_json()
    again, _ = make_clip(CONFIG, "train", "train-00000")
    assert again.to_json() == a.to_json()


def test_config_is_strict_and_round_trips():
    back = WorldConfig.from_dict(json.loads(json.dumps(CONFIG.to_dict(), sort_keys=True)))
    assert back == CONFIG
    # dict order must not matter: world.json is written with sorted keys and read back by tools
    for i in range(20):
        clip_id = f"train-{i:05d}"
        (a, qa), (b, qb) = make_clip(CONFIG, "train", clip_id), make_clip(back, "train", clip_id)
        assert a.to_json() == b.to_json()
    with pytest.raises(ConfigError, match="unknown key .sead."):
        WorldConfig.from_dict({"sead": 1})
    with pytest.raises(ConfigError, match="unknown key .scene.hieght."):
        WorldConfig.from_dict({"scene": {"hieght": 64}})
    with pytest.raises(ConfigError, match="unknown"):
        WorldConfig(kinds={"colour": 1.0})
    with pytest.raises(ConfigError, match="even"):
        WorldConfig(scene=SceneConfig(height=63))


def test_baselines_match_answer_spaces(world):
    info = json.loads((world / "world.json").read_text())
    rows = _rows(world / "train.jsonl")
    baselines = guess_baselines(rows, info["answer_spaces"])
    for kind, b in baselines.items():
        assert b["random"] == pytest.approx(1 / len(QUESTION_KINDS[kind].answer_space(SCENE)))
        n_major = Counter(r["answer"] for r in rows if r["kind"] == kind).most_common(1)[0][1]
        assert b["majority"] == pytest.approx(n_major / b["n"])


def test_cli_main_generates_and_reports(tmp_path, capsys):
    from keye.cli import main

    cfg = tmp_path / "world.json"
    cfg.write_text(json.dumps({"seed": 2, "scene": {"durations": [4.0]}, "questions_per_clip": 3}))
    assert main(["world", "--out", str(tmp_path / "w"), "--config", str(cfg), "clips.train=2", "clips.val=1", "clips.test=2",
                 "scene.height=32", "scene.width=32", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["test"]["clips"] == 2 and summary["counts"]["train"]["qa"] == 6
    assert len(_rows(tmp_path / "w/test.jsonl")) == 6
    assert all(b["majority"] >= b["random"] > 0 for b in summary["test_baselines"].values())
    cfg.write_text(json.dumps({"seed": 2, "colours": 3}))
    assert main(["world", "--out", str(tmp_path / "w2"), "--config", str(cfg)]) == 2
    assert "unknown key 'colours'" in capsys.readouterr().err
    assert main(["world", "--out", str(tmp_path / "w2"), "scene.heigth=32"]) == 2
    assert "unknown key 'scene.heigth'" in capsys.readouterr().err


def test_listing_mentions_mark_what_the_frame_before_already_says():
    from keye.data.world.words import listing_mentions

    texts = [(0.0, "red circle top left, blue square middle centre"),
             (0.5, "red circle top centre, blue square middle centre"),  # the circle moves one column
             (1.0, "nothing"),
             (1.5, "blue square middle centre, green triangle bottom right")]  # back after a gap: first again
    assert listing_mentions(texts) == (
        ["first"] * 8
        + ["same", "same", "same", "changed"] + ["same"] * 4
        + [None]
        + ["first"] * 8)


def test_listing_mentions_follow_each_object_through_the_worlds_listings(world):
    from keye.data.world.generate import frame_objects
    from keye.data.world.words import listing_mentions

    for row in _rows(world / "frames.jsonl"):
        clip, _ = make_clip(CONFIG, "train", row["clip_id"])
        mentions = iter(listing_mentions([tuple(t) for t in row["frame_texts"]]))
        before = {}
        for _, seen in frame_objects(clip):
            now = {obj.name: where(x, y, clip.width, clip.height).split() for x, y, obj in seen}
            for name, cell in now.items():
                expected = (["first"] * 4 if name not in before else
                            ["same", "same"] + ["same" if a == b else "changed" for a, b in zip(before[name], cell)])
                assert [next(mentions) for _ in range(4)] == expected, (row["id"], name)
            if not seen:
                assert next(mentions) is None
            before = now
        assert next(mentions, "end") == "end"
