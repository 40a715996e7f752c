"""The ``keye`` command.

Each subcommand lives beside the code it drives and exposes ``register(subparsers)``; this file
only collects them, so adding a subcommand is one line in ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from keye.errors import KeyeInputError

# module path -> each defines register(subparsers) which adds its parser with set_defaults(func=...)
_SUBCOMMANDS = [
    "keye.video.cli",
    "keye.demo",
    "keye.items.cli",
    "keye.data.world.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keye",
        description="Keye toolkit: video QA, training stages, item embeddings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyeInputError as err:
        print(f"keye {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
