"""Flags and arguments more than one command takes, each written once.

* ``add_overrides``: trailing ``key=value`` config overrides (dotted keys), the one override syntax of every
  command that reads a config (``keye train``, ``keye eval``, ``keye world``, ``keye items``).
* ``add_video_flags``: one flag per ``keye.video.VideoOptions`` field, generated from the fields, plus the
  decoder backend.
* ``add_model_flags``: the checkpoint, thinking mode, device and dtype of the commands that run a model.

Nothing here imports torch: ``keye --help`` builds every parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from keye.video.options import VideoOptions

MODES = ("auto", "think", "no_think")  # keye.api.MODES, without importing the pipeline


def add_overrides(parser: argparse.ArgumentParser, example: str = "run.steps=10") -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"config overrides, dotted keys (e.g. {example}); may follow the options")


def add_video_flags(parser: argparse.ArgumentParser, backend: bool = True) -> None:
    """``--fps``, ``--max-frames``, ..., ``--[no-]slow-fast`` from ``VideoOptions``, and (``backend``) ``--backend``."""
    group = parser.add_argument_group("video options (keye.video.VideoOptions: the message keys of a video part)")
    for f in dataclasses.fields(VideoOptions):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{f.metadata['help']} (default on)")
        else:
            kind = int if f.metadata.get("integer") else float
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f.metadata["help"])
    if backend:
        group.add_argument("--backend", default="auto", metavar="NAME",
                           help="video decoder: auto (decord, else PyAV), decord or pyav")


def trained_video_options(model: str) -> VideoOptions | None:
    """The ``video`` section of the stage config beside a model folder (``runs/nano/sft/model`` ->
    ``runs/nano/sft/config.yaml``): the sampling the model was trained with; None when there is none."""
    from keye.config import from_dict, read_config_data

    config = Path(model).parent / "config.yaml"
    if not config.is_file():
        return None
    video = read_config_data(str(config)).get("video")
    return from_dict(VideoOptions, video, source=str(config), prefix="video.").validated(str(config)) if video else None


def video_options_from(args: argparse.Namespace, base: VideoOptions | None = None) -> VideoOptions:
    """``base`` (default: the defaults) with the video flags that were given set on it, validated."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(VideoOptions)
             if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base or VideoOptions(), **given).validated("video flags")


def add_model_flags(parser: argparse.ArgumentParser, mode_default: str | None = "auto",
                    generates: bool = True) -> None:
    """The flags of every command that runs a model (ask, eval, probe); ``generates``: with the thinking mode
    and answer length of the commands that generate."""
    parser.add_argument("--model", required=True,
                        help="checkpoint folder (toolkit or published Keye-VL), shipped start (keye-nano-base) "
                             "or variant name")
    if generates:
        parser.add_argument("--mode", default=mode_default, choices=list(MODES),
                            help=f"thinking mode (default {mode_default or 'from the definition'})")
        parser.add_argument("--max-new-tokens", type=int, default=None, dest="max_new_tokens",
                            help="longest generated answer, in tokens")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: best for the device)")
