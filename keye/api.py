"""Answers about videos in three lines::

    import keye
    pipe = keye.load("runs/nano/final")            # a toolkit checkpoint, a published folder, or a variant name
    print(pipe.ask("clip.mp4", "What happens after the cut?", mode="think", fps=1.0).text)

``keye.load`` finds out what it was given (registered loaders, tried in order), puts the model on the
best device in the best dtype it supports, and returns a ``KeyePipeline``. ``pipe.ask`` builds the
qwen-vl-utils message (video options such as ``fps``, ``max_frames``, ``video_start`` / ``video_end``
go on the media part), runs greedy generation and splits the thinking from the answer
(``keye.eval.answers.Answer``). The ``keye ask`` command at the bottom is a thin shell over it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from keye.errors import ConfigError, KeyeInputError
from keye.eval.answers import Answer, split_reasoning

log = logging.getLogger("keye.api")

# mode name -> the processor's think_mode (the /think, /no_think suffix; None lets the model choose)
MODES: dict[str, str | None] = {"auto": None, "think": "think", "no_think": "no_think"}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
# message keys that mean something for an image; the others are video sampling options
IMAGE_KEYS = frozenset({"min_pixels", "max_pixels", "resized_height", "resized_width"})

Media = Any  # a path / URL / bytes / frame list / PIL image / (3, H, W) tensor, or a ready message part


# ----------------------------------------------------------------------------- messages


def media_part(media: Media, **options) -> dict:
    """One qwen-vl-utils content part for ``media``; ``options`` go on it (image parts keep only
    the keys that apply to images). A dict is taken as a ready part and ``options`` fill it in."""
    if isinstance(media, dict):
        kind = media.get("type") or ("image" if "image" in media or "image_url" in media else "video")
    elif isinstance(media, (str, os.PathLike)):
        kind = "image" if Path(str(media).split("?")[0]).suffix.lower() in IMAGE_SUFFIXES else "video"
    elif isinstance(media, (list, tuple, bytes)):
        kind = "video"  # a list of frames, or an encoded file's bytes
    else:  # PIL image, (H, W, 3) array or (3, H, W) tensor
        kind = "image"
    if kind == "image":
        options = {k: v for k, v in options.items() if k in IMAGE_KEYS}
    if isinstance(media, dict):
        return {"type": kind, **options, **media}
    media = str(media) if isinstance(media, os.PathLike) else media
    return {"type": kind, kind: media, **options}


def build_messages(media: Media | Sequence[Media] | None, question: str, **options) -> list[dict]:
    """A one-turn conversation: every item of ``media`` (one, a list, or None) in order, then the question.

    A list of paths, dicts or frame lists is several media; a list of frame tensors / arrays / PIL
    images is one video. A video given as a list of frame *paths* must be wrapped: ``{"video": paths}``.
    """
    if not isinstance(question, str) or not question.strip():
        raise KeyeInputError(f"question must be a non-empty string, got {question!r}")
    if media is None:
        items = []
    elif isinstance(media, (list, tuple)) and all(isinstance(m, (str, os.PathLike, dict, list, tuple)) for m in media):
        items = list(media)
    else:
        items = [media]
    content = [media_part(m, **options) for m in items] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def _think_mode(mode: str) -> str | None:
    if mode not in MODES:
        raise KeyeInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return MODES[mode]


# ----------------------------------------------------------------------------- pipeline


class KeyePipeline:
    """A model and its processor, ready to answer. Build it with ``keye.load``.

    Generation is greedy unless ``do_sample=True`` (or other ``generate`` arguments) is passed.
    """

    def __init__(self, model, processor, *, slow_fast: bool = True, backend: str = "auto", max_new_tokens: int = 512):
        self.model = model.eval()
        self.processor = processor
        self.slow_fast, self.backend = slow_fast, backend
        self.max_new_tokens = max_new_tokens
        tok = processor.tokenizer
        self.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        _check_token_ids(model.config, tok)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- prompts and inputs

    def prompt(self, messages: list[dict], mode: str = "auto") -> str:
        """The chat-template text for ``messages`` (one pad placeholder per image / video)."""
        return self.processor.apply_chat_template(messages, think_mode=_think_mode(mode))

    def inputs(self, conversations: list[list[dict]], mode: str = "auto"):
        """Model inputs for a batch of conversations, left-padded for generation, on the model's device."""
        from keye.video import process_vision_info

        texts = [self.prompt(c, mode) for c in conversations]
        has_media = any(isinstance(p, dict) and p.get("type") in ("image", "video")
                        for c in conversations for m in c if isinstance(m.get("content"), list) for p in m["content"])
        vision = process_vision_info(conversations, slow_fast=self.slow_fast, backend=self.backend) if has_media else None
        batch = self.processor(text=texts, vision=vision, padding_side="left")
        return batch.to(self.device)

    # -- generation

    def _generate_kwargs(self, max_new_tokens: int | None, generate_kwargs: dict) -> dict:
        kwargs = {"max_new_tokens": max_new_tokens or self.max_new_tokens, "do_sample": False,
                  "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        kwargs.update(generate_kwargs)
        return kwargs

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], mode: str = "auto", max_new_tokens: int | None = None,
                 **generate_kwargs) -> list[str]:
        """Raw decoded generations (special tokens dropped, reasoning tags kept), one per conversation."""
        batch = self.inputs(conversations, mode)
        out_BL = self.model.generate(**batch, **self._generate_kwargs(max_new_tokens, generate_kwargs))
        new_BN = out_BL[:, batch["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_BN, skip_special_tokens=True)

    def chat(self, messages: list[dict], mode: str = "auto", max_new_tokens: int | None = None, **generate_kwargs) -> Answer:
        """Answer a full qwen-vl-utils conversation (several turns, per-part options, system prompt)."""
        return split_reasoning(self.generate([messages], mode, max_new_tokens, **generate_kwargs)[0], mode)

    def ask(self, media: Media | Sequence[Media] | None, question: str | Sequence[str], mode: str = "auto", *,
            max_new_tokens: int | None = None, stream: bool = False, generate_kwargs: dict | None = None,
            **video_options) -> Answer | list[Answer] | Iterator[str]:
        """Ask about one or several videos / images.

        media: a path, URL, bytes, frame list, PIL image or (3, H, W) uint8 tensor, or a list of them
            (all shown in one question, in order), or None for a text-only question.
        question: a string -> one ``Answer``; a list of strings -> one ``Answer`` each (same media,
            generated as one batch).
        mode: "auto" (the model decides whether to think), "think" or "no_think".
        stream: yield the answer's text pieces as they are generated instead (one question only).
        video_options: message keys such as fps, nframes, max_frames, max_pixels, total_pixels,
            video_start / video_end (seconds), min_frame_similarity; applied to every video.
        """
        if isinstance(question, str):
            if stream:
                return self.stream(media, question, mode, max_new_tokens=max_new_tokens,
                                   generate_kwargs=generate_kwargs, **video_options)
            return self.chat(build_messages(media, question, **video_options), mode, max_new_tokens,
                             **(generate_kwargs or {}))
        if stream:
            raise KeyeInputError("stream=True takes one question, not a list")
        return self.ask_batch([(media, q) for q in question], mode, max_new_tokens=max_new_tokens,
                              generate_kwargs=generate_kwargs, **video_options)

    def ask_batch(self, pairs: Sequence[tuple[Media, str]], mode: str = "auto", *, max_new_tokens: int | None = None,
                  generate_kwargs: dict | None = None, **video_options) -> list[Answer]:
        """One batched generation over (media, question) pairs, each with its own media."""
        conversations = [build_messages(m, q, **video_options) for m, q in pairs]
        raws = self.generate(conversations, mode, max_new_tokens, **(generate_kwargs or {}))
        return [split_reasoning(raw, mode) for raw in raws]

    def stream(self, media: Media | Sequence[Media] | None, question: str, mode: str = "auto", *,
               max_new_tokens: int | None = None, generate_kwargs: dict | None = None, **video_options) -> Iterator[str]:
        """Yield decoded text pieces as they are generated; their concatenation is ``ask(...).raw``.

        Generation runs in a worker thread feeding a ``TextIteratorStreamer`` (the transformers
        recipe); an exception there is re-raised here once the stream ends.
        """
        from transformers import TextIteratorStreamer

        batch = self.inputs([build_messages(media, question, **video_options)], mode)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(max_new_tokens, generate_kwargs or {})
        failure: list[BaseException] = []

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**batch, streamer=streamer, **kwargs)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer below
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failure:
            raise failure[0]


def _check_token_ids(config, tokenizer) -> None:
    """The model's vision token ids must be the tokenizer's, or every pad lands on the wrong id."""
    for attr, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>")):
        have = tokenizer.convert_tokens_to_ids(token)
        if getattr(config, attr, have) != have:
            raise KeyeInputError(f"model {attr}={getattr(config, attr)} but the tokenizer maps {token} to {have}; "
                                 "model and tokenizer do not belong together")


# ----------------------------------------------------------------------------- loading


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def best_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (the published checkpoints are bf16), else fp16 on GPUs, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class Loader:
    """Recognises one kind of source (``detect``) and builds (model, processor) from it (``load``)."""

    name: str
    detect: Callable[[str], bool]
    load: Callable[[str, torch.dtype], tuple[Any, Any]]


LOADERS: list[Loader] = []


def register_loader(name: str, detect: Callable[[str], bool]):
    def wrap(fn):
        LOADERS.append(Loader(name, detect, fn))
        return fn

    return wrap


def _read_config(source: str) -> dict | None:
    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KeyeInputError(f"{path}: not valid JSON ({err})") from None


def _is_variant(source: str) -> bool:
    from keye.models import VARIANTS

    return source in VARIANTS and not Path(source).exists()


def _is_toolkit_checkpoint(source: str) -> bool:
    config = _read_config(source)
    return config is not None and config.get("model_type") == "keye"


def _is_published(source: str) -> bool:
    """A Keye-VL release folder: its config names a Keye architecture (the releases ship their own
    remote code, which we never run), or is the flat layout ``save_published`` writes."""
    config = _read_config(source)
    if config is None or config.get("model_type") == "keye":
        return False
    names = [config.get("model_type") or "", *(config.get("architectures") or [])]
    return any("keye" in str(n).lower() for n in names) or ("vision_config" in config and "model_type" not in config)


# Only keye-nano ships a tokenizer in the package; the large variants' tokenizers come with their weights.
_VARIANT_PROCESSORS = {"keye-nano": "load_nano_processor"}


@register_loader("variant", _is_variant)
def _load_variant(source: str, dtype: torch.dtype):
    import keye.processing
    from keye.models import build_model

    if source not in _VARIANT_PROCESSORS:
        raise KeyeInputError(f"variant {source!r} has no bundled tokenizer; pass a checkpoint folder instead "
                             f"(variants with one: {', '.join(_VARIANT_PROCESSORS)})")
    log.warning("keye.load(%r): a registered variant with RANDOM weights (untrained); its answers are noise", source)
    processor = getattr(keye.processing, _VARIANT_PROCESSORS[source])()
    return build_model(source).to(dtype), processor


@register_loader("toolkit checkpoint", _is_toolkit_checkpoint)
def _load_toolkit(source: str, dtype: torch.dtype):
    import keye.models  # noqa: F401 - registers the Auto classes
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
    return model, AutoProcessor.from_pretrained(source)


@register_loader("published Keye-VL checkpoint", _is_published)
def _load_published(source: str, dtype: torch.dtype):
    from transformers import AutoTokenizer

    from keye.models.adapter import load_published_model
    from keye.processing import SPECIAL_TOKENS, KeyeProcessor

    if not any((Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise KeyeInputError(f"{source}: a published checkpoint needs its tokenizer files beside the weights")
    tokenizer = AutoTokenizer.from_pretrained(source)
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise KeyeInputError(f"{source}: the tokenizer lacks Keye's special tokens {missing}")
    model, _ = load_published_model(source)
    return model.to(dtype), KeyeProcessor(tokenizer)


def load(name_or_path: str | os.PathLike, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, **pipeline_kwargs) -> KeyePipeline:
    """A ready ``KeyePipeline`` from a toolkit checkpoint folder (``save_pretrained`` of model and
    processor), a published-layout Keye-VL folder (via ``keye.models.adapter``), or a registered
    variant name (random weights: for tests and smoke runs).

    device: default the best available (cuda, mps, cpu); dtype: default bf16 / fp16 / fp32 by device
    ("bfloat16"-style strings are accepted).
    """
    source = os.fspath(name_or_path)
    device = torch.device(device) if device is not None else best_device()
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype {dtype!r} is not a torch dtype (e.g. bfloat16, float16, float32)")
        dtype = getattr(torch, dtype)
    dtype = dtype or best_dtype(device)
    for loader in LOADERS:
        if loader.detect(source):
            log.info("keye.load: %s as a %s on %s in %s", source, loader.name, device, dtype)
            model, processor = loader.load(source, dtype)
            return KeyePipeline(model.to(device), processor, **pipeline_kwargs)
    if not Path(source).exists():
        from keye.models import VARIANTS

        raise KeyeInputError(f"{source}: no such checkpoint folder or variant (variants: {', '.join(sorted(VARIANTS))})")
    raise KeyeInputError(f"{source}: not a Keye checkpoint (expected config.json with model_type 'keye' or a "
                         "published Keye-VL config)")


# ----------------------------------------------------------------------------- keye ask

_VIDEO_OPTION_KEYS = ("fps", "nframes", "max_frames", "min_pixels", "max_pixels", "total_pixels", "video_start",
                      "video_end", "min_frame_similarity")

ASK_EXAMPLES = """examples:
  keye ask clip.mp4 "What happens after the cut?" --model runs/nano/final
  keye ask clip.mp4 "Count the objects." --model ckpt/ --mode think --fps 1 --video-start 2 --video-end 8
  keye ask a.mp4 b.mp4 "Which clip is brighter?" --model ckpt/ --stream
  keye ask photo.jpg "Describe the image." --model ckpt/ --json
"""


def add_model_options(parser: argparse.ArgumentParser, mode_default: str | None = "auto") -> None:
    """Flags shared by every command that runs a model (ask, eval)."""
    parser.add_argument("--model", required=True, help="checkpoint folder (toolkit or published Keye-VL) or variant name")
    parser.add_argument("--mode", default=mode_default, choices=list(MODES),
                        help=f"thinking mode (default {mode_default or 'from the definition'})")
    parser.add_argument("--max-new-tokens", type=int, default=None, dest="max_new_tokens")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: best for the device)")


def add_video_flags(parser: argparse.ArgumentParser) -> None:
    """The video sampling flags of ``keye video-info``, with --video-start/--video-end as the message keys' names."""
    from keye.video.cli import add_video_options

    add_video_options(parser)
    parser.add_argument("--video-start", type=float, dest="video_start", help="same as --start (seconds)")
    parser.add_argument("--video-end", type=float, dest="video_end", help="same as --end (seconds)")


def video_options_from(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in _VIDEO_OPTION_KEYS if getattr(args, k, None) is not None}


def _ask(args: argparse.Namespace) -> int:
    media, question = args.media, args.question
    missing = [m for m in media if "://" not in m and not Path(m).exists()]
    if missing:
        raise KeyeInputError(f"{missing[0]}: no such file")
    pipe = load(args.model, device=args.device, dtype=args.dtype, slow_fast=args.slow_fast, backend=args.backend)
    options = video_options_from(args)
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
        epilog=ASK_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("media", nargs="+", metavar="MEDIA", help="one or more video / image paths or URLs")
    parser.add_argument("question", help="the question (quote it)")
    add_model_options(parser)
    add_video_flags(parser)
    parser.add_argument("--stream", action="store_true", help="print the generation as it comes")
    parser.add_argument("--json", action="store_true", help="print answer, thinking and raw text as JSON")
    parser.add_argument("--show-thinking", action="store_true", dest="show_thinking",
                        help="print the thinking to stderr before the answer")
    parser.set_defaults(func=_ask)
