import math

import pytest
import torch
from torch import nn

from keye.errors import ConfigError
from keye.train.optim import OptimConfig, apply_freeze_plan, build_optimizer, build_scheduler, group_of


class Toy(nn.Module):
    """Named like a Keye model: visual / mlp_AR / model / lm_head."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.mlp_AR = nn.Linear(4, 4)
        self.model = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.lm_head(self.model(self.mlp_AR(self.visual(x))))


def test_group_of_strips_wrappers():
    assert group_of("base_model.model.visual.0.weight") == "vision"
    assert group_of("module.mlp_AR.weight") == "projector"
    assert group_of("lm_head.weight") == "lm"
    with pytest.raises(ConfigError, match="belongs to no group"):
        group_of("other.weight")


def test_projector_alignment_trains_only_the_projector():
    torch.manual_seed(0)
    model = Toy()
    counts = apply_freeze_plan(model, ["projector"])
    assert counts == {"projector": 20}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, OptimConfig(lr=0.1))
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"mlp_AR.weight", "mlp_AR.bias"}


def test_group_learning_rates_and_no_decay_on_norms():
    model = Toy()
    apply_freeze_plan(model, ["vision", "lm"])
    opt = build_optimizer(model, OptimConfig(lr=1e-3, group_lr={"vision": 1e-5}, weight_decay=0.1))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["vision"]["lr"] == 1e-5 and by_name["lm"]["lr"] == 1e-3
    assert by_name["vision.no_decay"]["weight_decay"] == 0.0 and by_name["vision"]["weight_decay"] == 0.1
    norm_weight = model.visual[1].weight
    assert any(p is norm_weight for p in by_name["vision.no_decay"]["params"])


def test_bad_plans_are_config_errors():
    with pytest.raises(ConfigError, match="unknown group 'vit'"):
        apply_freeze_plan(Toy(), ["vit"])
    model = Toy()
    apply_freeze_plan(model, [])
    with pytest.raises(ConfigError, match="nothing to train"):
        build_optimizer(model, OptimConfig())


def test_warmup_then_cosine_to_floor():
    model = Toy()
    opt = build_optimizer(model, OptimConfig(lr=1.0))
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1), total_steps=14)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1)
