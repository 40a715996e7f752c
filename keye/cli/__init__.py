"""The ``keye`` command (also ``python -m keye``).

Each subcommand is a module of this package with ``register(subparsers)``, which adds its parser with
``set_defaults(func=...)``; the module imports the library inside ``func``, so building the parser (and
``keye --help``) loads no model code. Adding a subcommand is one module and one name in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys

from keye.errors import KeyeInputError, RunInterrupted

COMMANDS = ("ask", "video", "train", "eval", "probe", "world", "items", "demo", "vocab")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keye",
        description="Keye toolkit: video QA, training stages, item embeddings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"keye.cli.{name}").register(subparsers)
    return parser


def quiet_libraries() -> None:
    """Library chatter goes to logging (stderr), never into a command's stdout: Python warnings are
    logged, and DeepSpeed (imported by transformers when installed) is told the accelerator instead of
    printing its detection warning. On Linux without NVIDIA's tools that is the CPU."""
    logging.captureWarnings(True)
    if sys.platform == "linux" and shutil.which("nvidia-smi") is None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    # key=value overrides may follow options (`keye train DIR --skip X run.steps=5`): argparse only
    # collects trailing positionals once, so gather the stragglers for commands that take overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.parse_args(argv)  # exits with argparse's own message
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyeInputError as err:
        print(f"keye {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"keye {args.command}: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\nkeye {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
