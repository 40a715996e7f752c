"""``keye ask MEDIA... QUESTION --model M``: answer a question about videos / images (``keye.api``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keye.cli.options import add_model_flags, add_video_flags, trained_video_options, video_options_from
from keye.errors import KeyeInputError

EXAMPLES = """examples:
  keye ask clip.mp4 "What happens after the cut?" --model runs/nano/sft/model
  keye ask clip.mp4 "Count the objects." --model ckpt/ --mode think --fps 1 --video-start 2 --video-end 8
  keye ask a.mp4 b.mp4 "Which clip is brighter?" --model ckpt/ --stream
  keye ask photo.jpg "Describe the image." --model ckpt/ --json
"""


def run(args: argparse.Namespace) -> int:
    from keye.api import load

    media, question = args.media, args.question
    for m in media:  # before the model loads
        if m.startswith(("http://", "https://")):
            raise KeyeInputError(f"{m}: remote URLs are not fetched (no network at run time); download it first")
        path = Path(m[len("file://"):] if m.startswith("file://") else m)
        if not path.exists():
            raise KeyeInputError(f"{m}: no such file")
        if path.is_dir():
            raise KeyeInputError(f"{m}: is a folder, not a video or image file")
    video = video_options_from(args, trained_video_options(args.model))  # as the model was trained, unless flags say
    pipe = load(args.model, device=args.device, dtype=args.dtype, slow_fast=video.slow_fast, backend=args.backend)
    options = video.message()
    if args.stream:
        for piece in pipe.ask(media, question, args.mode, max_new_tokens=args.max_new_tokens, stream=True, **options):
            print(piece, end="", flush=True)
        print()
        return 0
    answer = pipe.ask(media, question, args.mode, max_new_tokens=args.max_new_tokens, **options)
    if args.json:
        print(json.dumps({"answer": answer.text, "thinking": answer.thinking, "mode": answer.mode, "raw": answer.raw}))
    else:
        if answer.thinking and args.show_thinking:
            print(f"[thinking]\n{answer.thinking}\n[answer]", file=sys.stderr)
        print(answer.text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ask", help="ask a question about videos or images",
        description="Answer a question about one or more videos / images with a Keye checkpoint.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("media", nargs="+", metavar="MEDIA", help="one or more video / image files (paths or file:// URLs)")
    parser.add_argument("question", help="the question (quote it)")
    add_model_flags(parser)
    parser.add_argument("--stream", action="store_true", help="print the generation as it comes")
    parser.add_argument("--json", action="store_true", help="print answer, thinking and raw text as JSON")
    parser.add_argument("--show-thinking", action="store_true", dest="show_thinking",
                        help="print the thinking to stderr before the answer")
    add_video_flags(parser)
    parser.set_defaults(func=run)
