"""Grounded attention in the next-token stages: which visual tokens show an asked object (against the
decoded pixels), and a short grounded stage-2 run that moves the guided head's attention onto them."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from keye.data.world import WorldConfig, generate_world
from keye.data.world.grounding import asked_objects, cells_on, fits
from keye.errors import ConfigError
from keye.recipe import load_recipe, run_stage

ROOT = Path(__file__).resolve().parents[2]
VIDEO = ["video.min_pixels=12544", "video.max_pixels=12544"]  # 112 x 112 frames: 4 x 4 merged tokens, as the recipe


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounded")
    generate_world(root / "world", WorldConfig.from_dict({"seed": 5, "clips": {"train": 6, "val": 0, "test": 0}}),
                   progress=False)
    return root


def stage2(out: str = "stage2_multitask", **overrides):
    """Stage 2 of the nano recipe into ``out``, from a fresh model (the first stage of the chain keeps its
    own start)."""
    extra = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_recipe(ROOT / "pipelines" / "nano", VIDEO + extra).chained(["stage0_vit", "stage1_align"])[0]
    assert cfg.stage == "multitask"
    return dataclasses.replace(cfg, init_from=None, out=out)


def trained_and_measured(cfg, run_root, measure):
    """``measure(model)`` on the stage's start model and on the model it trains, and the stage's logged metrics."""
    from transformers import AutoModelForImageTextToText

    from keye.train.base import load_start
    from keye.train.metrics import read_metrics

    before = measure(load_start(cfg, run_root)[0].eval())
    run_stage(cfg, run_root)
    after = measure(AutoModelForImageTextToText.from_pretrained(run_root / cfg.out / "model").eval())
    return before, after, read_metrics(run_root / cfg.out / "metrics.jsonl")


def test_questions_name_their_objects():
    assert asked_objects("What colour is the triangle?") == [(None, "triangle")]
    assert asked_objects("What shape is the blue object?") == [("blue", None)]
    assert asked_objects("Which way does the red circle move: left, right, up, down, or does it stay still?") == [
        ("red", "circle")]
    assert asked_objects("Which appears first in the video?\nA. the red circle\nB. the green square") == [
        ("red", "circle"), ("green", "square")]
    assert asked_objects("What colour is the object that moves left?") == []
    assert asked_objects("How many objects move up?") == []
    assert fits("red circle", (None, "circle")) and fits("red circle", ("red", None))
    assert not fits("red circle", ("red", "square")) and not fits("blue circle", ("red", None))


def test_cells_on_marks_the_cells_a_box_overlaps():
    on = cells_on(torch.tensor([[0.1, 0.1, 0.3, 0.3]]), 4, 4)  # cells of a quarter: [0, .25), [.25, .5)
    assert torch.nonzero(on).flatten().tolist() == [0, 1, 4, 5]
    on = cells_on(torch.tensor([[0.5, 0.0, 0.75, 0.2], [0.0, 0.8, 0.1, 1.0]]), 4, 4)  # edges on cell borders
    assert torch.nonzero(on).flatten().tolist() == [2, 12]
    assert not cells_on(torch.zeros(0, 4), 4, 4).any()


def test_groundings_cover_the_asked_objects_pixels(run_root):
    """Each grounded answer: the position predicts the answer's first token, and the target tokens' cells
    hold nearly all pixels of the asked colour in the sampled frames (colour and shape questions, whose
    object is the only one of its colour or shape)."""
    from keye.data.collate import SampleBuilder
    from keye.data.world.scene import COLORS
    from keye.processing import load_nano_processor
    from keye.train.base import read_rows
    from keye.train.stages.lm import ObjectGrounder

    cfg = stage2()
    rows, base = read_rows(cfg.data.train, run_root)
    processor = load_nano_processor()
    builder = SampleBuilder(processor, cfg.video, base_dir=base)
    video_id = processor.token_ids["<|video_pad|>"]
    grounder = ObjectGrounder(rows, builder, video_id, 2)
    palette = np.array(list(COLORS.values()), dtype=np.int32)
    checked = 0
    for row in rows:
        if not row["id"].endswith("dense"):
            continue
        sample = builder(row)
        clip = builder.vision(builder.messages(row)[0]).videos[0]
        video_L = torch.nonzero(sample.input_ids == video_id).flatten().tolist()
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        questions = [m["content"] for m in row["messages"] if m["role"] == "user"]
        groundings = grounder(row, sample)
        for g in groundings:
            first = int(sample.labels[g.position + 1])
            assert first != -100 and processor.tokenizer.decode([first]).strip() in answers
            assert set(g.targets) <= set(video_L)
        for g in groundings:
            question = questions[g.question].removeprefix("<video>")
            assert asked_objects(question)
            if not question.startswith("What shape is the"):  # "the <colour> object": the one object of its colour
                continue
            ((color, _),) = asked_objects(question)
            chosen = {video_L.index(t) for t in g.targets}
            inside = total = 0
            for f, frame in enumerate(clip.frames):  # 16 tokens a frame, raster order over the 4 x 4 merged grid
                pixels = frame.permute(1, 2, 0).numpy().astype(np.int32)
                nearest = ((pixels[..., None, :] - palette) ** 2).sum(-1)
                mask = (nearest.argmin(-1) == list(COLORS).index(color)) & (nearest.min(-1) < 3000)
                for cell in range(16):
                    r, c = divmod(cell, 4)
                    count = int(mask[28 * r:28 * (r + 1), 28 * c:28 * (c + 1)].sum())
                    total += count
                    inside += count if 16 * f + cell in chosen else 0
            assert total > 0 and inside >= 0.9 * total, (row["id"], question, inside, total)
            assert len(chosen) < 0.5 * len(video_L)
            checked += 1
    assert checked >= 2


def test_rendered_rows_are_grounded_unless_their_answer_opens_a_chain(run_root):
    """Stages 3 and SFT render each row in a mode: the bare answer (non-thinking, or a row as written that
    does not think) is grounded as the row as written is, at the position before the answer's first token;
    a chain (thinking, auto-think) is not, its first token being no answer."""
    from keye.data.collate import SampleBuilder
    from keye.data.modes import render_mode
    from keye.processing import load_nano_processor
    from keye.train.base import read_rows
    from keye.train.stages.lm import ObjectGrounder

    rows, base = read_rows(["world/train.jsonl", "world/frames.jsonl"], run_root)
    processor = load_nano_processor()
    builder = SampleBuilder(processor, stage2().video, base_dir=base)
    grounder = ObjectGrounder(rows, builder, processor.token_ids["<|video_pad|>"], 2)
    grounded = 0
    for row in rows:
        if "frame_texts" in row or not row.get("cot"):
            continue
        for mode in ("non_thinking", "video"):
            rendered = render_mode(row, mode)
            sample = builder(rendered)
            found = grounder(rendered, sample)
            assert len(found) == (1 if asked_objects(row["messages"][0]["content"]) else 0), (row["id"], mode)
            for g in found:
                first = processor.tokenizer.decode([int(sample.labels[g.position + 1])]).strip()
                assert first and row["answer"].startswith(first)
            grounded += len(found)
        for mode in ("thinking", "auto_think"):
            rendered = render_mode(row, mode)
            assert grounder(rendered, builder(rendered)) == []
    assert grounded >= 4


def test_grounded_stage2_moves_the_head_onto_the_asked_objects(run_root):
    """A short stage 2 with grounding on: the guided head's attention from the answers onto the asked
    objects' tokens rises (on the same batch, before and after), and the next-token loss still falls."""
    from keye.data.collate import SampleBuilder
    from keye.processing import load_nano_processor
    from keye.train.attention import AttentionTap, attention_on
    from keye.train.base import read_rows
    from keye.train.stages.lm import LMDataset, ObjectGrounder, collate_grounded

    cfg = stage2(**{"grounding.weight": 3.0, "grounding.layer": 1, "grounding.head": 2, "run.steps": 12,
                    "run.micro_batch": 4, "run.optim.warmup_steps": 0, "run.optim.schedule": "constant"})
    rows, base = read_rows(cfg.data.train, run_root)
    processor = load_nano_processor()
    builder = SampleBuilder(processor, cfg.video, base_dir=base)
    dense = [r for r in rows if r["id"].endswith("dense")]
    dataset = LMDataset(dense, builder, grounder=ObjectGrounder(rows, builder, processor.token_ids["<|video_pad|>"], 2))
    batch = collate_grounded([dataset[i] for i in range(len(dense))], processor.tokenizer.pad_token_id)
    assert batch["groundings"]

    def grounding_loss(model) -> float:
        tap = AttentionTap(model.model.layers[1])
        inputs = {k: v for k, v in batch.items() if k != "groundings"}
        with torch.no_grad():
            model(**inputs)
        rows = [(b, g.position, g.targets) for b, g in batch["groundings"]]
        value = float(attention_on(tap, 2, batch["attention_mask"].bool(), rows))
        tap.remove()
        return value

    before, after, logged = trained_and_measured(cfg, run_root, grounding_loss)
    assert after < before - 0.3, (before, after)
    assert "grounding" in logged[0] and logged[-1]["loss"] < logged[0]["loss"]


