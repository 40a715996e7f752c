"""``KeyePipeline``: a model and its processor, ready to answer questions about videos and images.

``pipe.ask`` builds the qwen-vl-utils message (``keye.video.VideoOptions`` keys such as ``fps``,
``max_frames``, ``video_start`` / ``video_end`` go on the media part), runs greedy generation and splits
the thinking from the answer (``keye.data.answers.Answer``). Build one with ``keye.load``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from keye.data.answers import Answer, split_reasoning
from keye.errors import KeyeInputError
from keye.video import VideoOptions
from keye.video.options import IMAGE_FIELDS

# mode name -> the processor's think_mode (the /think, /no_think suffix; None lets the model choose)
MODES: dict[str, str | None] = {"auto": None, "think": "think", "no_think": "no_think"}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

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
        options = {k: v for k, v in options.items() if k in IMAGE_FIELDS}
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
    VideoOptions.from_message(options, "video options")  # a misspelt or out-of-range option fails before decoding
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
