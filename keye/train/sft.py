"""Cold-start SFT with Keye-VL-1.5's five modes (report sec. 4.1): thinking, non-thinking, auto-think,
think-with-image and video.

Each row is rendered in one mode drawn from the recipe's ``data.modes`` weights among the modes that fit
it (``keye.data.modes.assign_modes``: stable per row id, so the mixture does not shift when data is added).
The mode decides the assistant text (``<think>``, ``<analysis>``) and the ``/think`` / ``/no_think`` suffix
the chat template adds. Training itself is the shared next-token loop of ``keye.train.pretrain``.

Run with ``python -m keye.train.sft STAGE.yaml [--run-root DIR] [key=value ...]``.
"""

from __future__ import annotations

import collections
import logging
import sys
from pathlib import Path

from keye.data.modes import assign_modes
from keye.train.common import StageConfig, read_rows, save_model, stage_main
from keye.train.pretrain import train_lm

log = logging.getLogger(__name__)


def run_sft(cfg: StageConfig, run_root: Path) -> Path:
    rows, _ = read_rows(cfg.data.train, run_root)
    if cfg.data.modes:
        rows = assign_modes(rows, cfg.data.modes, seed=cfg.data.seed)
    log.info("%s: %d rows by mode %s", cfg.out, len(rows), dict(collections.Counter(r.get("mode") for r in rows)))
    model, processor = train_lm(cfg, run_root, rows=rows)
    return save_model(model, processor, run_root / cfg.out)


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, prog="python -m keye.train.sft", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
