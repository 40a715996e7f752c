"""Tiny runs of every stage of the nano recipe: the loss fell, the trainable groups changed, the frozen
ones did not; recipe chaining, skipping and resuming; the big recipes' dry runs."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from keye.data.world import WorldConfig, generate_world
from keye.recipe import dry_run, estimate_stage, load_recipe, load_stage_config, run_recipe, run_stage
from keye.train.base import load_start
from keye.train.metrics import read_metrics
from keye.train.optim import group_of

ROOT = Path(__file__).resolve().parents[2]
NANO = ROOT / "pipelines" / "nano"
def tiny_overrides(**extra):
    """56 x 56 frames (4 LM tokens each), 8 samples, 6 constant-LR steps per stage."""
    base = ["video.min_pixels=3136", "video.max_pixels=3136", "run.micro_batch=4", "run.steps=6",
            "run.optim.warmup_steps=0", "run.optim.schedule=constant", "data.max_samples=8"]
    return base + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nano")
    world = WorldConfig.from_dict({"seed": 3, "clips": {"train": 8, "val": 0, "test": 2},
                                   "scene": {"height": 56, "width": 56}, "crop_size": 56})
    generate_world(root / "world", world, progress=False)
    return root


def state_of(run_root: Path, stage: str) -> dict[str, torch.Tensor]:
    """The saved model's state dict in our (fused-expert) layout, as the next stage loads it."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(run_root / stage / "model")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_groups(before: dict, after: dict) -> set[str]:
    return {group_of(k) for k in before if not torch.equal(before[k], after[k])}


def all_groups(state: dict) -> set[str]:
    return {group_of(k) for k in state}


def losses(run_root: Path, stage: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run_root / stage / "metrics.jsonl")]


@pytest.fixture(scope="module")
def chain(run_root):
    """Stages 0, 1, 2 run in order (each test below checks one)."""
    configs = {c.out: c for c in load_recipe(NANO, tiny_overrides()).chained()}
    configs["stage0_vit"].run.optim.lr = 5e-3
    configs["stage1_align"].data.max_samples = 8
    for name in ("stage0_vit", "stage1_align", "stage2_multitask"):
        run_stage(configs[name], run_root)
    return configs


def start_state(cfg, run_root):
    model, _ = load_start(cfg, run_root)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stage0_vit_trains_only_the_vision_tower(run_root, chain):
    start = start_state(chain["stage0_vit"], run_root)
    after = state_of(run_root, "stage0_vit")
    assert changed_groups(start, after) == {"vision"}
    assert not any(k.startswith("siglip_head") for k in after)  # the stage-local head is not saved
    curve = losses(run_root, "stage0_vit")
    assert curve[-1] < curve[0]


def test_stage0_on_frame_listings_pairs_each_frame_with_its_own_text(run_root, chain):
    import dataclasses

    import numpy as np

    from keye.data.collate import SampleBuilder
    from keye.data.world import make_clip
    from keye.data.world.generate import frame_backgrounds
    from keye.data.world.scene import COLORS
    from keye.errors import KeyeInputError
    from keye.processing import load_nano_processor, patchify
    from keye.train.stages.vit import FrameCaptionDataset

    cfg = chain["stage0_vit"]
    rows = [json.loads(line) for line in (run_root / "world" / "frames.jsonl").read_text().splitlines()]
    processor = load_nano_processor()
    builder = SampleBuilder(processor, cfg.video, base_dir=run_root / "world")
    dataset = FrameCaptionDataset(rows, builder, previous=True)
    assert len(dataset) == sum(len(r["frame_texts"]) for r in rows)
    assert FrameCaptionDataset(rows, builder)[0][4] is None  # no frame before unless asked for
    palette = np.array(list(COLORS.values()), dtype=np.int32)
    for index in range(0, len(dataset), 5):
        row, seconds, text = dataset.items[index]
        patches, grid, ids, regions, previous = dataset[index]
        clip = builder.vision(builder.messages(row)[0]).videos[0]
        (j,) = np.flatnonzero(np.isclose(clip.timestamps.numpy(), seconds))  # the 2 fps grid: exact times
        assert torch.equal(patches, patchify(clip.frames[j])[0]) and grid.tolist() == [[1, 4, 4]]
        assert torch.equal(previous, patchify(clip.frames[max(j - 1, 0)])[0])  # the frame before (none: its own)
        assert processor.tokenizer.decode(ids) == text
        # every colour the text names is on that frame (nearest palette colour, a few pixels at least)
        pixels = clip.frames[j].permute(1, 2, 0).reshape(-1, 3).numpy().astype(np.int32)
        nearest = ((pixels[:, None] - palette) ** 2).sum(-1)
        on_frame = {name for c, name in enumerate(COLORS) if ((nearest.argmin(1) == c) & (nearest.min(1) < 3000)).sum() >= 3}
        named = {name for name in COLORS if f"{name} " in text}
        assert named <= on_frame, (row["id"], seconds, text, on_frame)
    # siglip_backgrounds: each frame's text starts with its clip's background there
    config = WorldConfig.from_dict(json.loads((run_root / "world" / "world.json").read_text())["config"])
    backgrounds_first = FrameCaptionDataset(rows, builder, backgrounds=True)
    expected = [f"{background}: {text}" for row in rows
                for background, (_, text) in zip(frame_backgrounds(make_clip(config, "train", row["clip_id"])[0]),
                                                 row["frame_texts"], strict=True)]
    assert [text for _, _, text in backgrounds_first.items] == expected
    assert any(b != row["frame_backgrounds"][0] for row in rows for b in row["frame_backgrounds"])  # a cut
    with pytest.raises(KeyeInputError, match="siglip_backgrounds needs frame_backgrounds"):
        FrameCaptionDataset([{k: v for k, v in rows[0].items() if k != "frame_backgrounds"}], builder, backgrounds=True)
    # a short stage-0 run on them, backgrounds first: the loss falls and only the vision tower trains
    frames_cfg = dataclasses.replace(cfg, out="stage0_frames", siglip_backgrounds=True,
                                     data=dataclasses.replace(cfg.data, train=["world/frames.jsonl"]))
    run_stage(frames_cfg, run_root)
    curve = losses(run_root, "stage0_frames")
    assert curve[-1] < curve[0]
    assert changed_groups(start_state(frames_cfg, run_root), state_of(run_root, "stage0_frames")) == {"vision"}


