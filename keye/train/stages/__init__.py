"""Every training stage, one module each. A module registers its stages (``keye.train.base.register_stage``)
with their own config classes when it is imported; the line below imports them all.

Adding a stage: write ``keye/train/stages/<name>.py`` holding its config class (a ``StageConfig`` subclass
with the keys it reads) and its ``run(cfg, run_root) -> folder`` decorated with ``@register_stage``, and add
the module to the import line below.
"""

from keye.errors import ConfigError
from keye.train.base import STAGES, Stage
from keye.train.stages import lm, rl, text, vit, vq  # noqa: F401  (each registers its stages)


def get_stage(name: str, source: str = "stage") -> Stage:
    """The stage registered as ``name``; ``source`` names the file asking, for the error."""
    if name not in STAGES:
        raise ConfigError(f"{source}: stage {name!r} is not one of {', '.join(sorted(STAGES))}")
    return STAGES[name]


__all__ = ["STAGES", "Stage", "get_stage"]
