"""``keye video-info VIDEO``: the plan the front-end makes for a video, as a table."""

from __future__ import annotations

import argparse
import time

from keye.cli.options import add_video_flags, video_options_from


def format_plan(clip, name: str, *, slow_fast: bool = True, seconds: float | None = None) -> str:
    """The per-frame table (frame #, source index, timestamp, type, size, tokens) of a ``VideoClip``
    and a summary."""
    from keye.video.types import FAST, SLOW

    type_names = {SLOW: "slow", FAST: "fast"}
    lines = []
    source = ""
    if clip.source_size is not None:
        source = f"{clip.source_size[1]}x{clip.source_size[0]}"
    if clip.source_fps:
        source += f" @ {clip.source_fps:.2f} fps"
    if clip.backend:
        source += f", decoded with {clip.backend}"
    lines.append(f"video: {name} ({source.strip(', ')})")
    lines.append("mode: " + ("slow-fast (Keye-VL-1.5, keye-vl-utils 1.5.2 rules)" if slow_fast
                             else "uniform (qwen-vl-utils 0.0.14 rules)"))
    lines.append(f"{'frame':>5}  {'index':>6}  {'time(s)':>8}  {'type':<4}  {'size(hxw)':>9}  {'tokens':>6}")
    for i, (frame, index, ts, kind) in enumerate(zip(clip.frames, clip.indices.tolist(), clip.timestamps.tolist(),
                                                      clip.frame_types.tolist())):
        h, w = frame.shape[-2:]
        lines.append(f"{i:>5}  {index:>6}  {ts:>8.2f}  {type_names[kind]:<4}  {f'{h}x{w}':>9}  {h * w // 784:>6}")
    num_slow = int((clip.frame_types == SLOW).sum())
    num_fast = len(clip) - num_slow
    summary = f"summary: {len(clip)} frames ({num_slow} slow, {num_fast} fast); "
    summary += f"slow {clip.slow_size[0]}x{clip.slow_size[1]} = {clip.slow_size[0] * clip.slow_size[1] // 784} tokens"
    if clip.fast_size is not None:
        fast_h, fast_w = clip.fast_size
        summary += f", fast {fast_h}x{fast_w} = {fast_h * fast_w // 784} tokens"
    summary += f"; total {clip.num_tokens} tokens"
    if clip.budget_tokens:
        summary += f" of a {clip.budget_tokens}-token budget ({100 * clip.num_tokens / clip.budget_tokens:.1f}%)"
    if seconds is not None:
        summary += f"; read in {seconds:.2f} s"
    lines.append(summary)
    return "\n".join(lines)


def video_info(args: argparse.Namespace) -> int:
    from keye.video import read_video

    video = video_options_from(args)
    start = time.perf_counter()
    clip = read_video(args.video, slow_fast=video.slow_fast, backend=args.backend, **video.message())
    print(format_plan(clip, args.video, slow_fast=video.slow_fast, seconds=time.perf_counter() - start))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("video-info", help="print the sampling plan for a video",
                                   description="Print the frames the model would see: sampled frames, slow/fast "
                                               "types, timestamps, sizes and token counts.")
    parser.add_argument("video", help="path to a video file")
    add_video_flags(parser)
    parser.set_defaults(func=video_info)
