"""The evaluation harness on the eval/fixtures definitions: formats, accuracy from a deterministic
predictor against hand-computed values, resume (count the model calls), evaluate_world, `keye eval`."""

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from keye.api import KeyePipeline
from keye.cli import main
from keye.data.world import WorldConfig, generate_world
from keye.errors import KeyeInputError
from keye.eval.formats import load_definition, read_items, read_rows
from keye.eval.runner import evaluate_world, format_prompt, item_messages, run_eval
from keye.models import build_model
from keye.processing import load_nano_processor
from keye.video.synthetic import write_cut_clip

FIXTURES = Path(__file__).resolve().parents[2] / "eval" / "fixtures"


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_videos")
    write_cut_clip(root / "clip_a.mp4", num_frames=8, height=56, width=56, cuts=(4,), fps=2.0, seed=1)
    write_cut_clip(root / "clip_b.mp4", num_frames=6, height=56, width=56, cuts=(3,), fps=2.0, seed=2)
    return root


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model beside other test workers on two cores: avoid oversubscription
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("eval_ckpt")
    model, processor = build_model("keye-nano"), load_nano_processor()
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    yield ckpt, model, processor
    torch.set_num_threads(threads)


def definition(name, videos, *overrides):
    return load_definition(str(FIXTURES / f"{name}.yaml"), [f"video_dir={videos}", *overrides])


def question_of(conversation):
    return next(p["text"] for p in conversation[0]["content"] if p["type"] == "text")


