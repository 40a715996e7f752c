"""``keye world`` / ``python -m keye.data.world``: generate a world and report its size, speed and
blind baselines (uniform random guess and majority answer per kind, on the test split)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keye.data.world.generate import WorldConfig, generate_world, guess_baselines
from keye.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (re-running resumes it)")
    parser.add_argument("--config", help="JSON file of WorldConfig fields (strict); flags below override it")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--train", type=int, help="clips in the train split")
    parser.add_argument("--val", type=int)
    parser.add_argument("--test", type=int)
    parser.add_argument("--size", type=int, help="frame height and width in pixels (even)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0 = in process)")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    data = json.loads(Path(args.config).read_text()) if args.config else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{args.config}: a world config must be a JSON object")
    if args.seed is not None:
        data["seed"] = args.seed
    clips = dict(data.get("clips", WorldConfig().clips))
    clips.update({k: getattr(args, k) for k in ("train", "val", "test") if getattr(args, k) is not None})
    data["clips"] = clips
    if args.size is not None:
        data["scene"] = {**data.get("scene", {}), "height": args.size, "width": args.size}
    config = WorldConfig.from_dict(data)
    info = generate_world(args.out, config, progress=not args.quiet, num_workers=args.workers)
    test = Path(args.out) / "test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines()]
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
    parser = subparsers.add_parser("world", help="generate the synthetic video world (mp4 + jsonl)", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keye.data.world", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
