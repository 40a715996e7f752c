"""``keye nano-vocab [--check]``: keye-nano's tokenizer holds the world's words whole (``keye.data.world.vocab``)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from keye.data.world.vocab import nano_tokenizer_is_current, rebuild_nano_tokenizer

    if args.check:
        if not nano_tokenizer_is_current():
            print("keye-nano tokenizer: differs from a rebuild; run keye nano-vocab")
            return 1
        print("keye-nano tokenizer: current")
        return 0
    words = rebuild_nano_tokenizer()
    print(f"keye-nano tokenizer rebuilt with {len(words)} world words whole: "
          f"{' '.join(w.lstrip('Ġ') for w in words[:24])} ...")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("nano-vocab", help="rebuild keye-nano's tokenizer with the world's words whole",
                                   description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report whether the committed tokenizer is current")
    parser.set_defaults(func=run)
