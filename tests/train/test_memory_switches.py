"""The memory switches change memory, not results: the chunked LM-head loss and activation checkpointing give
the gradients of the plain path, and really do what they promise (no full logits; blocks recomputed)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from keye.errors import ConfigError
from keye.models import build_model
from keye.models.losses import head_cross_entropy
from keye.processing import load_nano_processor
from keye.train.session import RunConfig, TrainSession, enable_activation_checkpointing
from keye.video.types import FAST, SLOW, VideoClip


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
        return out


def test_chunked_head_loss_equals_the_plain_head_without_its_logits():
    torch.manual_seed(0)
    N, D, V, chunk = 40, 8, 500, 4
    head = torch.nn.Linear(D, V, bias=False)
    hidden = torch.randn(N, D, requires_grad=True)
    target = torch.randint(0, V, (N,))
    results = {}
    for c in (0, chunk):
        head.zero_grad()
        hidden.grad = None
        with LargestTensor() as largest:
            loss = head_cross_entropy(head, hidden, target, chunk=c)
            loss.backward()
        results[c] = (loss.detach(), hidden.grad.clone(), head.weight.grad.clone(), largest.numel)
    torch.testing.assert_close(results[chunk][0], results[0][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results[chunk][1], results[0][1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[chunk][2], results[0][2], rtol=1e-5, atol=1e-7)
    assert results[0][3] >= N * V  # the plain head holds every position's logits
    assert results[chunk][3] <= max(chunk * V, V * D)  # the chunked one a chunk's (or the weight's gradient)


def test_model_loss_chunks_give_the_loss_and_gradients_of_one_pass():
    torch.manual_seed(0)
    model = build_model("keye-nano").train()
    ids = torch.randint(0, 1900, (2, 30))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["attention_mask"][1, 24:] = 0
    batch["labels"][1, 24:] = -100
    out = {}
    for chunk in (0, 7):
        model.zero_grad()
        loss = model(**batch, sparse_logits=True, num_items_in_batch=1, loss_chunk=chunk).lm_loss
        loss.backward()
        out[chunk] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out[7][0], out[0][0], rtol=1e-6, atol=0)
    assert "lm_head.weight" in out[0][1]
    for name, grad in out[0][1].items():
        torch.testing.assert_close(out[7][1][name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


def _video_batch():
    processor = load_nano_processor()
    g = torch.Generator().manual_seed(0)
    sizes = [((56, 56), SLOW), ((28, 28), FAST), ((56, 56), SLOW)]
    clip = VideoClip(frames=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for (h, w), _ in sizes],
                     frame_types=torch.tensor([t for _, t in sizes], dtype=torch.int32),
                     timestamps=torch.arange(3) * 0.5, indices=torch.arange(3), slow_size=(56, 56),
                     fast_size=(28, 28), source_fps=2.0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]},
                {"role": "assistant", "content": "A red ball rolls to the left, then a blue cube."}]
    text = processor.apply_chat_template(messages, add_generation_prompt=False)
    return processor(text=[text, text], videos=[clip, clip], return_labels=True)


def test_activation_checkpointing_recomputes_every_block_and_keeps_the_gradients():
    batch = _video_batch()
    grads, calls = {}, {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model("keye-nano").train()
        if checkpointed:
            assert enable_activation_checkpointing(model) > 0
        blocks = [*model.visual.vision_model.encoder.layers, *(layer.self_attn for layer in model.model.layers)]
        count = [0]
        for block in blocks:
            block.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))  # recomputes stop early
        out = model(**batch, sparse_logits=True, num_items_in_batch=1)
        out.loss.backward()  # the LM loss and the MoE router loss
        grads[checkpointed] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        calls[checkpointed] = count[0]
    assert calls[False] == 6 and calls[True] == 12  # 2 ViT + 4 decoder blocks, each run again in the backward
    assert grads[True].keys() == grads[False].keys() and any(n.startswith("visual.") for n in grads[False])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_the_run_switch_checkpoints_the_model_it_trains(tmp_path):
    model = build_model("keye-nano")
    TrainSession(model, RunConfig(steps=1, activation_checkpointing=True), tmp_path)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert model.visual.vision_model.encoder.gradient_checkpointing
    with pytest.raises(ConfigError, match="run.activation_checkpointing: Linear has no blocks"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