def test_videomme_rows_from_jsonl_and_parquet_agree(videos, tmp_path):
    items = read_items(definition("videomme", videos))
    assert [i.answer for i in items] == ["B", "B", "A", "A"]
    assert items[1].options == ["A red ball.", "A white square.", "A blue car.", "Nothing moves."]
    assert items[0].media[0]["video"] == str(videos / "clip_a.mp4")
    assert items[2].categories == {"duration": "medium", "domain": "Sports", "sub_category": "Football",
                                   "task_type": "Counting Problem"}
    rows = read_rows(FIXTURES / "videomme.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    from_parquet = read_items(definition("videomme", videos, f"annotations={tmp_path / 'test-00000-of-00001.parquet'}"))
    assert from_parquet == items


def test_mvbench_rows_map_answers_to_letters_and_trim(videos):
    d = definition("mvbench", videos)
    items = read_items(d)
    assert [(i.id, i.answer) for i in items] == [("Action Sequence/0", "A"), ("Action Sequence/1", "B"),
                                                 ("Scene Transition/0", "A")]
    messages = item_messages(items[0], d.prompt, d.video.message())
    video = messages[0]["content"][0]
    assert (video["video_start"], video["video_end"], video["fps"]) == (1.0, 3.5, 1.0)
    assert "video_start" not in item_messages(items[2], d.prompt, d.video.message())[0]["content"][0]
    assert "A. A new scene started.\nB. The video ended.\nC. A person waved." in question_of(messages)


def test_accuracy_from_a_deterministic_predictor(videos, tmp_path):
    # hand-written outputs per question, in the shapes models produce
    outputs = {
        "How many scenes does the video show?": "B",  # correct (Counting, short)
        "What moves across the frame?": "<think>the ball</think><answer>A</answer>",  # wrong (Object Recognition, short)
        "How many cuts are there?": "\\boxed{A}",  # correct (Counting, medium)
        "Is the first frame the same as the last?": "I cannot tell.",  # unanswered (Temporal, medium)
    }

    def predict(conversations):
        return [next(v for k, v in outputs.items() if k in question_of(c)) for c in conversations]

    results = run_eval(definition("videomme", videos), predict, tmp_path / "out", model_name="stub", progress=False)
    assert results["overall"] == {"n": 4, "correct": 2, "accuracy": 0.5, "unanswered": 1, "errors": 0}
    task = results["by"]["task_type"]
    assert {k: v["accuracy"] for k, v in task.items()} == {"Counting Problem": 1.0, "Object Recognition": 0.0,
                                                           "Temporal Reasoning": 0.0}
    assert {k: (v["correct"], v["n"]) for k, v in results["by"]["duration"].items()} == {"medium": (1, 2), "short": (1, 2)}
    # per reference answer: right of n, and how often the model gave it in the group ("A" once in short, where no
    # item's answer is A, so it has no row there)
    assert results["answers"]["duration"] == {"medium": {"A": {"n": 2, "correct": 1, "predicted": 1}},
                                              "short": {"B": {"n": 2, "correct": 1, "predicted": 1}}}
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| overall | 4 | 50.0 |" in md and "| Counting Problem | 2 | 100.0 |" in md
    assert "- medium: A 1/2 (1)" in md and "- Counting Problem: A 1/1 (1), B 1/1 (1)" in md


def test_rerun_skips_finished_items_and_drops_a_torn_line(videos, tmp_path):
    d = definition("mvbench", videos)
    asked = []

    def predict(conversations):
        if len(asked) == 2:
            raise KeyboardInterrupt  # the run is killed while asking the third question
        asked.extend(question_of(c) for c in conversations)
        return ["A"] * len(conversations)

    with pytest.raises(KeyboardInterrupt):
        run_eval(d, predict, tmp_path, progress=False)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write('{"id": "Scene Transition/0", "pr')  # killed mid-write

    calls = []
    results = run_eval(d, lambda cs: calls.extend(cs) or ["A"] * len(cs), tmp_path, progress=False)
    assert len(calls) == 1 and "how the scenes in the video change?" in question_of(calls[0])
    assert results["overall"]["n"] == 3 and results["overall"]["correct"] == 2  # A, A (wrong: B), A
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 3
    calls.clear()
    run_eval(d, lambda cs: calls.extend(cs) or ["A"] * len(cs), tmp_path, progress=False)
    assert calls == []
    with pytest.raises(KeyeInputError, match="model="):
        run_eval(d, lambda cs: ["A"] * len(cs), tmp_path, model_name="another", progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_world")
    generate_world(out, WorldConfig(seed=0, clips={"train": 0, "val": 0, "test": 3}), progress=False)
    return out / "test.jsonl"


class CountOracle(KeyePipeline):
    """Answers 'count' questions right (in <answer> tags, after thinking) and everything else wrong."""

    def __init__(self, model, processor, rows):
        super().__init__(model, processor)
        self.truth = {(Path(r["videos"][0]).name, r["question"]): r for r in read_rows(rows)}
        self.calls = 0

    def generate(self, conversations, mode="auto", max_new_tokens=None, **kwargs):
        self.calls += len(conversations)
        out = []
        for c in conversations:
            row = self.truth[(Path(c[0]["content"][0]["video"]).name, question_of(c))]
            out.append(f"<think>counting</think><answer>{row['answer']}</answer>" if row["kind"] == "count" else "wrong")
        return out


def test_evaluate_world_per_kind_accuracy(world, nano, tmp_path):
    _, model, processor = nano
    rows = read_rows(world)
    oracle = CountOracle(model, processor, world)
    results = evaluate_world(oracle, world, out_dir=tmp_path)
    kinds = {r["kind"] for r in rows}
    assert set(results["per_kind"]) == kinds and "count" in kinds
    assert results["per_kind"] == {k: 1.0 if k == "count" else 0.0 for k in kinds}
    n_count = sum(r["kind"] == "count" for r in rows)
    assert results["overall"]["correct"] == n_count and oracle.calls == len(rows)
    assert set(results["by"]) == {"kind", "company", "shots"}  # the world.json beside the split gives the last two

    pipe = KeyePipeline(model, processor)
    model.train()
    real = evaluate_world(pipe, world, limit=2, max_new_tokens=3,
                          video_options={"max_pixels": 56 * 56, "nframes": 4})
    assert real["overall"]["n"] == 2 and model.training  # the training loop gets its model back in train mode


class LayoutRecorder(KeyePipeline):
    """Records, per generate call, the Slow-Fast setting and whether the inputs hold fast frames."""

    def __init__(self, model, processor):
        super().__init__(model, processor)  # Slow-Fast on, as keye.load gives by default
        self.seen = []

    def generate(self, conversations, mode="auto", max_new_tokens=None, **kwargs):
        ids = self.inputs(conversations, mode)["input_ids"]
        fast = self.processor.tokenizer.convert_tokens_to_ids("<|fast_start|>")
        self.seen.append((self.slow_fast, bool((ids == fast).any())))
        return ["wrong"] * len(conversations)


def test_evaluate_world_samples_frames_the_way_training_did_even_through_a_pipeline(world, nano, tmp_path):
    """The recipe's eval hands in a loaded pipeline (Slow-Fast on by default); slow_fast=False must reach
    the frames for that call, and the pipeline keeps its own setting afterwards."""
    _, model, processor = nano
    pipe = LayoutRecorder(model, processor)
    evaluate_world(pipe, world, out_dir=tmp_path / "uniform", slow_fast=False, limit=3,
                   video_options={"fps": 2.0, "min_pixels": 3136, "max_pixels": 3136})
    assert pipe.seen and all(setting is False and not fast for setting, fast in pipe.seen)
    assert pipe.slow_fast is True
    pipe.seen.clear()
    evaluate_world(pipe, world, out_dir=tmp_path / "own", limit=3)
    assert pipe.seen and all(setting is True for setting, _ in pipe.seen)


def test_keye_eval_command_resumes_and_reports_bad_input(videos, nano, tmp_path, capsys):
    ckpt = str(nano[0])
    base = ["eval", str(FIXTURES / "videomme.yaml"), "--model", ckpt, "--out", str(tmp_path), "--device", "cpu",
            "--video-dir", str(videos), "--max-new-tokens", "3"]
    assert main([*base, "--limit", "2"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["overall"]["n"] == 2
    assert main(base) == 0
    ids = [json.loads(line)["id"] for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert ids == ["001-1", "001-2", "002-1", "002-2"]  # the first two were not asked again
    assert "accuracy" in capsys.readouterr().out

    assert main(["eval", "no-such-benchmark", "--model", ckpt, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keye eval: error:") and "no-such-benchmark" in err and "\n" not in err


def test_keye_eval_world_by_name_with_data(world, nano, tmp_path):
    args = ["eval", "world", "--data", str(world), "--model", str(nano[0]), "--out", str(tmp_path), "--device", "cpu",
            "--limit", "2", "--max-new-tokens", "2", "--nframes", "4", "--max-pixels", str(56 * 56)]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    first_two = read_rows(world)[:2]
    assert results["overall"]["n"] == 2 and results["mode"] == "no_think"
    assert sorted(results["by"]["kind"]) == sorted({r["kind"] for r in first_two})
    assert {"kind", "reasoning", "shots"} <= set(results["by"]) <= {"kind", "reasoning", "shots", "company"}


def test_keye_eval_samples_video_as_the_model_was_trained(world, nano, tmp_path):
    """A model inside a stage folder is asked about frames sampled as that stage trained it, unless the
    definition or a flag says otherwise; run.json records the sampling."""
    stage = tmp_path / "stage"
    nano[1].save_pretrained(stage / "model")
    nano[2].save_pretrained(stage / "model")
    (stage / "config.yaml").write_text("stage: sft\nvideo: {fps: 1.0, min_pixels: 3136, max_pixels: 3136, "
                                       "slow_fast: false}\n")
    trained = {"fps": 1.0, "min_pixels": 3136, "max_pixels": 3136, "slow_fast": False}

    def sampled(out, definition="world", *extra):
        args = ["eval", definition, *extra, "--data", str(world), "--model", str(stage / "model"), "--out",
                str(tmp_path / out), "--device", "cpu", "--limit", "1", "--max-new-tokens", "1"]
        assert main(args) == 0
        return json.loads((tmp_path / out / "run.json").read_text())["video"]

    assert sampled("trained") == trained
    assert sampled("flag", "world", "--fps", "0.5") == {**trained, "fps": 0.5}
    assert sampled("override", "world", "video.max_frames=2") == {**trained, "max_frames": 2}
    # what a definition file sets wins over the model's sampling; the flags over both
    (tmp_path / "w.yaml").write_text("name: w\nformat: world\nvideo: {max_pixels: 6272}\n")
    assert sampled("definition", str(tmp_path / "w.yaml")) == {**trained, "max_pixels": 6272}
    assert sampled("both", str(tmp_path / "w.yaml"), "--max-pixels", "3136") == trained


def test_bad_video_is_recorded_and_retried_on_rerun(videos, tmp_path):
    from keye.errors import VideoError

    d = definition("videomme", videos)
    broken = {"clip_b.mp4"}
    asked = []

    def predict(conversations):
        names = [Path(c[0]["content"][0]["video"]).name for c in conversations]
        if broken & set(names):
            raise VideoError("clip_b.mp4: cannot decode")
        asked.extend(names)
        return ["B"] * len(conversations)

    results = run_eval(d, predict, tmp_path, batch_size=4, progress=False)
    # the batch of 4 failed, was retried one by one: the two clip_a questions answered, the clip_b ones errored
    assert results["overall"] == {"n": 4, "correct": 2, "accuracy": 0.5, "unanswered": 2, "errors": 2}
    assert "2 questions failed" in (tmp_path / "results.md").read_text()
    broken.clear()
    asked.clear()
    results = run_eval(d, predict, tmp_path, progress=False)
    assert asked == ["clip_b.mp4", "clip_b.mp4"] and results["overall"]["errors"] == 0


def test_lookup_probe_items_name_one_object_and_score_the_first_listed_guess(tmp_path):
    """Each item's question names an attribute held by exactly one listed object, whose other attribute is
    the answer; the report scores the first-listed guess beside the model, and a predictor that answers with
    that guess scores exactly it."""
    from keye.eval.formats import load_definition

    d = load_definition("lookup", ["items=120"])
    items = read_items(d)
    assert len(items) == 120 and all(not item.media for item in items)
    for item in items:
        listing, question = item.question.rsplit(". ", 1)
        objects = [entry.split()[:2] for entry in listing.split(", ")]  # [colour, shape] per listed object
        named = question.split()[-1].rstrip("?") if item.categories["kind"] == "color" else question.split()[-2]
        slot = 1 if item.categories["kind"] == "color" else 0  # the named attribute's place in "colour shape"
        holders = [obj for obj in objects if obj[slot] == named]
        assert len(holders) == 1 and holders[0][1 - slot] == item.answer, item
        assert item.guess == objects[0][1 - slot] and item.categories["objects"] == str(len(objects))
    guessed = sum(item.guess == item.answer for item in items) / len(items)
    assert 0.4 < guessed < 0.9  # a real baseline, neither always nor never right

    by_question = {format_prompt(d.prompt, item): item for item in items}

    def first_listed(conversations):
        return [by_question[question_of(c)].guess for c in conversations]

    results = run_eval(d, first_listed, tmp_path, progress=False, batch_size=8)
    assert results["overall"]["accuracy"] == pytest.approx(guessed)
    assert results["overall"]["guess_accuracy"] == pytest.approx(guessed)
    assert "| color |" in (tmp_path / "results.md").read_text() and " guess |" in (tmp_path / "results.md").read_text()


def test_keye_eval_lookup_needs_no_data(nano, tmp_path, capsys):
    assert main(["eval", "lookup", "items=4", "--model", str(nano[0]), "--out", str(tmp_path), "--device", "cpu",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "lookup: accuracy" in out and "the items' own guess scores" in out
    assert json.loads((tmp_path / "results.json").read_text())["overall"]["n"] == 4


def test_world_text_items_are_the_split_answered_from_each_clips_listing(world):
    """The text oracle asks each row of the split after the listing of its own clip, rebuilt from world.json."""
    from keye.data.world.generate import frame_objects, make_clip
    from keye.eval.formats import load_definition

    d = load_definition("world-text", [f"annotations={world}"])
    items, rows = read_items(d), read_rows(world)
    assert [i.id for i in items] == [r["id"] for r in rows] and [i.answer for i in items] == [r["answer"] for r in rows]
    config = WorldConfig.from_dict(json.loads((world.parent / "world.json").read_text())["config"])
    for item, row in zip(items, rows):
        assert not item.media and item.question.endswith(row["question"])
        clip, _ = make_clip(config, "test", row["clip_id"])
        lines = item.question.splitlines()[1:]  # after the listing's one-line legend
        for (seconds, seen), line in zip(frame_objects(clip), lines):
            assert line.startswith(f"{seconds:.1f}s ") and all(obj.name in line for _, _, obj in seen)
    missing = world.parent / "copy"
    missing.mkdir()
    (missing / "test.jsonl").write_text(world.read_text())
    with pytest.raises(KeyeInputError, match="world.json"):
        read_items(load_definition("world-text", [f"annotations={missing / 'test.jsonl'}"]))


def test_world_items_are_scored_by_how_crowded_their_scene_is(world):
    """A world item carries its clip's shots and, where the question names one object, that object's kind
    and company (the objects of its shot), read off the clip rebuilt from world.json; the report has a table
    for each. A split without its world.json keeps kind and reasoning alone."""
    from keye.data.world.generate import make_clip
    from keye.eval.formats import load_definition
    from keye.eval.runner import accuracy_table, markdown_report

    config = WorldConfig.from_dict(json.loads((world.parent / "world.json").read_text())["config"])
    items, rows = read_items(load_definition("world", [f"annotations={world}"])), read_rows(world)
    named = 0
    for item, row in zip(items, rows):
        clip, _ = make_clip(config, "test", row["clip_id"])
        assert item.categories["shots"] == str(len(clip.shots))
        question, kind = row["question"], row["kind"]
        shots = [shot for shot in clip.shots for obj in shot.objects
                 if (kind in ("motion", "entry") and f"the {obj.name} " in question)
                 or (kind == "color" and question.endswith(f"the {obj.shape}?"))
                 or (kind == "shape" and f"the {obj.color} object" in question)]
        if kind in ("motion", "entry", "color", "shape"):
            n = len(shots[0].objects)
            assert len(shots) == 1 and item.categories["company"] == f"{kind}, {n} object{'s' * (n != 1)}"
            named += 1
        else:
            assert "company" not in item.categories, (kind, question)
    assert named >= 4
    records = [{"pred": "x", "correct": i % 2 == 0, "answer": item.answer, "categories": item.categories}
               for i, item in enumerate(items)]
    report = markdown_report({"name": "t", **accuracy_table(records, [])})
    assert "| company | n | accuracy |" in report and "| shots | n | accuracy |" in report

    bare = world.parent / "bare"
    bare.mkdir()
    (bare / "test.jsonl").write_text(world.read_text())
    items = read_items(load_definition("world", [f"annotations={bare / 'test.jsonl'}"]))
    assert all(set(item.categories) == {"kind", "reasoning"} for item in items)


def test_world_reports_how_many_chain_placements_the_listing_confirms(world, tmp_path):
    """On a world split the runner checks each generated chain's placements ("the red circle is in the top left
    at 1.0s") against the clip's frame listing: reference chains are all confirmed, the same chains moved to a
    time no frame has none; the counts add up per kind and overall, and the report gains the column. Bare
    answers place nothing, and the column stays out."""
    from keye.eval.runner import markdown_report
    from keye.data.world.words import placement_claims

    rows = read_rows(world)
    truth = {(Path(r["videos"][0]).name, r["question"]): (i, r) for i, r in enumerate(rows)}

    def chains(conversations):
        out = []
        for c in conversations:
            i, row = truth[(Path(c[0]["content"][0]["video"]).name, question_of(c))]
            cot = row["cot"] if i % 2 == 0 else re.sub(r"\b\d+\.\ds\b", "99.0s", row["cot"])
            out.append(f"<think>{cot}</think>{row['answer']}")
        return out

    d = load_definition("world", [f"annotations={world}", "mode=think"])
    results = run_eval(d, chains, tmp_path / "think", progress=False)
    expected: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        n = len(placement_claims(row["cot"]))
        claims, right = expected.setdefault(row["kind"], [0, 0])
        expected[row["kind"]] = [claims + n, right + (n if i % 2 == 0 else 0)]
    got = {kind: [g["placements"]["claims"], g["placements"]["right"]] for kind, g in results["by"]["kind"].items()}
    assert got == expected
    placed = results["overall"]["placements"]
    assert placed["claims"] == sum(c for c, _ in expected.values()) and 0 < placed["right"] < placed["claims"]
    assert placed["share"] == placed["right"] / placed["claims"]
    assert "chain placements right |" in (tmp_path / "think" / "results.md").read_text()

    bare = run_eval(d, lambda cs: ["x"] * len(cs), tmp_path / "bare", progress=False)
    assert bare["overall"]["placements"]["claims"] == 0 and bare["overall"]["placements"]["share"] is None
    assert "chain placements" not in markdown_report(bare)
