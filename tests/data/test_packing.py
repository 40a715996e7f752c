"""Packing: a packed row gives each sample exactly the logits and loss it gets alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye.data.packing import IGNORE_INDEX, block_causal_mask, pack, plan_packs


class TinyRopeAttention(torch.nn.Module):
    """Embedding -> one RoPE self-attention layer -> LM head: just enough to leak across samples."""

    def __init__(self, vocab: int = 40, dim: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids_L: torch.Tensor, pos_L: torch.Tensor, mask_LL: torch.Tensor) -> torch.Tensor:
        x_LD = self.embed(ids_L)
        q, k, v = self.qkv(x_LD).chunk(3, dim=-1)
        half = q.shape[-1] // 2
        freqs = 1.0 / 100 ** (torch.arange(half) / half)
        ang_LH = pos_L[:, None].float() * freqs
        cos, sin = ang_LH.cos().repeat(1, 2), ang_LH.sin().repeat(1, 2)

        def rope(t):
            return t * cos + torch.cat([-t[:, half:], t[:, :half]], dim=-1) * sin

        out = F.scaled_dot_product_attention(rope(q)[None], rope(k)[None], v[None], attn_mask=mask_LL)[0]
        return self.head(x_LD + out)


def _loss_sum(logits_LV, labels_L):
    return F.cross_entropy(logits_LV[:-1], labels_L[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def _samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 5, 9, 4, 2, 6]
    ids = [torch.randint(0, 40, (n,), generator=g) for n in lengths]
    labels = []
    for x in ids:  # assistant-only: the prompt half is ignored
        lab = x.clone()
        lab[: len(x) // 2] = IGNORE_INDEX
        labels.append(lab)
    return ids, labels


def test_plan_is_first_fit_decreasing_and_fits():
    lengths = [7, 3, 5, 9, 4, 2, 6]
    rows = plan_packs(lengths, max_length=10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert rows == [[3], [0, 1], [6, 4], [2, 5]]  # FFD by hand: 9 | 7+3 | 6+4 | 5+2


def test_packed_logits_and_loss_equal_separate_runs():
    torch.manual_seed(0)
    model = TinyRopeAttention()
    ids, labels = _samples()
    rows = pack(ids, labels, max_length=12)
    assert len(rows) < len(ids)
    packed_loss, alone_loss = 0.0, 0.0
    for row in rows:
        padded = row.pad(12, pad_id=0)
        logits = model(padded.input_ids, padded.position_ids, block_causal_mask(padded.cu_seqlens))
        packed_loss += _loss_sum(logits, padded.labels)
        for seg, i in enumerate(row.sample_indices):
            a, b = int(row.cu_seqlens[seg]), int(row.cu_seqlens[seg + 1])
            n = len(ids[i])
            alone = model(ids[i], torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril())
            torch.testing.assert_close(logits[a:b], alone, rtol=1e-5, atol=1e-5)
            alone_loss += _loss_sum(alone, labels[i])
    torch.testing.assert_close(packed_loss, alone_loss)


def test_without_isolation_samples_leak():
    """Negative control: a plain causal mask, or unmasked boundary labels, changes the result."""
    torch.manual_seed(0)
    model = TinyRopeAttention()
    ids, labels = _samples()
    row = next(r for r in pack(ids, labels, max_length=12) if len(r.sample_indices) > 1)
    L = len(row.input_ids)
    isolated = model(row.input_ids, row.position_ids, block_causal_mask(row.cu_seqlens))
    leaky = model(row.input_ids, row.position_ids, torch.ones(L, L, dtype=torch.bool).tril())
    second = slice(int(row.cu_seqlens[1]), int(row.cu_seqlens[2]))
    assert not torch.allclose(isolated[second], leaky[second], atol=1e-4)
    j = row.sample_indices[1]
    unmasked = torch.cat([labels[i] for i in row.sample_indices])
    unmasked[int(row.cu_seqlens[1])] = ids[j][0]  # what naive concatenation of full labels would train on
    assert row.labels[int(row.cu_seqlens[1])] == IGNORE_INDEX
    assert not torch.isclose(_loss_sum(isolated, unmasked), _loss_sum(isolated, row.labels))


def test_multi_axis_position_ids_restart_per_sample():
    ids, labels = _samples()
    pos = [torch.stack([torch.arange(len(x)), torch.arange(len(x)) * 2, torch.zeros(len(x), dtype=torch.long)]) for x in ids]
    for row in pack(ids, labels, max_length=12, position_ids=pos):
        assert row.position_ids.shape == (3, len(row.input_ids))
        for seg, i in enumerate(row.sample_indices):
            a, b = int(row.cu_seqlens[seg]), int(row.cu_seqlens[seg + 1])
            assert torch.equal(row.position_ids[:, a:b], pos[i])
