from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from keye.config import load_config, save_config
from keye.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    mode: Literal["think", "no_think"] = "think"
    optim: Optim = field(default_factory=Optim)
    freeze: list[str] = field(default_factory=list)
    warmup: int | None = None


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 3e-4\nfreeze: [visual]\n")
    cfg = load_config(Run, path, ["optim.lr=1e-2", "mode=no_think", "warmup=5"])
    assert cfg.steps == 20 and cfg.optim.lr == 1e-2 and cfg.mode == "no_think"
    assert cfg.freeze == ["visual"] and cfg.warmup == 5 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.name == "run"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n")
    assert load_config(Run, path).optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr'"),
        (["steps=ten"], "'steps' must be int"),
        (["steps=true"], "'steps' must be int"),
        (["mode=fast"], "'mode' must be one of"),
        (["optim=3"], "'optim' must be a mapping"),
        (["novalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(Run, None, overrides)
    assert fragment in str(err.value)


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Run, bad)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Run, None, ["steps=3", "freeze=[visual, mlp_AR]"])
    path = save_config(cfg, tmp_path / "run")
    assert yaml.safe_load(path.read_text())["freeze"] == ["visual", "mlp_AR"]
    assert load_config(Run, path) == cfg


def test_extends_merges_over_its_parent(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nsteps: 20\noptim: {lr: 3e-4, betas: [0.8, 0.9]}\n"
                                        "freeze: [visual, lm]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\noptim: {lr: 1e-3}\nfreeze: [visual]\n")
    (tmp_path / "sub" / "top.yaml").write_text("extends: mid.yaml\nsteps: 5\n")
    cfg = load_config(Run, tmp_path / "sub" / "top.yaml", ["optim.lr=2e-3"])
    # mappings merge key by key, lists and scalars are replaced whole, overrides still win
    assert cfg == Run(name="base", steps=5, optim=Optim(lr=2e-3, betas=(0.8, 0.9)), freeze=["visual"])


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nsteps: 3\n")
    with pytest.raises(ConfigError, match=r"leads back to itself \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(Run, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: 'extends: gone.yaml' not found"):
        load_config(Run, tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="'extends' must name a config file"):
        load_config(Run, tmp_path / "d.yaml")
