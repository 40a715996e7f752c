"""``keye world --out DIR [key=value ...]``: generate a synthetic world and report its size, speed and
blind baselines (uniform random guess and majority answer per kind, on the test split).

Keys are ``keye.data.world.WorldConfig`` fields, e.g. ``seed=3 clips.train=100 scene.height=64``; ``--config``
reads them from a YAML (or JSON) file first."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from keye.cli.options import add_overrides


def run(args: argparse.Namespace) -> int:
    from keye.config import apply_overrides, read_config_data
    from keye.data.world import WorldConfig, generate_world, guess_baselines

    data = read_config_data(args.config)
    data.setdefault("clips", dict(WorldConfig().clips))  # clips.train=N keeps the other splits' counts
    config = WorldConfig.from_dict(apply_overrides(data, args.overrides))
    info = generate_world(args.out, config, progress=not args.quiet, num_workers=args.workers)
    rows = [json.loads(line) for line in (Path(args.out) / "test.jsonl").read_text().splitlines()]
    summary = {
        "counts": info["counts"],
        "videos_written": info["videos_written"],
        "seconds": round(info["seconds"], 2),
        "clips_per_second": round(info["clips_per_second"], 1),
        "test_baselines": guess_baselines(rows, info["answer_spaces"]) if rows else {},
    }
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("world", help="generate the synthetic video world (mp4 + jsonl)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_overrides(parser, example="clips.train=100")
    parser.add_argument("--out", required=True, help="output folder (re-running resumes it)")
    parser.add_argument("--config", help="YAML or JSON file of WorldConfig fields (strict); KEY=VALUE overrides it")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0 = in process)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