def test_grounding_config_errors_name_the_problem(run_root):
    with pytest.raises(ConfigError, match="packing"):
        stage2(**{"grounding.weight": 1.0, "packing": True, "max_length": 512})
    bare = run_root / "world" / "dense_only.jsonl"
    bare.write_text((run_root / "world" / "train_dense.jsonl").read_text())
    with pytest.raises(ConfigError, match="frame_boxes"):
        run_stage(stage2(**{"grounding.weight": 1.0, "data.train": "[world/dense_only.jsonl]"}, out="bad"), run_root)
    with pytest.raises(ConfigError, match="layer 7"):
        run_stage(stage2(**{"grounding.weight": 1.0, "grounding.layer": 7}, out="bad2"), run_root)


def test_motion_answers_name_their_objects_first_and_last_frames(run_root):
    """A motion or entry answer's ``first`` / ``last`` are its targets in the earliest and the latest frame
    that shows its object; every other answer has none. A short stage 2 with ``grounding.mentions`` moves the
    two mention heads onto them, and the next-token loss still falls."""
    from keye.data.collate import SampleBuilder
    from keye.data.world.grounding import asks_track
    from keye.processing import load_nano_processor
    from keye.train.attention import AttentionTap, attention_on
    from keye.train.base import read_rows
    from keye.train.stages.lm import LMDataset, ObjectGrounder, collate_grounded

    assert asks_track("Which way does the red circle move: left, right, up, down, or does it stay still?")
    assert asks_track("Does the red circle enter the frame, leave the frame, or stay in view?")
    assert not asks_track("What colour is the triangle?") and not asks_track("Which appears first in the video?")

    cfg = stage2("stage2_mentions", **{"grounding.mentions": 3.0, "run.steps": 12, "run.micro_batch": 4,
                                       "run.optim.warmup_steps": 0, "run.optim.schedule": "constant"})
    rows, base = read_rows(cfg.data.train, run_root)
    processor = load_nano_processor()
    builder = SampleBuilder(processor, cfg.video, base_dir=base)
    video_id = processor.token_ids["<|video_pad|>"]
    grounder = ObjectGrounder(rows, builder, video_id, 2)
    dense = [r for r in rows if r["id"].endswith("dense")]
    tracked = 0
    for row in dense:
        sample = builder(row)
        video_L = torch.nonzero(sample.input_ids == video_id).flatten().tolist()
        questions = [m["content"].removeprefix("<video>") for m in row["messages"] if m["role"] == "user"]
        for g in grounder(row, sample):
            if not asks_track(questions[g.question]):
                assert g.first == g.last == ()
                continue
            frames = sorted({video_L.index(t) // 16 for t in g.targets})  # 16 tokens a frame
            assert {video_L.index(t) // 16 for t in g.first} == {frames[0]}
            assert {video_L.index(t) // 16 for t in g.last} == {frames[-1]} and frames[0] < frames[-1]
            assert set(g.first) | set(g.last) <= set(g.targets)
            tracked += 1
    assert tracked >= 2

    dataset = LMDataset(dense, builder, grounder=grounder)
    batch = collate_grounded([dataset[i] for i in range(len(dense))], processor.tokenizer.pad_token_id)
    moving = [(b, g) for b, g in batch["groundings"] if g.first]

    def mention_loss(model) -> float:
        tap = AttentionTap(model.model.layers[1])
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "groundings"})
        mask = batch["attention_mask"].bool()
        value = sum(float(attention_on(tap, head, mask, [(b, g.position, getattr(g, end)) for b, g in moving]))
                    for head, end in ((0, "first"), (1, "last")))
        tap.remove()
        return value / 2

    before, after, logged = trained_and_measured(cfg, run_root, mention_loss)
    assert after < before - 0.3, (before, after)
    assert "mentions" in logged[0] and "grounding" not in logged[0] and logged[-1]["loss"] < logged[0]["loss"]
    with pytest.raises(ConfigError, match="a head of its own"):
        run_stage(stage2("bad3", **{"grounding.weight": 1.0, "grounding.mentions": 1.0, "grounding.head": 0}), run_root)


def test_chains_name_the_asked_object_from_the_question(run_root):
    """``grounding.subject``: the position before a turn's first word naming the asked object ("The only
    triangle") and the question's words naming it are found from the tokens alone; a short stage 2 on chains
    moves the head onto them, without any frame_boxes in the data, and the next-token loss still falls."""
    from keye.data.collate import SampleBuilder
    from keye.data.modes import render_mode
    from keye.processing import load_nano_processor
    from keye.train.attention import AttentionTap, attention_on
    from keye.train.base import read_rows
    from keye.train.stages.lm import LMDataset, collate_grounded, subject_word_ids

    cfg = stage2("stage2_subject", **{"grounding.subject": 3.0, "data.train": "[world/train.jsonl]",
                                      "data.modes": "{thinking: 1.0}", "run.steps": 12, "run.micro_batch": 4,
                                      "run.optim.warmup_steps": 0, "run.optim.schedule": "constant"})
    rows, base = read_rows(cfg.data.train, run_root)
    processor = load_nano_processor()
    tokenizer, words = processor.tokenizer, subject_word_ids(processor.tokenizer)
    assert set(words) == {"red", "yellow", "green", "cyan", "blue", "magenta", "circle", "square", "triangle"}
    builder = SampleBuilder(processor, cfg.video, base_dir=base)
    chains = [render_mode(r, "thinking") for r in rows if r.get("cot")]
    dataset = LMDataset(chains, builder, subject_words=words)
    named = 0
    for row, sample in ((r, dataset[i]) for i, r in enumerate(chains)):
        asked = {w for w in re.findall(r"[a-z]+", row["question"].lower()) if w in words}
        for position, targets in sample.meta["subjects"]:
            word = tokenizer.decode([int(sample.labels[position + 1])]).strip()
            first = next(w for w in re.findall(r"[a-z]+", row["cot"]) if w in asked)
            assert word == first  # the chain's first word that names an asked object
            assert {tokenizer.decode([int(sample.input_ids[t])]).strip() for t in targets} == asked
            assert all(sample.labels[t] == -100 for t in targets)  # in the question, not the answer
            named += 1
        if not asked:
            assert sample.meta["subjects"] == []  # "How many objects ...": nothing to name
    assert named >= 3
    plain = LMDataset([render_mode(r, "non_thinking") for r in rows if r.get("cot")], builder, subject_words=words)
    assert all(plain[i].meta["subjects"] == [] for i in range(len(plain)))  # a bare answer names no object

    batch = collate_grounded([dataset[i] for i in range(len(chains))], tokenizer.pad_token_id)
    assert batch["subjects"]

    def subject_loss(model) -> float:
        tap = AttentionTap(model.model.layers[0])
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k not in ("groundings", "subjects")})
        value = float(attention_on(tap, 1, batch["attention_mask"].bool(), batch["subjects"]))
        tap.remove()
        return value

    before, after, logged = trained_and_measured(cfg, run_root, subject_loss)
    assert after < before - 0.3, (before, after)
    assert "subject" in logged[0] and "grounding" not in logged[0] and logged[-1]["loss"] < logged[0]["loss"]
