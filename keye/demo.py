"""``keye demo``: the built-in demo. For now: make a clip with known cuts and show its video plan.

Training and answering questions about the clip arrive with the nano recipe.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from keye.video.cli import format_plan
from keye.video.reader import read_video
from keye.video.synthetic import write_cut_clip

DEMO_CUTS = (5, 11, 18)


def demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    clip_path = out / "cuts.mp4"
    if not clip_path.is_file():
        write_cut_clip(clip_path, num_frames=24, height=240, width=320, cuts=DEMO_CUTS, fps=2.0)
        print(f"wrote {clip_path}: 12 s at 2 fps, scene cuts at frames {', '.join(map(str, DEMO_CUTS))}")
    start = time.perf_counter()
    clip = read_video(clip_path)
    print(format_plan(clip, str(clip_path), seconds=time.perf_counter() - start))
    slow = [int(i) for i, kind in zip(clip.indices, clip.frame_types) if kind == 0]
    print(f"slow frames at source frames {slow}; the cuts are at 0 and {list(DEMO_CUTS)}")
    print("next: training on this clip arrives with the nano recipe.")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the built-in demo on a generated clip")
    parser.add_argument("--out", default="runs/demo", help="folder for the generated clip (default runs/demo)")
    parser.set_defaults(func=demo)
