"""A run's metrics: one JSON object per line in ``metrics.jsonl``, and a loss-curve PNG drawn from it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from keye.fileio import atomic_write_text


class MetricsLog:
    """Append-only jsonl log. On resume, rows past the checkpoint's step are dropped so the curve has no repeats."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in self.rows() if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.write_text("")

    def log(self, step: int, **values: Any) -> None:
        row = {"step": step} | {k: _plain(v) for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: str | os.PathLike, keys: tuple[str, ...] = ("loss",), name: str = "loss.png") -> Path | None:
    """Draw the given metrics against step into ``run_dir/name``; returns the path (None if nothing logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_metrics(Path(run_dir) / "metrics.jsonl")
    series = {k: [(r["step"], r[k]) for r in data if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=key, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / name
    fig.savefig(out)
    plt.close(fig)
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
