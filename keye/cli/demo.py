"""``keye demo``, the README's main command: train keye-nano on the synthetic video world with every stage
of the recipe (or reuse ``runs/nano`` from an earlier run), then answer questions about a held-out video.

Each stage resumes from its last checkpoint and a finished stage is never run again, so interrupting
the demo costs only the steps since the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from keye.cli.options import MODES, add_overrides
from keye.errors import ConfigError

RECIPE = Path(__file__).resolve().parents[2] / "pipelines" / "nano"


def run(args: argparse.Namespace) -> int:
    import logging

    from keye.api import load
    from keye.recipe import load_recipe, run_recipe
    from keye.train.session import stop_after_step

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe_dir = Path(args.recipe)
    if not (recipe_dir / "recipe.yaml").is_file():
        raise ConfigError(f"no recipe at {recipe_dir}: run the demo from a source checkout (make demo)")
    recipe = load_recipe(recipe_dir, args.overrides, smoke=args.smoke)
    root = Path(args.run_root or recipe.config.run_root)
    print(f"keye demo: training keye-nano on the synthetic video world in {root} (reused if already trained)")
    with stop_after_step():  # Ctrl-C: finish the step, checkpoint it, stop with one line
        run_recipe(recipe_dir, str(root), args.overrides, smoke=args.smoke)
    last = recipe.chained()[-1]
    video = last.video

    pipe = load(root / last.out / "model", device="cpu", dtype="float32", slow_fast=video.slow_fast)
    rows = [json.loads(line) for line in (root / "world" / "test.jsonl").read_text().splitlines() if line.strip()]
    clip = rows[args.clip % len(rows)]["clip_id"]
    questions = [r for r in rows if r["clip_id"] == clip]
    path = root / "world" / questions[0]["videos"][0]
    # room for the longest chain the recipe's own think eval allows
    max_new_tokens = max((spec.max_new_tokens for spec in recipe.config.eval), default=320)
    print(f"\nvideo: {path}  (held out: never seen in training)")
    for row in questions:
        for mode in args.modes:
            answer = pipe.ask(str(path), row["question"], mode=mode, max_new_tokens=max_new_tokens,
                              **video.message())
            mark = "ok " if answer.text.strip().lower() == str(row["answer"]).lower() else "-- "
            print(f"\n{mark}[{mode}] Q: {row['question']}\n    reference: {row['answer']}\n    answer:    {answer.text}")
            if answer.thinking:
                print(textwrap.indent(textwrap.fill(f"thinking: {answer.thinking}", 100), "    "))
    summary = root / last.out / "eval.json"
    if summary.is_file():
        print("\nheld-out accuracy (test split):")
        for name, result in json.loads(summary.read_text()).items():
            print(f"  {name}: {result['accuracy']:.1%} over {result['n']} questions")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train keye-nano on the synthetic world and answer questions about a video",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_overrides(parser, example="run.steps=5, a smoke run")
    parser.add_argument("--recipe", default=str(RECIPE), help="recipe folder (default: pipelines/nano)")
    parser.add_argument("--run-root", help="training folder (default: the recipe's, runs/nano)")
    parser.add_argument("--smoke", action="store_true", help="a few-minute end-to-end run of every stage (runs/nano-smoke)")
    parser.add_argument("--clip", type=int, default=0, help="which test question's clip to ask about")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["no_think", "think"], help="answer modes to show")
    parser.set_defaults(func=run)
