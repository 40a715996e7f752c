"""``keye train``: run a recipe folder (every stage in order) or one stage file."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

EXAMPLES = """examples:
  keye train pipelines/nano                       # world + every stage, resumable
  keye train pipelines/nano --skip stage1_align   # ablation: the next stage starts from stage 0's output
  keye train pipelines/nano/sft.yaml --run-root runs/nano run.steps=50 out=sft_short  # from stage3_anneal
  keye train pipelines/8b --dry-run               # meta-device build, parameter counts, GiB per GPU
"""


def run(args: argparse.Namespace) -> int:
    from keye.errors import ConfigError
    from keye.train.distributed import shutdown_process_group
    from keye.train.recipe import dry_run, load_recipe_stage, run_recipe, run_stage

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = Path(args.path)
    if args.dry_run:
        if not path.is_dir():
            raise ConfigError(f"{path}: --dry-run takes a recipe folder (e.g. pipelines/8b)")
        dry_run(path, args.overrides)
        return 0
    if path.is_dir():
        root = run_recipe(path, args.run_root, args.overrides, args.skip)
    else:
        if not path.is_file():
            raise ConfigError(f"{path}: no such recipe folder or stage file")
        root = Path(args.run_root or "runs/nano")
        run_stage(load_recipe_stage(path, args.overrides), root)
    shutdown_process_group()  # a torchrun job's group, once every stage is done
    print(f"done: {root}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="run a training recipe or one stage", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", help="a recipe folder (pipelines/nano) or a stage YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every stage, e.g. run.steps=10")
    parser.add_argument("--run-root", help="output folder (default: the recipe's run_root)")
    parser.add_argument("--skip", action="append", default=[], metavar="STAGE", help="leave a stage out (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="build on the meta device and print sizes and memory")
    parser.set_defaults(func=run)
