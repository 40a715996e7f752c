"""The registered policy losses against TRL's own GRPOTrainer._compute_loss on fixed tensors.

TRL's loss code is called, not copied: a bare trainer object gets exactly the attributes
``_compute_loss`` reads, and its log-prob helper is replaced by one returning our fixed tensors, so
model, generation and accelerate never run. TRL is a test-only dependency (the ``dev`` extra).
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from keye.train.rl_losses import POLICY_LOSSES, PolicyLossConfig, sequence_loss

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")


class _IdentityAccelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(logps_BT, old_BT, adv_B, mask_BT, level, eps_low, eps_high, beta=0.0, ref_BT=None):
    trainer = object.__new__(grpo_trainer.GRPOTrainer)
    trainer.__dict__.update(
        importance_sampling_level=level, loss_type="grpo", epsilon_low=eps_low, epsilon_high=eps_high, beta=beta,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, accelerator=_IdentityAccelerator(),
        model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
    )
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps_BT, torch.zeros_like(logps_BT), None)
    B, T = logps_BT.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask_BT,
        "advantages": adv_B, "old_per_token_logps": old_BT,
    }
    if ref_BT is not None:
        inputs["ref_per_token_logps"] = ref_BT
    return trainer._compute_loss(None, inputs), trainer._metrics["train"]


def _fixed(seed=0, B=6, T=9, spread=1e-3):
    g = torch.Generator().manual_seed(seed)
    old_BT = -torch.rand(B, T, generator=g) * 3
    # small per-token drifts so some sequence ratios land inside and some outside GSPO's narrow clip range
    logps_BT = old_BT + spread * torch.randn(B, T, generator=g)
    mask_BT = torch.ones(B, T, dtype=torch.long)
    for b, length in enumerate([9, 3, 7, 1, 5, 9][:B]):
        mask_BT[b, length:] = 0
    adv_B = torch.randn(B, generator=g)
    return logps_BT, old_BT, adv_B, mask_BT


def _ours(name, logps_BT, old_BT, adv_B, mask_BT, cfg, ref_BT=None):
    leaf = logps_BT.clone().requires_grad_(True)
    loss_B, stats = sequence_loss(leaf, old_BT, adv_B, mask_BT, PolicyLossConfig(name, cfg[0], cfg[1], cfg[2]), ref_BT)
    loss = loss_B.mean()
    loss.backward()
    return loss.detach(), leaf.grad, stats


def _theirs(level, logps_BT, old_BT, adv_B, mask_BT, cfg, ref_BT=None):
    leaf = logps_BT.clone().requires_grad_(True)
    loss, metrics = _trl_loss(leaf, old_BT, adv_B, mask_BT, level, cfg[0], cfg[1], cfg[2], ref_BT)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


@pytest.mark.parametrize("spread", [1e-4, 1e-3, 3e-2])
def test_gspo_matches_trl_sequence_level(spread):
    args = _fixed(seed=1, spread=spread)
    cfg = (3e-4, 4e-4, 0.0)
    loss, grad, stats = _ours("gspo", *args, cfg)
    ref_loss, ref_grad, metrics = _theirs("sequence", *args, cfg)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)
    assert grad.abs().sum() > 0 or spread > 1e-2  # a gradient exists unless every ratio is clipped
    assert float(stats["clip_fraction"]) == pytest.approx(metrics["clip_ratio/region_mean"][-1])


def test_gspo_clip_is_asymmetric_and_zeroes_gradients_of_clipped_sequences():
    logps_BT, old_BT, _, mask_BT = _fixed(seed=2, spread=0.0)
    logps_BT = logps_BT.clone()
    logps_BT[0] += 3.5e-4  # ratio ~1 + 3.5e-4: inside the high clip (4e-4)
    logps_BT[1] += 4.5e-4  # outside it
    logps_BT[2] -= 3.5e-4  # outside the low clip (3e-4)
    adv_B = torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0, 1.0])
    _, grad, stats = _ours("gspo", logps_BT, old_BT, adv_B, mask_BT, (3e-4, 4e-4, 0.0))
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0 and grad[2].abs().sum() == 0
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 6)


def test_grpo_matches_trl_token_level():
    args = _fixed(seed=3, spread=0.2)
    cfg = (0.2, 0.28, 0.0)
    loss, grad, _ = _ours("grpo", *args, cfg)
    ref_loss, ref_grad, _ = _theirs("token", *args, cfg)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_gspo_with_kl_matches_trl():
    logps_BT, old_BT, adv_B, mask_BT = _fixed(seed=4, spread=1e-3)
    ref_BT = old_BT + 0.1 * torch.randn(old_BT.shape, generator=torch.Generator().manual_seed(5))
    cfg = (3e-4, 4e-4, 0.04)
    loss, grad, stats = _ours("gspo", logps_BT, old_BT, adv_B, mask_BT, cfg, ref_BT)
    ref_loss, ref_grad, metrics = _theirs("sequence", logps_BT, old_BT, adv_B, mask_BT, cfg, ref_BT)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert float(stats["kl"]) > 0


def test_gspo_token_equals_gspo_for_sequence_advantages():
    args = _fixed(seed=6, spread=2e-4)
    cfg = (3e-4, 4e-4, 0.0)
    loss, grad, _ = _ours("gspo", *args, cfg)
    tok_loss, tok_grad, _ = _ours("gspo_token", *args, cfg)
    torch.testing.assert_close(tok_loss, loss)
    torch.testing.assert_close(tok_grad, grad)


def test_gspo_token_uses_per_token_advantages():
    logps_BT, old_BT, adv_B, mask_BT = _fixed(seed=7, spread=0.0)
    adv_BT = adv_B[:, None].repeat(1, logps_BT.shape[1])
    adv_BT[:, 0] = 0.0  # the first token carries no advantage: its gradient must vanish
    leaf = logps_BT.clone().requires_grad_(True)
    loss_B, _ = POLICY_LOSSES["gspo_token"](leaf, old_BT, adv_BT, mask_BT, PolicyLossConfig("gspo_token"))
    loss_B.mean().backward()
    assert torch.all(leaf.grad[:, 0] == 0)
    assert torch.all(leaf.grad[:, 1:][mask_BT[:, 1:].bool()] != 0)