def test_patch_regions_take_the_smallest_box_holding_each_patch_centre():
    from keye.train.stages.vit import patch_regions

    # a 2 x 4 patch grid; patch centres at x = 1/8, 3/8, 5/8, 7/8 and y = 1/4, 3/4
    regions = patch_regions([["gray square", 0.0, 0.0, 1.0, 1.0], ["red circle", 0.5, 0.0, 0.8, 0.5]], (1, 2, 4))
    assert regions.phrases == ["gray square", "red circle"]
    assert regions.patch_phrase_P.tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert patch_regions([], (1, 2, 2)).patch_phrase_P.tolist() == [-1] * 4


def test_frame_boxes_must_list_the_frames_of_frame_texts():
    from keye.errors import KeyeInputError
    from keye.train.stages.vit import FrameCaptionDataset

    row = {"id": "clip-7-frames", "frame_texts": [[0.0, "red circle top left"], [0.5, "nothing"]],
           "frame_boxes": [[0.0, [["red circle", 0.0, 0.0, 0.2, 0.2]]]]}
    with pytest.raises(KeyeInputError, match="'clip-7-frames'.*same frames"):
        FrameCaptionDataset([row], builder=None)
    row["frame_boxes"].append([0.5, []])
    assert FrameCaptionDataset([row], builder=None).boxes == [[["red circle", 0.0, 0.0, 0.2, 0.2]], []]


def test_listing_phrases_give_each_box_its_frame_text_entry_with_the_place_words():
    from keye.errors import KeyeInputError
    from keye.train.stages.vit import FrameCaptionDataset

    row = {"id": "clip-8-frames", "frame_texts": [[0.0, "red circle top left, blue square bottom right"],
                                                  [0.5, "nothing"]],
           "frame_boxes": [[0.0, [["red circle", 0.0, 0.0, 0.2, 0.2], ["blue square", 0.7, 0.7, 0.9, 0.9]]],
                           [0.5, []]]}
    assert FrameCaptionDataset([row], builder=None, phrases="listing").boxes == [
        [["red circle top left", 0.0, 0.0, 0.2, 0.2], ["blue square bottom right", 0.7, 0.7, 0.9, 0.9]], []]
    assert FrameCaptionDataset([row], builder=None).boxes[0][0][0] == "red circle"  # "box": the box's own
    row["frame_texts"][0][1] = "blue square bottom right, red circle top left"  # not the boxes' order
    with pytest.raises(KeyeInputError, match="'clip-8-frames'.*starting with the box's phrase"):
        FrameCaptionDataset([row], builder=None, phrases="listing")


