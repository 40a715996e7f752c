"""``keye eval DEFINITION_OR_FORMAT [key=value ...] --model M --out DIR``: run a benchmark, resumably."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from keye.cli.options import add_model_flags, add_overrides, add_video_flags, trained_video_options, video_options_from
from keye.errors import KeyeInputError

EXAMPLES = """examples:
  keye eval videomme --model ckpt/ --out runs/eval/videomme --data Video-MME/videomme/test-00000-of-00001.parquet \\
      --video-dir Video-MME/data
  keye eval eval/mvbench.yaml --model ckpt/ --out runs/eval/mvbench --video-dir MVBench/video
  keye eval world --model runs/nano/sft/model --out runs/eval/world --data runs/nano/world/test.jsonl --limit 50
  keye eval videomme video.max_frames=32 mode=think --model ckpt/ --out runs/eval/videomme
  keye eval lookup --model runs/nano/sft/model --out runs/eval/lookup   # decoder sanity check, first-listed baseline

A definition is a yaml file or the name of one in eval/; a bare format name (videomme, mvbench, world)
needs --data (lookup generates its items). KEY=VALUE overrides set fields of the definition (a bare format's too). Rerunning with the
same --out skips the questions already answered.
"""


def definition_from(args: argparse.Namespace):
    """A definition file (path or name in eval/) if there is one, else a bare format (needs --data); the
    overrides and flags applied. Video sampling: the flags, then what the definition (or an override) sets,
    then the sampling the model was trained with (``trained_video_options``), then the defaults."""
    from keye.config import from_dict, read_config_data
    from keye.eval.formats import (DEFINITIONS_DIR, FORMATS, EvalDefinition, check_definition, definition_path,
                                   load_definition)

    target = args.definition
    if not Path(target).is_file() and not (DEFINITIONS_DIR / f"{target}.yaml").is_file() and target in FORMATS:
        fields = {"name": target, "format": target}
        if args.data:
            fields["annotations"] = str(Path(args.data).resolve())
        given = read_config_data(None, args.overrides)
        definition = from_dict(EvalDefinition, {**fields, **given}, source=f"format {target}")
    else:
        definition = load_definition(target, args.overrides)
        given = read_config_data(str(definition_path(target)), args.overrides)
        if args.data:
            definition.annotations = str(Path(args.data).resolve())
    trained = trained_video_options(args.model)
    if trained is not None:
        definition.video = dataclasses.replace(
            trained, **{k: getattr(definition.video, k) for k in given.get("video") or {}})
    if args.video_dir:
        definition.video_dir = str(Path(args.video_dir).resolve())
    if args.mode:
        definition.mode = args.mode
    if args.max_new_tokens:
        definition.max_new_tokens = args.max_new_tokens
    definition.video = video_options_from(args, definition.video)
    return check_definition(definition)


def run(args: argparse.Namespace) -> int:
    from keye.api import load
    from keye.eval.formats import read_items
    from keye.eval.runner import pipeline_predictor, run_eval

    if args.limit is not None and args.limit < 1:
        raise KeyeInputError(f"--limit must be at least 1, got {args.limit}")
    definition = definition_from(args)
    read_items(definition)  # bad annotations fail before loading a model that may take minutes
    pipe = load(args.model, device=args.device, dtype=args.dtype, slow_fast=definition.video.slow_fast,
                backend=args.backend)
    predict = pipeline_predictor(pipe, definition.mode, definition.max_new_tokens)
    results = run_eval(definition, predict, args.out, model_name=args.model, limit=args.limit,
                       batch_size=args.batch_size)
    overall = results["overall"]
    guess = f"; the items' own guess scores {100 * overall['guess_accuracy']:.1f}%" if "guess_accuracy" in overall else ""
    print(f"{definition.name}: accuracy {100 * overall['accuracy']:.1f}% on {overall['n']} questions "
          f"({overall['unanswered']} unanswered, {overall['errors']} failed on bad input){guess}; "
          f"results in {Path(args.out) / 'results.md'}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="run a benchmark (Video-MME, MVBench, the synthetic world)",
        description="Evaluate a checkpoint on a benchmark definition; writes predictions.jsonl, results.json "
                    "and results.md into --out.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("definition", metavar="DEFINITION_OR_FORMAT",
                        help="yaml file, name of one in eval/, or a format (videomme, mvbench, world)")
    add_overrides(parser, example="video.max_frames=32")
    add_model_flags(parser, mode_default=None)
    parser.add_argument("--out", required=True, help="output folder (rerunning resumes it)")
    parser.add_argument("--data", help="annotation file (or MVBench json folder), overriding the definition's")
    parser.add_argument("--video-dir", dest="video_dir", help="folder of the videos, overriding the definition's")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--batch-size", type=int, default=1, dest="batch_size", help="questions generated together")
    parser.add_argument("--json", action="store_true", help="also print the results JSON")
    add_video_flags(parser)
    parser.set_defaults(func=run)
