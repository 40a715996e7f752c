"""Teacher-forced word accuracy of frame listings and of reference chains: a predictor that reads the next
reference token scores 1, one that gets every colour wrong scores 0 on colours and 1 elsewhere, and the words
scored are the listing's, or the chain's and not the answer after it."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from keye.data.world import WorldConfig, generate_world
from keye.data.world.generate import frame_objects, make_clip
from keye.data.world.scene import COLORS
from keye.eval.perception import chain_word_accuracy, listing_word_accuracy, word_type
from keye.processing import load_nano_processor
from keye.video import VideoOptions

VIDEO = VideoOptions(fps=2.0, min_pixels=3136, max_pixels=3136, slow_fast=False)
CONFIG = WorldConfig.from_dict({"seed": 3, "clips": {"train": 0, "val": 2, "test": 0},
                                "scene": {"height": 56, "width": 56}, "crop_size": 56})


class NextToken(nn.Module):
    """Predicts the reference's next token (teacher forcing hands it in), optionally naming a wrong colour."""

    def __init__(self, vocab: int, wrong_colours: dict[int, int] | None = None):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong_colours or {}
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        nxt = nxt.apply_(lambda t: self.wrong.get(t, t))
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("perception")
    generate_world(out, CONFIG, progress=False)
    return out


def test_listing_word_accuracy_scores_the_listing_words(world):
    processor = load_nano_processor()
    vocab = len(processor.tokenizer)
    perfect = listing_word_accuracy(NextToken(vocab), processor, world, video=VIDEO)
    frames = [seen for i in range(2) for _, seen in frame_objects(make_clip(CONFIG, "val", f"val-{i:05d}")[0])]
    objects, empty = sum(len(seen) for seen in frames), sum(not seen for seen in frames)
    assert perfect["accuracy"] == 1.0 and perfect["words"] == 4 * objects + empty  # colour, shape, row, column
    assert perfect["per_type"]["colour"] == 1.0

    ids = {name: processor.tokenizer.convert_tokens_to_ids("Ġ" + name) for name in COLORS}
    names = list(ids)
    wrong = {ids[n]: ids[names[(i + 1) % len(names)]] for i, n in enumerate(names)}
    colour_blind = listing_word_accuracy(NextToken(vocab, wrong), processor, world, video=VIDEO)
    assert colour_blind["per_type"]["colour"] == 0.0 and colour_blind["per_type"]["shape"] == 1.0
    assert colour_blind["accuracy"] == pytest.approx(1 - objects / perfect["words"])


def test_chain_word_accuracy_scores_the_chain_words_not_the_answer(world):
    processor = load_nano_processor()
    vocab = len(processor.tokenizer)
    rows = [json.loads(line) for line in (world / "val.jsonl").read_text().splitlines()]
    chains = [r["cot"] for r in rows if r.get("reasoning") and r.get("cot")]
    assert chains, "the fixture world asks no reasoning question"
    scored = sum(word_type(w.strip(".,:")) is not None for c in chains for w in c.lower().split())
    perfect = chain_word_accuracy(NextToken(vocab), processor, world, split="val", video=VIDEO)
    assert perfect["accuracy"] == 1.0 and perfect["words"] == scored

    ids = {name: processor.tokenizer.convert_tokens_to_ids("Ġ" + name) for name in COLORS}
    names = list(ids)
    wrong = {ids[n]: ids[names[(i + 1) % len(names)]] for i, n in enumerate(names)}
    colour_blind = chain_word_accuracy(NextToken(vocab, wrong), processor, world, split="val", video=VIDEO)
    colours = sum(w.strip(".,:") in COLORS for c in chains for w in c.lower().split())
    assert colour_blind["per_type"]["colour"] == 0.0 and colour_blind["words"] == scored
    assert colour_blind["accuracy"] == pytest.approx(1 - colours / scored)


def test_keye_probe_perception_scores_with_the_sampling_the_model_trained_with(world, tmp_path, capsys):
    from keye.cli import main
    from keye.cli.probe import trained_video_options
    from keye.models import build_model

    torch.manual_seed(0)
    model, processor = build_model("keye-nano").eval(), load_nano_processor()
    stage = tmp_path / "stage2"  # a stage folder as the runner writes it: config.yaml beside model/
    model.save_pretrained(stage / "model")
    processor.save_pretrained(stage / "model")
    (stage / "config.yaml").write_text("stage: multitask\nvideo: {fps: 2.0, min_pixels: 3136, max_pixels: 3136, "
                                       "slow_fast: false}\n")
    assert trained_video_options(str(stage / "model")) == VIDEO
    assert main(["probe", "perception", "--model", str(stage / "model"), "--world", str(world), "--device", "cpu",
                 "--json"]) == 0
    printed = capsys.readouterr().out
    reported = json.loads(printed[printed.index("{"):])
    assert reported == listing_word_accuracy(model, processor, world, video=VIDEO)
    assert f"{100 * reported['per_type']['colour']:5.1f}%" in printed

    assert main(["probe", "perception", "--model", str(stage / "model"), "--world", str(tmp_path)]) == 2
    assert "no world.json" in capsys.readouterr().err