def test_stage0_region_term_grounds_each_phrase_under_its_box(run_root, chain):
    """siglip_regions: the world's frame_boxes reach the loss (phrases per patch match the boxes), the
    region loss falls, only the vision tower trains; rows without boxes are a ConfigError."""
    import dataclasses

    from keye.errors import ConfigError
    from keye.processing import load_nano_processor
    from keye.train.stages.vit import siglip_collate

    cfg = dataclasses.replace(chain["stage0_vit"], out="stage0_regions", siglip_regions=1.0,
                              data=dataclasses.replace(chain["stage0_vit"].data, train=["world/frames.jsonl"]))
    run_stage(cfg, run_root)
    rows = read_metrics(run_root / "stage0_regions" / "metrics.jsonl")
    assert rows[-1]["region_loss"] < rows[0]["region_loss"]
    assert changed_groups(start_state(cfg, run_root), state_of(run_root, "stage0_regions")) == {"vision"}

    from keye.data.collate import SampleBuilder
    from keye.train.stages.vit import FrameCaptionDataset

    frames = [json.loads(line) for line in (run_root / "world" / "frames.jsonl").read_text().splitlines()]
    processor = load_nano_processor()
    dataset = FrameCaptionDataset(frames, SampleBuilder(processor, cfg.video, base_dir=run_root / "world"))
    batch = siglip_collate([dataset[i] for i in range(6)], tokenizer=processor.tokenizer)
    phrases = [processor.tokenizer.decode(batch["phrase_ids"][a:b])
               for a, b in zip(batch["phrase_offsets"].tolist(), [*batch["phrase_offsets"][1:].tolist(), len(batch["phrase_ids"])])]
    P = 4  # 56 x 56 frames: 4 x 4 patches
    for i in range(6):
        boxes = dataset.boxes[i]
        for j, k in enumerate(batch["patch_phrase"][i * P * P:(i + 1) * P * P].tolist()):
            cx, cy = (j % P + 0.5) / P, (j // P + 0.5) / P
            holding = [b for b in boxes if b[1] <= cx < b[3] and b[2] <= cy < b[4]]
            assert (k == -1) == (not holding)
            if holding:
                assert phrases[k] == min(holding, key=lambda b: (b[3] - b[1]) * (b[4] - b[2]))[0]

    # the world's listings line up with its boxes: each phrase gains its object's row and column words
    from keye.data.world.scene import COLUMNS, ROWS

    placed = FrameCaptionDataset(frames, None, phrases="listing").boxes
    assert [[b[1:] for b in f] for f in placed] == [[b[1:] for b in f] for f in dataset.boxes]
    for listed, plain in zip(placed, dataset.boxes):
        for (phrase, *_), (name, *_) in zip(listed, plain):
            row, column = phrase.removeprefix(name + " ").split()
            assert row in ROWS and column in COLUMNS

    bare = [{k: v for k, v in r.items() if k != "frame_boxes"} for r in frames]
    (run_root / "world" / "frames_noboxes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bare))
    with pytest.raises(ConfigError, match="frame_boxes"):
        run_stage(dataclasses.replace(cfg, out="stage0_noboxes",
                                      data=dataclasses.replace(cfg.data, train=["world/frames_noboxes.jsonl"])), run_root)


def test_box_motions_say_how_each_object_moved_since_the_frame_before():
    from keye.train.stages.vit import MOTION_PHRASES, FrameCaptionDataset, box_motions

    before = [["red circle", 0.1, 0.1, 0.3, 0.3], ["blue square", 0.5, 0.5, 0.7, 0.7], ["green star", 0.0, 0.0, 0.1, 0.1]]
    now = [["red circle", 0.2, 0.12, 0.4, 0.32], ["blue square", 0.5, 0.4, 0.7, 0.6], ["green star", 0.0, 0.0, 0.1, 0.1],
           ["cyan disc", 0.8, 0.8, 0.9, 0.9]]
    assert [MOTION_PHRASES[k] if k >= 0 else None for k in box_motions(now, before)] == [
        "moves right", "moves up", "stays still", None]
    # a cut (the background changes) starts a shot: an object of the same name there is new, not moved
    row = {"id": "clip-9-frames", "frame_texts": [[0.0, "red circle"], [0.5, "red circle"], [1.0, "red circle"]],
           "frame_backgrounds": ["navy", "navy", "gray"],
           "frame_boxes": [[0.0, [["red circle", 0.0, 0.0, 0.2, 0.2]]], [0.5, [["red circle", 0.0, 0.1, 0.2, 0.3]]],
                           [1.0, [["red circle", 0.5, 0.5, 0.7, 0.7]]]]}
    assert FrameCaptionDataset([row], None, motion=True).motions == [[-1], [MOTION_PHRASES.index("moves down")], [-1]]


def test_stage0_motion_term_trains_the_frame_difference(run_root, chain):
    """frame_difference + siglip_motion: the tower gains the zero difference embedding and trains it with the
    rest of the tower, the motion term falls, each patch's target is its box's move, and the saved model
    carries the embedding; the term without the difference is a ConfigError."""
    import dataclasses

    from keye.data.collate import SampleBuilder
    from keye.errors import ConfigError
    from keye.processing import load_nano_processor
    from keye.train.stages.vit import FrameCaptionDataset, VitConfig, siglip_collate

    cfg = dataclasses.replace(chain["stage0_vit"], out="stage0_motion", frame_difference=True, siglip_motion=1.0,
                              data=dataclasses.replace(chain["stage0_vit"].data, train=["world/frames.jsonl"]))
    run_stage(cfg, run_root)
    rows = read_metrics(run_root / "stage0_motion" / "metrics.jsonl")
    assert rows[-1]["motion_loss"] < rows[0]["motion_loss"]
    after = state_of(run_root, "stage0_motion")
    assert after["visual.vision_model.embeddings.difference_embedding.weight"].abs().max() > 0  # from zero
    assert changed_groups(start_state(cfg, run_root), after) == {"vision"}

    frames = [json.loads(line) for line in (run_root / "world" / "frames.jsonl").read_text().splitlines()]
    processor = load_nano_processor()
    dataset = FrameCaptionDataset(frames, SampleBuilder(processor, cfg.video, base_dir=run_root / "world"), motion=True)
    batch = siglip_collate([dataset[i] for i in range(8)], tokenizer=processor.tokenizer)
    P = 16  # 56 x 56 frames: 4 x 4 patches
    for i in range(8):
        regions = batch["patch_phrase"][i * P:(i + 1) * P]
        local = dataset[i][3].patch_phrase_P  # each patch's box in its own frame
        expected = [dataset.motions[i][k] if k >= 0 else -1 for k in local.tolist()]
        assert batch["patch_motion"][i * P:(i + 1) * P].tolist() == expected
        assert ((regions == -1) == (local == -1)).all()
    assert (batch["patch_motion"] >= 0).any()
    with pytest.raises(ConfigError, match="needs frame_difference"):
        VitConfig(siglip_motion=1.0)


def test_stage0_mixes_frame_listings_and_clip_captions(run_root):
    from keye.data.collate import SampleBuilder
    from keye.errors import ConfigError
    from keye.video import VideoOptions
    from keye.processing import load_nano_processor
    from keye.train.stages.vit import siglip_pairs

    world = run_root / "world"
    frames = [json.loads(line) for line in (world / "frames.jsonl").read_text().splitlines()]
    captions = [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines()]
    builder = SampleBuilder(load_nano_processor(), VideoOptions(fps=2.0, slow_fast=False, min_pixels=3136, max_pixels=3136),
                            base_dir=world)
    pairs = siglip_pairs(frames[:2] + captions[:3], builder, frames=2, files=["mixed"], previous=True)
    assert len(pairs) == sum(len(r["frame_texts"]) for r in frames[:2]) + 3
    patches, grids, ids, regions, previous = pairs[len(pairs) - 1]  # the last caption row: 2 frames of the clip, its caption
    assert len(grids) == 2 and builder.processor.tokenizer.decode(ids) == captions[2]["caption"]
    assert torch.equal(previous, patches)  # a caption's frames are no sequence: no difference
    assert regions.phrases == [] and (regions.patch_phrase_P == -1).all() and len(regions.patch_phrase_P) == len(patches)
    bare = {k: v for k, v in captions[0].items() if k != "caption"}
    with pytest.raises(ConfigError, match=str(bare["id"])):
        siglip_pairs(frames[:1] + [bare], builder, frames=2, files=["mixed"])


def test_stage1_align_trains_only_the_projector(run_root, chain):
    before = state_of(run_root, "stage0_vit")
    after = state_of(run_root, "stage1_align")
    assert changed_groups(before, after) == {"projector"}
    curve = losses(run_root, "stage1_align")
    assert curve[-1] < curve[0]


def test_stage2_multitask_trains_everything(run_root, chain):
    before = state_of(run_root, "stage1_align")
    after = state_of(run_root, "stage2_multitask")
    assert changed_groups(before, after) == all_groups(before) == {"vision", "projector", "lm"}
    curve = losses(run_root, "stage2_multitask")
    assert curve[-1] < curve[0]
    assert (run_root / "stage2_multitask" / "loss.png").stat().st_size > 0
    saved = yaml.safe_load((run_root / "stage2_multitask" / "config.yaml").read_text())
    assert saved["init_from"] == "stage1_align" and saved["run"]["steps"] == 6


def test_stage3_anneal_averages_its_seed_runs_and_extends_rope(run_root, chain):
    cfg = load_stage_config(NANO / "stage3_anneal.yaml", tiny_overrides(**{"run.steps": 2}))
    cfg.init_from = "stage2_multitask"
    run_stage(cfg, run_root)
    seeds = [load_file(next((run_root / "stage3_anneal" / f"seed_{s}" / "checkpoints").glob("step_*")) / "model.safetensors")
             for s in cfg.merge_seeds]
    merged = state_of(run_root, "stage3_anneal")
    assert len(seeds) == 2 and not torch.equal(seeds[0]["lm_head.weight"], seeds[1]["lm_head.weight"])
    for key in merged:
        torch.testing.assert_close(merged[key], (seeds[0][key] + seeds[1][key]) / 2)
    config = json.loads((run_root / "stage3_anneal" / "model" / "config.json").read_text())
    assert config["text_config"]["rope_parameters"]["rope_theta"] == cfg.rope_theta


def test_a_stage_can_switch_the_decoder_to_interleaved_mrope(run_root, chain):
    from keye.models.modeling import KeyeMRotaryEmbedding, mrope_positions

    cfg = load_stage_config(NANO / "stage1_align.yaml", tiny_overrides(**{"run.steps": 1, "mrope_interleaved": "true"}))
    cfg.init_from, cfg.out = "stage0_vit", "align_interleaved"
    run_stage(cfg, run_root)
    model, _ = load_start(dataclasses.replace(cfg, init_from="align_interleaved"), run_root)
    assert model.config.mrope_interleaved
    # its visual tokens rotate in the interleaved layout (tested against Qwen3-VL's in test_keye_modeling), and
    # no longer as in the contiguous start
    v = model.config.video_token_id
    ids = torch.tensor([[7, 8] + [v] * 6 + [9]])
    pos, _ = mrope_positions(ids, torch.ones_like(ids), model.config, video_grid_thw=torch.tensor([[1, 4, 6]]))
    x = torch.zeros(1, ids.shape[1], model.config.text_config.hidden_size)
    start, _ = load_start(chain["stage1_align"], run_root)
    interleaved = KeyeMRotaryEmbedding(start.model.rotary_emb.rotary, start.config.mrope_section, interleaved=True)
    for ours, ref in zip(model.model.rotary_emb(x, pos), interleaved(x, pos)):
        torch.testing.assert_close(ours, ref)
    assert not torch.allclose(model.model.rotary_emb(x, pos)[0], start.model.rotary_emb(x, pos)[0])


def test_pretrain_stage_renders_rows_in_its_data_modes(run_root, chain, monkeypatch):
    from keye.train.stages import lm

    seen = []

    class Spy(lm.LMDataset):
        def __init__(self, rows, *args, **kwargs):
            seen.extend(rows)
            super().__init__(rows, *args, **kwargs)

    monkeypatch.setattr(lm, "LMDataset", Spy)
    cfg = load_stage_config(NANO / "stage3_anneal.yaml", tiny_overrides(**{
        "run.steps": 1, "data.modes": "{thinking: 1.0}", "data.train": "[world/train.jsonl]"}))
    cfg.init_from, cfg.out, cfg.merge_seeds = "stage2_multitask", "anneal_thinking", [0]
    run_stage(cfg, run_root)
    written = [json.loads(line) for line in (run_root / "world" / "train.jsonl").read_text().splitlines()]
    cots = {r["id"]: (r["cot"], r["answer"]) for r in written if r.get("cot")}
    assert len(seen) == min(8, len(cots)) > 0  # data.max_samples=8
    for row in seen:
        cot, answer = cots[row["id"]]
        assert row["messages"][-1]["content"] == f"<think>{cot}</think>{answer}"


def test_sft_renders_modes_and_learns(run_root, chain):
    cfg = load_stage_config(NANO / "sft.yaml", tiny_overrides(**{"data.max_samples": 12, "run.steps": 12, "run.optim.lr": 3e-3}))
    cfg.init_from = "stage2_multitask"
    run_stage(cfg, run_root)
    curve = losses(run_root, "sft")
    # 12 rows in micro-batches of 4: every 3 steps are one epoch over the same rows (in another order),
    # so epoch losses compare like with like; single batches differ by mode and length
    assert sum(curve[9:12]) < sum(curve[0:3])
    before, after = state_of(run_root, "stage2_multitask"), state_of(run_root, "sft")
    assert changed_groups(before, after) == {"vision", "projector", "lm"}


def test_vq_stage_switches_to_the_discrete_path_and_the_next_stages_train_code_embeddings(run_root, chain):
    from keye.models.visual_tokenizer import load_visual_tokenizer

    recipe = load_recipe(ROOT / "pipelines" / "nano-discrete")
    assert recipe.names[:3] == ["stage0_vit", "vq", "stage1_align"]
    vq = load_stage_config(recipe.folder / "vq.yaml", tiny_overrides(**{"data.eval": "[world/test.jsonl]"}))
    vq.init_from = "stage0_vit"
    run_stage(vq, run_root)
    report = json.loads((run_root / "vq" / "tokenizer" / "vq_report.json").read_text())
    assert len(report["final"]["usage"]) == vq.tokenizer["num_codebooks"] == 32
    assert all(0 < u <= 1 for u in report["final"]["usage"])
    from keye.video import read_video

    test_videos = {v for line in (run_root / "world" / "test.jsonl").read_text().splitlines() for v in json.loads(line)["videos"]}
    frames = sum(len(read_video(str(run_root / "world" / v), slow_fast=False, **vq.video.message()).frames) for v in test_videos)
    assert report["final"]["tokens"] == 4 * frames  # usage is measured on the held-out clips (56 px: 4 merged tokens)
    start, switched = state_of(run_root, "stage0_vit"), state_of(run_root, "vq")
    assert not any(k.startswith("mlp_AR.") for k in switched)
    for key, value in start.items():  # ViT and LM carried over unchanged
        if not key.startswith("mlp_AR."):
            assert torch.equal(switched[key], value), key
    trained = load_visual_tokenizer(run_root / "vq" / "tokenizer").state_dict()
    for key, value in trained.items():
        assert torch.equal(switched[f"visual_tokenizer.{key}"], value), key

    # stage 2 lists vision as trainable; on the discrete path the ViT (and tokenizer) must stay as they are
    cfg = load_stage_config(NANO / "stage2_multitask.yaml", tiny_overrides())
    cfg.init_from, cfg.out = "vq", "stage2_discrete"
    run_stage(cfg, run_root)
    after = state_of(run_root, "stage2_discrete")
    assert changed_groups(switched, after) == {"projector", "lm"}
    assert not torch.equal(switched["model.visual_embed_tokens.weight"], after["model.visual_embed_tokens.weight"])
    curve = losses(run_root, "stage2_discrete")
    assert curve[-1] < curve[0]


def test_packed_stage_learns_on_packed_rows(run_root, monkeypatch):
    from keye.data.collate import collate_packed
    from keye.train.stages import lm

    seen = []  # (samples, rows) per micro-batch

    def spy(samples, pad_id, pack_length):
        batch = collate_packed(samples, pad_id, pack_length)
        seen.append((len(samples), len(batch["input_ids"])))
        return batch

    monkeypatch.setattr(lm, "collate_packed", spy)
    cfg = load_stage_config(NANO / "stage2_multitask.yaml", tiny_overrides(packing="true", max_length=700))
    cfg.out = "stage2_packed"
    run_stage(cfg, run_root)
    assert seen and all(rows < samples for samples, rows in seen)
    curve = losses(run_root, "stage2_packed")
    assert curve[-1] < curve[0]


def test_lora_trains_adapters_on_fused_experts_and_merges(run_root, chain):
    cfg = load_stage_config(NANO / "sft.yaml", tiny_overrides(**{"lora.enabled": "true", "lora.r": 4, "run.optim.lr": 5e-3}))
    cfg.init_from, cfg.out = "stage2_multitask", "sft_lora"
    run_stage(cfg, run_root)
    before, after = state_of(run_root, "stage2_multitask"), state_of(run_root, "sft_lora")
    assert set(after) == set(before)  # merged back into the plain layout
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("experts.gate_up_proj" in k for k in changed) and any("self_attn.q_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k for k in changed)  # LoRA touches only its targets


def test_recipe_skips_done_stages_and_chains_around_skipped_ones(run_root, chain, tmp_path):
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    for name in ("stage0_vit.yaml", "stage1_align.yaml", "stage2_multitask.yaml"):
        shutil.copy(NANO / name, recipe_dir / name)
    (recipe_dir / "recipe.yaml").write_text(yaml.safe_dump({"stages": ["stage0_vit.yaml", "stage1_align.yaml", "stage2_multitask.yaml"]}))
    root = tmp_path / "run"
    shutil.copytree(run_root / "world", root / "world")
    shutil.copytree(run_root / "stage0_vit", root / "stage0_vit")  # finished earlier: must not run again
    marker = (root / "stage0_vit" / "done.json").stat().st_mtime_ns
    run_recipe(recipe_dir, str(root), tiny_overrides(**{"run.steps": 2}), skip=["stage1_align"])
    assert (root / "stage0_vit" / "done.json").stat().st_mtime_ns == marker
    assert not (root / "stage1_align").exists()
    saved = yaml.safe_load((root / "stage2_multitask" / "config.yaml").read_text())
    assert saved["init_from"] == "stage0_vit"


@pytest.mark.parametrize("size, params", [("8b", "keye-vl-1.5-8b"), ("30b-a3b", "keye-vl-2.0-30b-a3b")])
def test_big_recipes_dry_run(size, params, capsys):
    from keye.models import build_model

    rows = dry_run(ROOT / "pipelines" / size)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(params).parameters())
    assert rows and all(r["params"] == n for r in rows)
    for r in rows:
        assert 0 < r["trainable"] <= r["params"]
        if r["zero"] == 3:  # everything sharded: 4 bytes per weight, (4 + 8) more per trainable one, / GPUs
            states = (4 * r["params"] + 12 * r["trainable"]) / r["gpus"]
            assert r["weights"] + r["grads"] + r["optimizer"] == pytest.approx(states)
            assert r["gathered"] > 0
        parts = ("weights", "grads", "optimizer", "gathered", "activations")
        assert r["gib_per_gpu"] == pytest.approx(sum(r[k] or 0 for k in parts) / 2**30)
    anneal = next(r for r in rows if r["stage"] == "stage3_anneal")
    assert anneal["tokens"] == 32768 and anneal["activations"] > 0  # the recipe's packed row, checkpointed
    plain = estimate_stage(load_stage_config(ROOT / "pipelines" / size / "stage3_anneal.yaml",
                                             ["run.activation_checkpointing=false", "loss_chunk=0"]), anneal["gpus"])
    assert plain["activations"] > 5 * anneal["activations"]
    assert "GiB/GPU" in capsys.readouterr().out


def test_stage_command_reads_overrides_after_run_root(tmp_path, capsys):
    from keye.cli import main

    # argparse stops at --run-root; the trailing overrides still reach the stage (and a typo is named)
    assert main(["train", str(NANO / "stage0_vit.yaml"), "--run-root", str(tmp_path), "run.steps=3", "run.stepz=1"]) == 2
    assert "run.stepz" in capsys.readouterr().err and not (tmp_path / "stage0_vit").exists()


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank, as torchrun would leave it: the strategies then really wrap."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_stage0_and_vq_train_through_a_ddp_wrapper(run_root, chain, one_rank_group):
    """Their losses run inside the trained module's forward, so a DDP (or FSDP2) wrapper sees the whole
    step: the same losses as the plain runs (calling the tower and head past the wrapper used to fail)."""
    import dataclasses

    from keye.train.distributed import DistConfig

    ddp = DistConfig(strategy="ddp")
    cfg = chain["stage0_vit"]
    run_stage(dataclasses.replace(cfg, out="stage0_ddp", run=dataclasses.replace(cfg.run, dist=ddp)), run_root)
    assert losses(run_root, "stage0_ddp") == pytest.approx(losses(run_root, "stage0_vit"), rel=1e-5)

    folder = ROOT / "pipelines" / "nano-discrete"
    for out, dist in [("vq_plain", DistConfig()), ("vq_ddp", ddp)]:
        vq = load_stage_config(folder / "vq.yaml", tiny_overrides(**{"data.eval": "[world/test.jsonl]"}))
        vq.init_from, vq.out, vq.run.dist = "stage0_vit", out, dist
        run_stage(vq, run_root)
    assert losses(run_root, "vq_ddp") == pytest.approx(losses(run_root, "vq_plain"), rel=1e-5)


def test_a_stage_file_of_a_recipe_starts_from_the_stage_before_it(run_root, tmp_path, capsys):
    """`keye train pipelines/nano/sft.yaml` chains like the recipe (it used to start from a fresh model);
    an explicit init_from wins; the first stage and files outside a recipe keep their own."""
    from keye.cli import main
    from keye.recipe import load_recipe_stage

    assert load_recipe_stage(NANO / "sft.yaml").init_from == "stage3_anneal"
    assert load_recipe_stage(NANO / "stage2_multitask.yaml").init_from == "stage1_align"
    assert load_recipe_stage(NANO / "sft.yaml", ["init_from=stage2_multitask"]).init_from == "stage2_multitask"
    renamed = load_recipe_stage(NANO / "sft.yaml", ["out=sft_seed1", "run.seed=1"])
    assert (renamed.out, renamed.init_from) == ("sft_seed1", "stage3_anneal")
    assert load_recipe_stage(NANO / "stage0_vit.yaml").init_from == "keye-nano-base"  # the recipe's own start
    assert load_recipe_stage(ROOT / "pipelines" / "nano-discrete" / "vq.yaml").init_from == "stage0_vit"  # "../nano/..."
    alone = tmp_path / "sft.yaml"
    shutil.copy(NANO / "sft.yaml", alone)
    assert load_recipe_stage(alone).init_from is None

    root = tmp_path / "run"  # the world, but no stage 3 yet
    root.mkdir()
    (root / "world").symlink_to(run_root / "world")
    assert main(["train", str(NANO / "sft.yaml"), "--run-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and "stage3_anneal" in err and not (root / "sft" / "done.json").exists()


def test_data_max_samples_limits_stage0_and_the_vq_stage(run_root, chain, caplog):
    """Every stage honours data.max_samples (stage 0 and vq used to read every row / video)."""
    import logging

    rows = [json.loads(line) for line in (run_root / "world" / "frames.jsonl").read_text().splitlines()]
    cfg = load_stage_config(NANO / "stage0_vit.yaml", tiny_overrides(**{"data.max_samples": 2, "run.steps": 1}))
    cfg.out = "stage0_two_rows"
    with caplog.at_level(logging.INFO, logger="keye.train.stages.vit"):
        run_stage(cfg, run_root)
    pairs = sum(len(r["frame_texts"]) for r in rows[:2])
    assert any(f"{pairs} image/text pairs" in r.getMessage() for r in caplog.records), caplog.text

    vq = load_stage_config(ROOT / "pipelines" / "nano-discrete" / "vq.yaml",
                           tiny_overrides(**{"data.max_samples": 2, "run.steps": 1, "data.eval": "[]",
                                           "tokenizer.codebook_size": 16, "code_embeddings": "fit"}))
    vq.init_from, vq.out = "stage0_vit", "vq_two_videos"
    run_stage(vq, run_root)
    from keye.video import read_video

    videos = sorted({run_root / "world" / v for line in (run_root / "world" / "train.jsonl").read_text().splitlines()
                     for v in json.loads(line)["videos"]})[:2]
    frames = sum(len(read_video(str(v), slow_fast=False, **vq.video.message()).frames) for v in videos)
    report = json.loads((run_root / "vq_two_videos" / "tokenizer" / "vq_report.json").read_text())
    assert report["final"]["tokens"] == 4 * frames  # no data.eval: reported on the two training videos

    # the twin's code embeddings are the ones fitted to the start model's projector on those frames
    from keye.models.modeling import KeyeForConditionalGeneration
    from keye.models.visual_tokenizer import fit_code_embeddings, load_visual_tokenizer
    from keye.train.stages.vq import frame_features, vision_tower

    start = KeyeForConditionalGeneration.from_pretrained(run_root / "stage0_vit" / "model").eval()
    visual, merge, _, _ = vision_tower(start)
    feats = torch.cat(frame_features(visual, merge, videos, vq.video))
    tokenizer = load_visual_tokenizer(run_root / "vq_two_videos" / "tokenizer").eval()
    with torch.no_grad():
        table, explained = fit_code_embeddings(tokenizer, feats, start.mlp_AR.project_merged(feats))
    twin = KeyeForConditionalGeneration.from_pretrained(run_root / "vq_two_videos" / "model")
    torch.testing.assert_close(twin.model.visual_embed_tokens.weight.detach(), table, atol=1e-4, rtol=1e-3)
    assert report["code_embeddings"]["variance_explained"] == pytest.approx(explained, abs=1e-4)


def test_listing_repeat_labels_keep_the_loss_on_what_only_the_frame_gives(run_root, chain, monkeypatch):
    from keye.data.collate import SampleBuilder
    from keye.data.world.words import listing_mentions
    from keye.errors import ConfigError
    from keye.data.world.words import label_words, word_type
    from keye.train.stages import lm

    cfg = chain["stage2_multitask"]
    builder = SampleBuilder(load_start(cfg, run_root)[1], cfg.video, base_dir=run_root / "world")
    tokenizer = builder.processor.tokenizer
    rows = [json.loads(line) for line in (run_root / "world" / "frames.jsonl").read_text().splitlines()]

    def scored(labels):
        words = [tokenizer.decode(labels[w]).strip() for w in label_words(tokenizer, labels)]
        return [w for w in words if word_type(w)]

    every, none, half, again = (lm.LMDataset(rows, builder, listing_repeat_labels=share)
                                for share in (1.0, 0.0, 0.5, 0.5))
    repeats = kept = 0
    for i, row in enumerate(rows):
        mentions = listing_mentions(row["frame_texts"])
        words = scored(every[i].labels)
        assert torch.equal(every[i].labels, builder(row).labels)  # 1.0: labels as built
        assert scored(none[i].labels) == [w for w, m in zip(words, mentions) if m != "same"]
        dropped = (none[i].labels == -100) & (every[i].labels != -100)
        assert torch.equal(none[i].labels[~dropped], every[i].labels[~dropped])  # timestamps, punctuation kept
        assert torch.equal(half[i].labels, again[i].labels)  # the same draw on every load
        repeats += mentions.count("same")
        kept += len(scored(half[i].labels)) - (len(words) - mentions.count("same"))
    assert 0.3 < kept / repeats < 0.7

    shares = []

    class Spy(lm.LMDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            shares.append(self.listing_repeat_labels)

    monkeypatch.setattr(lm, "LMDataset", Spy)
    cfg = load_stage_config(NANO / "stage2_multitask.yaml",
                            tiny_overrides(listing_repeat_labels=0.25, **{"run.steps": 1}))
    cfg.out = "multitask_repeats"
    run_stage(cfg, run_root)
    assert shares == [0.25]  # the stage file's value reaches the dataset
    with pytest.raises(ConfigError, match="listing_repeat_labels"):
        load_stage_config(NANO / "stage2_multitask.yaml", tiny_overrides(listing_repeat_labels=1.5))
