"""Packing equals no packing on the real model: keye-nano (ViT + mlp_AR + Qwen3-MoE) on packed rows of
world samples with video gives each sample the loss, gradients and logits it gets alone."""

import json

import pytest
import torch
from transformers.utils import is_flash_attn_2_available

from keye.data.collate import SampleBuilder, collate, collate_packed, count_label_tokens
from keye.data.packing import plan_packs
from keye.data.world import WorldConfig, generate_world
from keye.errors import ConfigError, KeyeInputError
from keye.models import attention, build_model
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


# Every decoder attention the packed path feeds (keye.models.attention). FlexAttention has no backward on CPU,
# so there it is checked on the loss alone; flash-attn needs a GPU and the package.
ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IMPLEMENTATIONS = [
    pytest.param("eager", "cpu", id="eager"),
    pytest.param("varlen_sdpa", "cpu", id="varlen_sdpa"),
    pytest.param("flex_attention", "cpu", id="flex-cpu-forward"),
    pytest.param("varlen_sdpa", "cuda", id="varlen_sdpa-cuda", marks=ON_GPU),
    pytest.param("flex_attention", "cuda", id="flex-cuda", marks=ON_GPU),
    pytest.param("flash_attention_2", "cuda", id="flash2-cuda", marks=[ON_GPU, pytest.mark.skipif(
        not is_flash_attn_2_available(), reason="flash-attn is not installed")]),
]


@pytest.mark.parametrize("impl, device", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_packed_and_padded_batches_equal_unpadded_forwards(nano, samples, processor, monkeypatch, impl, device, layout):
    """Loss and gradients of packed rows (several samples per row, one row padded) and of a padded batch equal
    those of every sample alone, for each attention implementation; only eager builds a dense (L, L) mask."""
    nano.set_attn_implementation(impl)
    nano.to(device)
    if impl != "eager":
        monkeypatch.setattr(attention, "dense_causal_mask", None)  # calling it would fail the test
    if layout == "padded" and impl != "flex_attention":  # right-padded rows: one causal call, no per-run loop
        monkeypatch.setattr(attention, "varlen_sdpa", None)
    batch = packed_batch(samples, processor) if layout == "packed" else collate(samples, processor.tokenizer.pad_token_id)
    assert count_label_tokens(batch) == sum(count_label_tokens(alone(s, processor)) for s in samples)
    to = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    backward = not (impl == "flex_attention" and device == "cpu")
    with torch.set_grad_enabled(backward):
        packed = lm_loss_fn(nano, to(batch)).loss_sum
        separate = sum(lm_loss_fn(nano, to(alone(s, processor))).loss_sum for s in samples)
    # measured on CPU float32: losses equal to the last bit, gradients within 2e-6 of each tensor's largest entry;
    # flash-attn computes in bf16
    rtol = 1e-2 if impl.startswith("flash") else 1e-5
    torch.testing.assert_close(packed, separate, rtol=rtol, atol=0)
    if not backward:
        return
    packed_grads, separate_grads = grads_of(nano, packed), grads_of(nano, separate)
    assert packed_grads.keys() == separate_grads.keys()
    assert any(name.startswith("visual.") for name in packed_grads)  # the video path is in the comparison
    for name, grad in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=rtol, atol=rtol * float(grad.abs().max()), msg=name)


def test_the_comparison_sees_a_leak_between_packed_samples(nano, samples, processor):
    """Sharp enough to see a leak: packed rows under one causal mask per row (no segment_ids) differ."""
    batch = packed_batch(samples, processor)
    with torch.no_grad():
        separate = sum(lm_loss_fn(nano, alone(s, processor)).loss_sum for s in samples)
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
