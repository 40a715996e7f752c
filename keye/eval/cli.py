"""``keye eval DEFINITION_OR_FORMAT --model M --out DIR``: run a benchmark, resumably."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from keye.errors import KeyeInputError
from keye.eval.formats import DEFINITIONS_DIR, FORMATS, EvalDefinition, check_definition, load_definition
from keye.eval.runner import pipeline_predictor, run_eval

EXAMPLES = """examples:
  keye eval videomme --model ckpt/ --out runs/eval/videomme --data Video-MME/videomme/test-00000-of-00001.parquet \\
      --video-dir Video-MME/data
  keye eval eval/mvbench.yaml --model ckpt/ --out runs/eval/mvbench --video-dir MVBench/video
  keye eval world --model runs/nano/final --out runs/eval/world --data runs/world/test.jsonl --limit 50
  keye eval videomme --model ckpt/ --out runs/eval/videomme --set video.max_frames=32 --set mode=think

A definition is a yaml file or the name of one in eval/; a bare format name (videomme, mvbench, world)
needs --data. Rerunning with the same --out skips the questions already answered.
"""


def definition_from(args: argparse.Namespace) -> EvalDefinition:
    """A definition file (path or name in eval/) if there is one, else a bare format (needs --data)."""
    target = args.definition
    if not Path(target).is_file() and not (DEFINITIONS_DIR / f"{target}.yaml").is_file() and target in FORMATS:
        if not args.data:
            raise KeyeInputError(f"format {target!r} without a definition file needs --data (the annotation file)")
        definition = EvalDefinition(name=target, format=target, annotations=str(Path(args.data).resolve()))
        for item in args.overrides:
            key, _, value = item.partition("=")
            if key not in ("prompt", "mode", "max_new_tokens"):
                raise KeyeInputError(f"--set {item}: a bare format takes prompt, mode or max_new_tokens; "
                                     "write a definition file for more")
            setattr(definition, key, int(value) if key == "max_new_tokens" else value)
    else:
        definition = load_definition(target, args.overrides)
        if args.data:
            definition.annotations = str(Path(args.data).resolve())
    if args.video_dir:
        definition.video_dir = str(Path(args.video_dir).resolve())
    if args.mode:
        definition.mode = args.mode
    if args.max_new_tokens:
        definition.max_new_tokens = args.max_new_tokens
    return check_definition(definition)


def run(args: argparse.Namespace) -> int:
    from keye.api import load, video_options_from

    if args.limit is not None and args.limit < 1:
        raise KeyeInputError(f"--limit must be at least 1, got {args.limit}")
    definition = definition_from(args)
    annotations = definition.path(definition.annotations)
    if not annotations.exists():  # before loading a model that may take minutes
        raise KeyeInputError(f"{annotations}: annotations not found (give --data, or fix 'annotations' in the definition)")
    pipe = load(args.model, device=args.device, dtype=args.dtype, slow_fast=args.slow_fast, backend=args.backend)
    predict = pipeline_predictor(pipe, definition.mode, definition.max_new_tokens)
    results = run_eval(definition, predict, args.out, model_name=args.model, limit=args.limit,
                       batch_size=args.batch_size, video_options=video_options_from(args))
    overall = results["overall"]
    print(f"{definition.name}: accuracy {100 * overall['accuracy']:.1f}% on {overall['n']} questions "
          f"({overall['unanswered']} unanswered, {overall['errors']} failed on bad input); results in {Path(args.out) / 'results.md'}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def register(subparsers) -> None:
    from keye.api import add_model_options, add_video_flags

    parser = subparsers.add_parser(
        "eval", help="run a benchmark (Video-MME, MVBench, the synthetic world)",
        description="Evaluate a checkpoint on a benchmark definition; writes predictions.jsonl, results.json "
                    "and results.md into --out.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("definition", metavar="DEFINITION_OR_FORMAT",
                        help=f"yaml file, name in eval/, or a format ({', '.join(sorted(FORMATS))})")
    add_model_options(parser, mode_default=None)
    parser.add_argument("--out", required=True, help="output folder (rerunning resumes it)")
    parser.add_argument("--data", help="annotation file (or MVBench json folder), overriding the definition's")
    parser.add_argument("--video-dir", dest="video_dir", help="folder of the videos, overriding the definition's")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--batch-size", type=int, default=1, dest="batch_size")
    parser.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE",
                        help="override a definition field, e.g. video.fps=1 (repeatable)")
    parser.add_argument("--json", action="store_true", help="also print the results JSON")
    add_video_flags(parser)
    parser.set_defaults(func=run)
