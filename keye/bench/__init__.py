"""Benchmarks: ``python -m keye.bench NAME [options]``, each printing the toolkit's figures beside its peers'
in one run.

* ``video``: the video front-end against keye-vl-utils, qwen-vl-utils and decord alone (time, peak memory).
* ``items``: residual k-means semantic IDs against faiss and scikit-learn (collisions, perplexity, MSE, time,
  peak memory).
* ``model``: keye-nano's training step and greedy decoding speed on CPU.
* ``train``: the toolkit's training loop beside a bare transformers loop (tokens/s, peak memory), memory against
  packed row length beside the memory plan, and on a GPU the 8B / 30B-A3B shapes with MFU.
* ``cli``: start-up time and memory of the ``keye`` command beside bare Python and ``import torch``.

A benchmark is a module here with ``add_arguments(parser)`` and ``run(args)``, named in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = ("video", "items", "model", "cli", "train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keye.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = parser.add_subparsers(dest="name", metavar="NAME", required=True)
    for name in BENCHMARKS:
        module = importlib.import_module(f"keye.bench.{name}")
        sub = names.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
