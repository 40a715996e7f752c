"""Packing equals no packing on the real model: keye-nano (ViT + mlp_AR + Qwen3-MoE) on packed rows of
world samples with video gives each sample the loss, gradients and logits it gets alone."""

import json

import pytest
import torch

from keye.data.collate import SampleBuilder, collate, collate_packed, count_label_tokens
from keye.data.packing import plan_packs
from keye.data.world import WorldConfig, generate_world
from keye.errors import ConfigError, KeyeInputError
from keye.models import build_model
from keye.models.modeling import mrope_positions
from keye.processing import load_nano_processor
from keye.train.stages.lm import LMStageConfig, lm_loss_fn
from keye.video import VideoOptions


def pack_length(samples) -> int:
    """Rows as long as the longest, second and shortest samples together: first-fit decreasing then puts
    those three in one row and the third longest alone in a padded one (lengths are 238, 144, 116 and
    83 tokens with 56 x 56 frames; derived here so a tokenizer change keeps the layout)."""
    n = sorted((len(s.input_ids) for s in samples), reverse=True)
    return n[0] + n[1] + n[3]


@pytest.fixture(scope="module")
def processor():
    return load_nano_processor()


@pytest.fixture(scope="module")
def samples(tmp_path_factory, processor):
    """Two captions (long labels) and two questions (short answers) from different clips."""
    root = tmp_path_factory.mktemp("pack_world")
    world = WorldConfig.from_dict({"seed": 3, "clips": {"train": 4, "val": 0, "test": 0},
                                   "scene": {"height": 56, "width": 56}, "crop_size": 56})
    generate_world(root, world, progress=False)
    builder = SampleBuilder(processor, VideoOptions(min_pixels=3136, max_pixels=3136, slow_fast=False), base_dir=root)
    captions = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    return [builder(captions[0]), builder(questions[4]), builder(captions[2]), builder(questions[9])]


@pytest.fixture
def nano():
    torch.manual_seed(0)
    return build_model("keye-nano").train()


def packed_batch(samples, processor):
    batch = collate_packed(samples, processor.tokenizer.pad_token_id, pack_length(samples))
    per_row = batch["segment_ids"].max(-1).values + 1
    assert len(per_row) < len(samples) and per_row.max() >= 3  # really packed: several samples share a row
    assert (batch["attention_mask"] == 0).any()  # and one row is padded
    return batch


def alone(sample, processor):
    return collate([sample], processor.tokenizer.pad_token_id)


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_positions_restart_per_sample(nano, samples, processor):
    # checked directly: with attention kept inside each sample, RoPE's relative form makes a constant
    # offset per sample invisible to the loss (up to rounding), so the equality test below cannot see it
    batch = packed_batch(samples, processor)
    positions, _ = mrope_positions(batch["input_ids"], batch["attention_mask"], nano.config,
                                   video_grid_thw=batch["video_grid_thw"], segment_ids=batch["segment_ids"])
    plan = plan_packs([len(s.input_ids) for s in samples], pack_length(samples))  # the rows collate_packed built
    for b, members in enumerate(plan):
        for k, i in enumerate(members):
            one = alone(samples[i], processor)
            expected, _ = mrope_positions(one["input_ids"], one["attention_mask"], nano.config,
                                          video_grid_thw=one["video_grid_thw"])
            assert torch.equal(positions[:, b, batch["segment_ids"][b] == k], expected[:, 0])
            assert expected[0, 0, -1] < len(one["input_ids"][0]) - 1  # vision blocks: not plain 0..L-1


def test_packed_loss_and_gradients_equal_unpadded_forwards(nano, samples, processor):
    batch = packed_batch(samples, processor)
    assert count_label_tokens(batch) == sum(count_label_tokens(alone(s, processor)) for s in samples)
    packed = lm_loss_fn(nano, batch).loss_sum
    packed_grads = grads_of(nano, packed)
    separate = sum(lm_loss_fn(nano, alone(s, processor)).loss_sum for s in samples)
    separate_grads = grads_of(nano, separate)
    # measured on CPU float32: losses equal to the last bit, gradients within 2e-6 of each tensor's largest entry
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=0)
    assert packed_grads.keys() == separate_grads.keys()
    assert any(name.startswith("visual.") for name in packed_grads)  # the video path is in the comparison
    for name, grad in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)
    # the comparison is sharp enough to see a leak: one causal mask over the whole row differs
    with torch.no_grad():
        leaky = lm_loss_fn(nano, {k: v for k, v in batch.items() if k != "segment_ids"}).loss_sum
    assert not torch.allclose(leaky, separate, rtol=1e-5, atol=0)


def test_changing_one_packed_sample_leaves_the_others_untouched(nano, samples, processor):
    nano.eval()
    batch = packed_batch(samples, processor)
    b = int(batch["segment_ids"].max(-1).values.argmax())  # the row holding most samples
    first = batch["segment_ids"][b] == 0
    text = first & (batch["input_ids"][b] != nano.config.video_token_id)  # keep the vision blocks valid
    edited = {**batch, "input_ids": batch["input_ids"].clone()}
    g = torch.Generator().manual_seed(1)
    edited["input_ids"][b, text] = torch.randint(0, 1000, (int(text.sum()),), generator=g)
    with torch.no_grad():
        before, after = nano(**batch).logits[b], nano(**edited).logits[b]
    later = batch["segment_ids"][b] > 0
    assert not torch.allclose(before[first], after[first])  # the edit reached the model
    torch.testing.assert_close(after[later], before[later], rtol=1e-5, atol=1e-5)


def test_samples_longer_than_the_pack_length_are_named(samples, processor):
    longest, second = sorted((len(s.input_ids) for s in samples), reverse=True)[:2]
    with pytest.raises(KeyeInputError, match=rf"pack length {second} .*'train-00002-caption', {longest}\)\]"):
        collate_packed(samples, processor.tokenizer.pad_token_id, second)
    with pytest.raises(ConfigError, match="max_length"):
        LMStageConfig(packing=True)
