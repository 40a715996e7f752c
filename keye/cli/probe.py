"""``keye probe NAME --model M``: the teacher-forced measures the nano model cards report, on any checkpoint.

* ``perception``: frame-listing word accuracy (colour, shape, position, "nothing"; background where the
  listings name it) on a world's clips, the video given; the ceiling the video questions sit under. Also
  split by mention: the words of an object's first listed frame ("first"), those the same as in the frame
  before ("same", which the decoder can copy) and those that changed since ("changed": a move to another
  cell).
* ``chains``: the same words inside the reference chains of thought of the reasoning questions.
* ``tokens``: what the visual tokens themselves carry: a linear read of each object's colour and shape from
  the token under it, of each token's own row and column, and of the way each object moved since the frame
  before (which a tower with ``frame_difference`` can see), fitted on the world's train clips. A discrete
  (Kelix) model is read on its codes, one-hot: what its tokenizer keeps.
* ``text-oracle``: exact answers to seed 0's questions, each asked over its clip's listing as text (no
  video); what the decoder can do once perception is perfect.
* ``lookup``: one frame's listing, "What colour is the triangle?"; the first-listed guess beside it.

The video sampling defaults to the one the model was trained with, read from the ``config.yaml`` of the
stage folder that holds the model (``runs/nano/sft/model`` -> ``runs/nano/sft/config.yaml``); the video flags
override it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from keye.cli.options import add_model_flags, add_video_flags, trained_video_options, video_options_from
from keye.errors import KeyeInputError


EXAMPLES = """examples:
  keye probe perception --model runs/nano/sft/model --world runs/nano/world
  keye probe chains --model runs/nano/sft/model --world runs/nano/world --limit 50
  keye probe tokens --model keye-nano-base --world runs/nano/world --train-clips 200
  keye probe text-oracle --model keye-nano-base                  # seed 0's val + test questions (560)
  keye probe text-oracle --model keye-nano-base --clips train=400  # 1600 questions of clips no stage saw
  keye probe lookup --model runs/nano-base/lookup/model --items 400
"""


def parse_clips(specs: list[str]) -> dict[str, int]:
    """["train=400", "val=40"] -> {"train": 400, "val": 40}."""
    clips = {}
    for spec in specs:
        split, _, count = spec.partition("=")
        if split not in ("train", "val", "test") or not count.isdigit() or int(count) < 1:
            raise KeyeInputError(f"--clips {spec!r}: expected SPLIT=N with SPLIT train, val or test and N >= 1")
        clips[split] = int(count)
    return clips


def tokens(args, model, processor) -> tuple[str, dict, dict]:
    from keye.eval.perception import token_readout

    video = video_options_from(args, trained_video_options(args.model))
    result = token_readout(model, processor, args.world, args.split or "val", args.train_clips, video, args.limit)
    static = [v for k, v in result["per_kind"].items() if k != "motion"]
    result["accuracy"] = sum(static) / len(static)
    return (f"tokens, a linear read fitted on {args.train_clips} train clips, scored on {result['objects']} objects, "
            f"{result['tokens']} tokens and {result['moves']} moves (overall: the mean of colour, shape, row and "
            "column)"), result, result["per_kind"]


def frame_words(args, model, processor) -> tuple[str, dict, dict]:
    from keye.eval.perception import chain_word_accuracy, listing_word_accuracy

    video = video_options_from(args, trained_video_options(args.model))
    measure = listing_word_accuracy if args.probe == "perception" else chain_word_accuracy
    split = args.split or ("val" if args.probe == "perception" else "test")
    result = measure(model, processor, args.world, split, video=video, limit=args.limit)
    rows = dict(result["per_type"])
    for kind, labels in result.get("by_mention", {}).items():  # perception: by the frame before (see --help)
        rows.update({f"{kind}, {label}": value for label, value in labels.items()})
    return f"{args.probe}, {split} split of {args.world}, {result['words']} words", result, rows


def text_oracle(args, model, processor) -> tuple[str, dict, dict]:
    from keye.train.stages.text import text_oracle as measure

    clips = parse_clips(args.clips) if args.clips else {"val": 40, "test": 100}
    result = measure(model, processor, clips)
    asked = " ".join(f"{split}={count}" for split, count in clips.items())
    return f"text oracle, {result['n']} questions of seed 0's clips {asked}", result, result["per_kind"]


def lookup(args, model, processor) -> tuple[str, dict, dict]:
    from keye.train.stages.text import lookup_accuracy

    result = lookup_accuracy(model, processor, args.items)
    first = f"the first-listed guess scores {100 * result['first_listed']:.1f}%"
    return f"lookup, {result['n']} items; {first}", result, result["per_kind"]


# each probe: (args, model, processor) -> (title, result, per-row figures)
PROBES = {"perception": frame_words, "chains": frame_words, "tokens": tokens, "text-oracle": text_oracle,
          "lookup": lookup}
ON_VIDEO = ("perception", "chains", "tokens")


def run(args: argparse.Namespace) -> int:
    from keye.api import load

    if args.limit is not None and args.limit < 1:
        raise KeyeInputError(f"--limit must be at least 1, got {args.limit}")
    if args.train_clips < 1:
        raise KeyeInputError(f"--train-clips must be at least 1, got {args.train_clips}")
    if args.clips:
        parse_clips(args.clips)  # a bad --clips fails before loading a model
    if args.probe in ON_VIDEO:
        if not args.world:
            raise KeyeInputError(f"keye probe {args.probe} needs --world (a world folder with its world.json)")
        if not (Path(args.world) / "world.json").is_file():
            raise KeyeInputError(f"--world {args.world}: no world.json there (generate one with `keye world`)")
    pipe = load(args.model, device=args.device, dtype=args.dtype)
    title, result, rows = PROBES[args.probe](args, pipe.model, pipe.processor)
    print(f"{args.model}: {title}")
    # the token read's classes are colours, shapes and grid rows / columns, not a question's answers
    print(table(result["accuracy"], rows, result.get("majority"), "majority class" if args.probe == "tokens" else
                "majority answer"))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def table(overall: float, rows: dict[str, float], majority: dict[str, float] | None = None,
          baseline: str = "majority answer") -> str:
    """Overall and per-row accuracies in percent, with the ``majority`` baseline's (named ``baseline``) where
    known."""
    width = max(map(len, ["overall", *rows]))
    lines = []
    for name, value in [("overall", overall), *rows.items()]:
        line = f"  {name:<{width}}  {100 * value:5.1f}%"
        if majority is not None and name in majority:
            line += f"   ({baseline} {100 * majority[name]:.1f}%)"
        lines.append(line)
    return "\n".join(lines)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe", help="teacher-forced measures of a checkpoint (perception, chains, text oracle, lookup)",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("probe", choices=list(PROBES), help="what to measure")
    add_model_flags(parser, generates=False)
    parser.add_argument("--world", help="world folder (perception, chains, tokens): world.json and the split's videos")
    parser.add_argument("--split", choices=("train", "val", "test"),
                        help="world split (default: val for perception, test for chains)")
    parser.add_argument("--limit", type=int, help="perception, chains, tokens: only the first N clips / chains")
    parser.add_argument("--clips", nargs="+", metavar="SPLIT=N",
                        help="text-oracle: seed 0's clips to ask about (default: val=40 test=100)")
    parser.add_argument("--items", type=int, default=400, help="lookup: number of probe items (default 400)")
    parser.add_argument("--train-clips", type=int, default=200, dest="train_clips",
                        help="tokens: train clips the linear read is fitted on (default 200)")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    add_video_flags(parser, backend=False)  # the probes decode as training did
    parser.set_defaults(func=run)
