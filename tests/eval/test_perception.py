"""Teacher-forced word accuracy of frame listings and of reference chains: a predictor that reads the next
reference token scores 1, one that gets every colour wrong scores 0 on colours and 1 elsewhere, and the words
scored are the listing's, or the chain's and not the answer after it."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from keye.data.world import WorldConfig, generate_world
from keye.data.world.generate import frame_backgrounds, frame_objects, make_clip
from keye.data.world.scene import BACKGROUNDS, COLORS
from keye.data.world.words import word_type
from keye.eval.perception import chain_word_accuracy, listing_word_accuracy
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
    clips = [make_clip(CONFIG, "val", f"val-{i:05d}")[0] for i in range(2)]
    frames = [seen for clip in clips for _, seen in frame_objects(clip)]
    objects, empty = sum(len(seen) for seen in frames), sum(not seen for seen in frames)
    assert perfect["accuracy"] == 1.0 and perfect["words"] == 4 * objects + empty  # colour, shape, row, column
    assert perfect["per_type"]["colour"] == 1.0

    ids = {name: processor.tokenizer.convert_tokens_to_ids("Ġ" + name) for name in COLORS}
    names = list(ids)
    wrong = {ids[n]: ids[names[(i + 1) % len(names)]] for i, n in enumerate(names)}
    colour_blind = listing_word_accuracy(NextToken(vocab, wrong), processor, world, video=VIDEO)
    assert colour_blind["per_type"]["colour"] == 0.0 and colour_blind["per_type"]["shape"] == 1.0
    assert colour_blind["accuracy"] == pytest.approx(1 - objects / perfect["words"])

    # split by mention: an object's words where the frame before did not list it are "first"
    first = sum(len(seen) for clip in clips for seen in _new_objects(clip))
    assert perfect["mention_words"]["first"] == 4 * first > 0
    assert sum(perfect["mention_words"].values()) == perfect["words"] - empty  # "nothing" has no mention
    assert all(v == 1.0 for labels in perfect["by_mention"].values() for v in labels.values())
    assert colour_blind["by_mention"]["colour"] == {"first": 0.0, "same": 0.0}  # a colour never changes
    assert colour_blind["by_mention"]["shape"] == {"first": 1.0, "same": 1.0}


def test_listing_word_accuracy_scores_the_backgrounds_a_world_names(tmp_path):
    import dataclasses

    config = dataclasses.replace(CONFIG, listing_backgrounds=True)
    generate_world(tmp_path, config, progress=False)
    processor = load_nano_processor()
    vocab = len(processor.tokenizer)
    perfect = listing_word_accuracy(NextToken(vocab), processor, tmp_path, video=VIDEO)
    clips = [make_clip(config, "val", f"val-{i:05d}")[0] for i in range(2)]
    frames = [seen for clip in clips for _, seen in frame_objects(clip)]
    backgrounds = [name for clip in clips for name in frame_backgrounds(clip)]
    colours = sum(len(name.split("/")) for name in backgrounds)  # "dark green" is one word, "navy/gray" two
    assert perfect["words"] == 4 * sum(len(seen) for seen in frames) + sum(not seen for seen in frames) + colours
    assert perfect["per_type"]["background"] == 1.0 and perfect["accuracy"] == 1.0
    # a background is a first mention in a clip's first frame and after each cut, the same one after that
    first_objects = sum(len(seen) for clip in clips for seen in _new_objects(clip))
    first_backgrounds = sum(len(shot.background.colors) for clip in clips for shot in clip.shots)
    assert perfect["mention_words"]["first"] == 4 * first_objects + first_backgrounds
    assert perfect["by_mention"]["background"] == {"first": 1.0, "same": 1.0}

    ids = {name: processor.tokenizer.convert_tokens_to_ids("Ġ" + name) for name in BACKGROUNDS if " " not in name}
    names = list(ids)
    wrong = {ids[n]: ids[names[(i + 1) % len(names)]] for i, n in enumerate(names)}
    blind = listing_word_accuracy(NextToken(vocab, wrong), processor, tmp_path, video=VIDEO)
    assert blind["per_type"]["background"] < 1.0
    assert blind["per_type"]["colour"] == blind["per_type"]["shape"] == blind["per_type"]["position"] == 1.0


def _new_objects(clip):
    """Per listed frame, the objects the frame before did not list."""
    before = set()
    for _, seen in frame_objects(clip):
        now = {obj.name for _, _, obj in seen}
        yield now - before
        before = now


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
    from keye.cli.options import trained_video_options
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


def test_the_linear_read_scores_as_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    from keye.eval.perception import _linear_fit

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 0.6
    y = torch.randint(0, 4, (600,), generator=g)
    x = centres[y] + torch.randn(600, 16, generator=g)
    ours = (_linear_fit(x[:400], y[:400])(x[400:]) == y[400:]).float().mean().item()
    reference = LogisticRegression(max_iter=2000).fit(x[:400].numpy(), y[:400].numpy()).score(x[400:].numpy(),
                                                                                             y[400:].numpy())
    assert 0.5 < ours == pytest.approx(reference, abs=0.02)  # separable enough to say something, not trivially


class PositionTokens(nn.Module):
    """A stand-in model whose visual tokens hold their own row and column one-hot and nothing of the pixels."""

    config = SimpleNamespace(vision_mode="continuous", projector_config=SimpleNamespace(merge_size=2))
    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def visual(self, pixel_values, grid_thw, previous_pixels=None):
        return pixel_values

    def mlp_AR(self, patches, grid_thw):
        tokens = []
        for _, h, w in grid_thw.tolist():
            rows, cols = torch.arange(h // 2).repeat_interleave(w // 2), torch.arange(w // 2).repeat(h // 2)
            tokens.append(torch.cat([nn.functional.one_hot(rows, h // 2), nn.functional.one_hot(cols, w // 2)], -1))
        return torch.cat(tokens).float()


class PositionCodes(PositionTokens):
    """The discrete twin of ``PositionTokens``: codebook 0 names a token's row, codebook 1 its column."""

    config = SimpleNamespace(vision_mode="discrete", projector_config=SimpleNamespace(merge_size=2),
                             text_config=SimpleNamespace(vocab_size=10),
                             visual_tokenizer_config=SimpleNamespace(num_codes=8, codebook_size=4))

    def visual_code_ids(self, pixel_values, grid_thw, previous_pixels=None):
        codes = []
        for _, h, w in grid_thw.tolist():
            rows, cols = torch.arange(h // 2).repeat_interleave(w // 2), torch.arange(w // 2).repeat(h // 2)
            codes.append(torch.stack([rows, 4 + cols], -1))
        return torch.cat(codes) + self.config.text_config.vocab_size


def test_token_readout_reads_what_the_tokens_hold(tmp_path):
    from keye.errors import KeyeInputError
    from keye.eval.perception import token_readout

    config = WorldConfig.from_dict({"seed": 4, "clips": {"train": 6, "val": 2, "test": 0},
                                    "scene": {"height": 56, "width": 56}, "crop_size": 56})
    generate_world(tmp_path, config, progress=False)
    processor = load_nano_processor()
    result = token_readout(PositionTokens(), processor, tmp_path, train_clips=6, video=VIDEO)
    assert result["per_kind"]["row"] == result["per_kind"]["column"] == 1.0
    listed = [seen for i in range(2) for _, seen in frame_objects(make_clip(config, "val", f"val-{i:05d}")[0])]
    assert result["objects"] == sum(map(len, listed)) and result["tokens"] == 4 * len(listed)  # 2 x 2 tokens a frame
    # a discrete model is read on its codes: the one codebook that names the column is enough
    codes = token_readout(PositionCodes(), processor, tmp_path, train_clips=6, video=VIDEO)
    assert codes["per_kind"]["row"] == codes["per_kind"]["column"] == 1.0 and codes["tokens"] == result["tokens"]
    with pytest.raises(KeyeInputError, match="fitted on 7 train clips; the world has 6"):
        token_readout(PositionTokens(), processor, tmp_path, train_clips=7, video=VIDEO)


class RecordingTokens(PositionTokens):
    """``PositionTokens`` that keeps what the tower was given: each frame's patches and the frame before's."""

    def visual(self, pixel_values, grid_thw, previous_pixels=None):
        self.seen.append((pixel_values, previous_pixels))
        return pixel_values


def test_token_readout_labels_each_move_and_shows_the_frame_before(tmp_path):
    from keye.data.collate import SampleBuilder
    from keye.data.world.scene import MOTIONS, STILL
    from keye.eval.perception import _token_table

    config = WorldConfig.from_dict({"seed": 6, "clips": {"train": 0, "val": 4, "test": 0},
                                    "scene": {"height": 56, "width": 56}, "crop_size": 56})
    generate_world(tmp_path, config, progress=False)
    model = RecordingTokens()
    model.seen = []
    table = _token_table(model, SampleBuilder(load_nano_processor(), VIDEO, base_dir=tmp_path), config, "val", range(4))
    expected = []
    for i, (pixels, previous) in enumerate(model.seen):
        clip = make_clip(config, "val", f"val-{i:05d}")[0]
        frames = pixels.split(16)  # 56 x 56: 4 x 4 patches a frame, every 2 fps frame listed
        assert torch.equal(previous, torch.cat([frames[0], *frames[:-1]]))
        listed = list(frame_objects(clip))
        for j in range(1, len(listed)):
            shot = clip.shots[clip.shot_of(j * clip.grid_step)]
            if clip.shot_of((j - 1) * clip.grid_step) != clip.shot_of(j * clip.grid_step):
                continue
            paused = shot.pause is not None and shot.pause[0] < j * clip.grid_step < shot.pause[1]
            before = {id(o) for _, _, o in listed[j - 1][1]}
            expected += [STILL if paused else o.motion for _, _, o in listed[j][1] if id(o) in before]
    assert [MOTIONS[k] for k in table["motion"][1].tolist()] == expected
    assert {STILL} < set(expected)  # moves and rests both in the labels


def test_keye_probe_tokens_prints_the_read_of_the_model_it_loads(tmp_path, capsys):
    from keye.api import load
    from keye.cli import main
    from keye.eval.perception import token_readout
    from keye.models import build_model

    config = WorldConfig.from_dict({"seed": 5, "clips": {"train": 3, "val": 1, "test": 0},
                                    "scene": {"height": 56, "width": 56}, "crop_size": 56})
    generate_world(tmp_path / "world", config, progress=False)
    torch.manual_seed(0)
    stage = tmp_path / "stage0"
    build_model("keye-nano").save_pretrained(stage / "model")
    load_nano_processor().save_pretrained(stage / "model")
    (stage / "config.yaml").write_text("stage: vit\nvideo: {fps: 2.0, min_pixels: 3136, max_pixels: 3136, "
                                       "slow_fast: false}\n")
    assert main(["probe", "tokens", "--model", str(stage / "model"), "--world", str(tmp_path / "world"),
                 "--train-clips", "3", "--device", "cpu", "--dtype", "float32", "--json"]) == 0
    printed = capsys.readouterr().out
    reported = json.loads(printed[printed.index("{"):])
    pipe = load(str(stage / "model"), device="cpu", dtype="float32")
    expected = token_readout(pipe.model, pipe.processor, tmp_path / "world", train_clips=3, video=VIDEO)
    assert reported["per_kind"] == expected["per_kind"] and reported["objects"] == expected["objects"]
    assert f"(majority class {100 * expected['majority']['column']:.1f}%)" in printed
