"""``keye train``: run a recipe folder (the world, every stage in order, the held-out eval) or one stage file."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from keye.cli.options import add_overrides
from keye.errors import ConfigError

EXAMPLES = """examples:
  keye train pipelines/nano                       # world + every stage + held-out eval, resumable
  keye train pipelines/nano run.steps=5 sft.run.steps=20   # every stage's steps, then the sft stage's alone
  keye train pipelines/nano --skip stage1_align   # ablation: the next stage starts from stage 0's output
  keye train pipelines/nano --smoke               # the whole recipe in a few minutes (runs/nano-smoke)
  keye train pipelines/nano/sft.yaml run.steps=50 out=sft_short   # one stage, from stage3_anneal's model
  keye train pipelines/nano/rl.yaml               # GSPO after SFT
  keye train tokenizers/visual/nano.yaml --run-root runs/vq init_from=../nano/stage0_vit   # a visual tokenizer
  keye train pipelines/nano-base --ship           # train, then ship the run as the keye-nano-base start
  keye train pipelines/nano-base --from-shipped --ship   # only the stages after those keye-nano-base holds
  keye train pipelines/8b --dry-run               # meta-device build, parameter counts, GiB per GPU
  torchrun --nproc_per_node 2 -m keye train pipelines/nano run.dist.strategy=fsdp2
"""


def run(args: argparse.Namespace) -> int:
    from keye.recipe import dry_run, load_recipe_stage, run_recipe, run_stage, stage_run_root
    from keye.train.distributed import shutdown_process_group
    from keye.train.session import stop_after_step

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = Path(args.path)
    if args.dry_run:
        if not path.is_dir():
            raise ConfigError(f"{path}: --dry-run takes a recipe folder (e.g. pipelines/8b)")
        dry_run(path, args.overrides)
        return 0
    if not path.exists():
        raise ConfigError(f"{path}: no such recipe folder or stage file")
    if path.is_file() and (args.skip or args.smoke or args.ship or args.from_shipped):
        raise ConfigError("--skip, --smoke, --ship and --from-shipped take a recipe folder; a stage file is one stage "
                          "(set run.steps=..., init_from=...)")
    if args.ship and (args.skip or args.smoke or args.overrides):
        raise ConfigError("--ship ships the recipe as written: no --skip, --smoke or overrides")
    with stop_after_step():  # Ctrl-C: finish the step, checkpoint it, stop with one line
        if path.is_dir():
            root = run_recipe(path, args.run_root, args.overrides, args.skip, smoke=args.smoke,
                              from_shipped=args.from_shipped)
            if args.ship:
                from keye.shipping import ship_pretrained

                print(f"shipped: {ship_pretrained(path, root)}")
        else:
            root = Path(args.run_root) if args.run_root else stage_run_root(path)
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
    add_overrides(parser)
    parser.add_argument("--run-root", help="output folder (default: the recipe's run_root)")
    parser.add_argument("--skip", action="append", default=[], metavar="STAGE", help="leave a stage out (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="build on the meta device and print sizes and memory")
    parser.add_argument("--smoke", action="store_true",
                        help="the recipe's smoke overrides: every stage end to end in minutes, into <run_root>-smoke")
    parser.add_argument("--ship", action="store_true",
                        help="then copy the finished run into the package as the recipe's pretrained start")
    parser.add_argument("--from-shipped", action="store_true",
                        help="continue the recipe's shipped pretrained start: run only the stages after those it holds")
    parser.set_defaults(func=run)
