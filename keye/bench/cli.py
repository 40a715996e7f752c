"""``python -m keye.bench cli``: how long the ``keye`` command takes to start, beside bare Python and
``import torch``.

Each row runs a fresh process ``--runs`` times and reports the median wall time and the peak resident
memory of the process (its own, from ``wait4``). ``keye --help`` and an argument error must not pay for
torch (every parser is built from light modules); ``keye video-info`` pays for torch but not transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _measure(argv: list[str], runs: int) -> tuple[float, float, int]:
    """(median seconds, peak MiB, exit status of the last run) of ``argv`` as a fresh process."""
    seconds, peaks, status = [], [], 0
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, wait_status, usage = os.wait4(proc.pid, 0)
        seconds.append(time.perf_counter() - start)
        peaks.append(usage.ru_maxrss / 1024)  # KiB on Linux
        status = os.waitstatus_to_exitcode(wait_status)
    return statistics.median(seconds), max(peaks), status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per row (median reported)")


def run(args: argparse.Namespace) -> int:
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        subprocess.run([py, "-c", "from keye.video.synthetic import write_cut_clip; "
                                  f"write_cut_clip({str(clip)!r}, num_frames=8, height=56, width=56, cuts=(4,))"],
                       check=True)
        rows = [
            ("python -c pass", [py, "-c", "pass"]),
            ("python -c 'import torch'", [py, "-c", "import torch"]),
            ("keye --help", [py, "-m", "keye", "--help"]),
            ("keye train (argument error)", [py, "-m", "keye", "train"]),
            ("keye train --help", [py, "-m", "keye", "train", "--help"]),
            ("keye video-info CLIP", [py, "-m", "keye", "video-info", str(clip)]),
        ]
        print(f"command start-up: median of {args.runs} fresh processes; peak = the process's resident memory")
        print(f"{'command':<30} {'seconds':>8} {'peak MiB':>9} {'exit':>5}")
        for label, argv in rows:
            seconds, peak, status = _measure(argv, args.runs)
            print(f"{label:<30} {seconds:>8.3f} {peak:>9.1f} {status:>5}")
    return 0
