"""From a video (file, bytes or a list of frames) to a model-ready ``VideoClip``, and images to ``ImageInput``.

Two sampling modes, registered in ``SAMPLERS``:

* ``slow_fast`` (default): keye-vl-utils 1.5.2. Frames at ``fps`` (default 2, never above the
  native rate), at most ``video_total_pixels / min_pixels`` of them; each typed SLOW/FAST; slow
  and fast sizes from the token budget (``sizing.slow_fast_budget``, which never overshoots).
* ``uniform``: qwen-vl-utils 0.0.14. An even number of frames (``smart_nframes``), all one size.

Frames are decoded in chunks and resized as soon as their final size is known, so the clip is
never held at full resolution as a whole when the budget cannot bind (e.g. every clip of up to
85 sampled frames at the defaults); otherwise only the decoded uint8 frames are kept until the
last frame is typed.

Resizing: bicubic with antialiasing on the uint8 frames (torch's native uint8 kernel). This is the
interpolation Qwen2-VL-style processors use (PIL / torchvision BICUBIC), which is what a
keye-vl-utils + HF processor pipeline or qwen-vl-utils would apply to the full-resolution frames;
values agree with those to within a grey level or two (see tests/video/test_peers.py).
"""

from __future__ import annotations

import base64
import functools
import io
import itertools
import math
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from keye.errors import VideoError
from keye.video import sizing
from keye.video.decode import (DEFAULT_CHUNK, DecodeError, OpenedVideo, VideoSource, available_backends, open_video,
                               read_frames, source_name)
from keye.video.options import VideoOptions
from keye.video.slowfast import MIN_FRAME_SIMILARITY, SlowFastSelector, select_slow_fast
from keye.video.types import SLOW, ImageInput, VideoClip

log = logging.getLogger(__name__)
Frame = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes


# ----------------------------------------------------------------------------- pixels


def resize_frames(frames_NCHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> contiguous uint8 (N, 3, h, w), bicubic + antialias (identity if same size)."""
    if tuple(frames_NCHW.shape[-2:]) != tuple(size):
        frames_NCHW = F.interpolate(frames_NCHW, size=list(size), mode="bicubic", antialias=True)
    # The layout copy goes through numpy (single-threaded): torch's threaded copy of small frames
    # stalls on a busy machine.
    return torch.from_numpy(np.ascontiguousarray(frames_NCHW.numpy()))


def load_image(image: Frame, name: str) -> Image.Image:
    """Any supported image input -> RGB PIL image (transparent pixels on white, as qwen-vl-utils does)."""
    try:
        if isinstance(image, Image.Image):
            pil = image
        elif isinstance(image, torch.Tensor):
            pil = Image.fromarray(_as_hwc(image.cpu().numpy(), chw=True, name=name))
        elif isinstance(image, np.ndarray):
            pil = Image.fromarray(_as_hwc(image, chw=False, name=name))
        elif isinstance(image, bytes):
            pil = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, os.PathLike)):
            text = os.fspath(image)
            if text.startswith("data:image"):
                if "base64," not in text:
                    raise VideoError(f"{name}: data URL without base64 payload")
                pil = Image.open(io.BytesIO(base64.b64decode(text.split("base64,", 1)[1])))
            elif text.startswith(("http://", "https://")):
                raise VideoError(f"{name} {text!r}: remote URLs are not fetched; download the file and pass its path")
            else:
                path = text[len("file://"):] if text.startswith("file://") else text
                if Path(path).is_dir():
                    raise VideoError(f"{name} {text!r}: is a folder, not an image file")
                if not Path(path).is_file():
                    raise VideoError(f"{name} {text!r}: file not found")
                pil = Image.open(path)
        else:
            raise VideoError(f"{name}: unsupported image type {type(image).__name__}")
        if pil.mode == "RGBA":
            white = Image.new("RGB", pil.size, (255, 255, 255))
            white.paste(pil, mask=pil.split()[3])
            return white
        return pil.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        if isinstance(err, VideoError):
            raise
        raise VideoError(f"{name}: cannot read image ({err})") from err


def _as_hwc(array: np.ndarray, chw: bool, name: str) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0 if chw else -1] != 3:
        layout = "(3, H, W)" if chw else "(H, W, 3)"
        raise VideoError(f"{name}: array frames must be uint8 {layout}, got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array.transpose(1, 2, 0) if chw else array)


def _pil_resize(pil: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL's default (bicubic) resize, as the peers' fetch_image, -> (3, h, w) uint8."""
    if pil.size != (size[1], size[0]):
        pil = pil.resize((size[1], size[0]))
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def read_image(image: Frame, *, name: str = "image", **options) -> ImageInput:
    """One image, resized with qwen-vl-utils semantics (smart_resize, factor 28, min/max_pixels)."""
    return _read_image(image, VideoOptions.from_message(options, name), name)


def _read_image(image: Frame, opts: VideoOptions, name: str) -> ImageInput:
    pil = load_image(image, name)
    if opts.resized is not None:
        size = sizing.smart_resize(*opts.resized)
    else:
        size = sizing.smart_resize(pil.height, pil.width, sizing.FACTOR,
                                   _default(opts.min_pixels, sizing.IMAGE_MIN_PIXELS),
                                   _default(opts.max_pixels, sizing.IMAGE_MAX_PIXELS))
    return ImageInput(_pil_resize(pil, size))


def _default(value, default):
    return default if value is None else value


# ----------------------------------------------------------------------------- frame choice


def frame_range(opts: VideoOptions, total_frames: int, fps: float, name: str) -> tuple[int, int]:
    """First and last source frame inside [video_start, video_end] seconds (qwen-vl-utils 0.0.14 rule)."""
    if opts.video_start is None and opts.video_end is None:
        return 0, total_frames - 1
    duration = total_frames / fps
    start = math.ceil(min(opts.video_start or 0.0, duration) * fps)
    end = total_frames - 1
    if opts.video_end is not None:
        if opts.video_end > duration:
            log.warning("%s: video_end=%s is past the end of the %.2f s video; it reads to the end", name,
                        opts.video_end, duration)
        end = min(math.floor(min(opts.video_end, duration) * fps), total_frames - 1)
    if start >= end:
        raise VideoError(f"{name}: video_start={opts.video_start}, video_end={opts.video_end} leave "
                         f"{max(end - start + 1, 0)} frame(s) of a {duration:.2f} s video; zero frames after trimming")
    return start, end


def _linspace_indices(start: int, end: int, count: int) -> list[int]:
    # float32 linspace + round, exactly as both peers, so indices agree to the frame.
    return torch.linspace(start, end, count).round().long().tolist()


def _keye_count(opts: VideoOptions, total: int, fps: float, height: int, width: int, name: str) -> int:
    if opts.nframes is not None:
        if opts.nframes > total:
            raise VideoError(f"{name}: nframes={opts.nframes} is more than the {total} frames available")
        count = opts.nframes
    else:
        count = sizing.keye_nframes(total, fps, fps=opts.fps, max_frames=opts.max_frames,
                                    min_pixels=opts.min_pixels, total_pixels=opts.total_pixels)
    if opts.min_frames is not None:
        count = max(count, min(opts.min_frames, total))
    # The budget fix needs every frame to fit at the smallest size; the reference's frame cap
    # (total_pixels / min_pixels) can let tiny or odd-shaped sources overshoot.
    budget_tokens = _default(opts.total_pixels, sizing.VIDEO_TOTAL_PIXELS) / sizing.PIXELS_PER_TOKEN
    cap = int(budget_tokens // sizing.min_frame_tokens(height, width, opts.min_pixels))
    if cap < 1:
        raise VideoError(f"{name}: video_total_pixels={opts.total_pixels} is too small for a single frame")
    # A clip shorter than one sampling period still gets its first frame (the reference returns none and fails later).
    return max(1, min(count, cap))


def _budget(opts: VideoOptions, height: int, width: int, num_slow: int, num_fast: int) -> sizing.SlowFastBudget:
    if opts.resized is not None:
        slow = sizing.smart_resize(*opts.resized)
        fast = sizing.smart_resize(height, width, sizing.FACTOR, sizing.VIDEO_MIN_PIXELS,
                                   max(int(sizing.tokens(slow) * sizing.FAST_TOKEN_RATIO) * sizing.PIXELS_PER_TOKEN,
                                       sizing.VIDEO_MIN_PIXELS))
        return sizing.SlowFastBudget(slow, fast, num_slow, num_fast)
    return sizing.slow_fast_budget(height, width, num_slow, num_fast, min_pixels=opts.min_pixels,
                                   max_pixels=opts.max_pixels, total_pixels=opts.total_pixels)


# ----------------------------------------------------------------------------- sampling modes


def _timestamps(indices: Sequence[int], fps: float) -> torch.Tensor:
    # (1 / fps) * i in double, then float32: the reference's arithmetic, to the last bit.
    return torch.tensor([(1 / fps) * i for i in indices], dtype=torch.float32)


def _sample_slow_fast(video: OpenedVideo, opts: VideoOptions, chunk: int) -> VideoClip:
    start, end = frame_range(opts, video.num_frames, video.fps, video.name)
    count = _keye_count(opts, end - start + 1, video.fps, video.height, video.width, video.name)
    indices = _linspace_indices(start, end, count)
    selector = SlowFastSelector(_default(opts.min_frame_similarity, MIN_FRAME_SIMILARITY))

    @functools.lru_cache(maxsize=None)
    def sizes_for(num_slow: int) -> tuple[tuple[int, int], tuple[int, int]]:
        plan = _budget(opts, video.height, video.width, num_slow, count - num_slow)
        return plan.slow_size, plan.fast_size

    def settled(lo: int, hi: int) -> bool:
        """Whether every final slow count in [lo, hi] gives the same sizes (cheap test first)."""
        return sizes_for(lo) == sizes_for(hi) and all(sizes_for(n) == sizes_for(lo) for n in range(lo + 1, hi))

    types: list[torch.Tensor] = []
    frames: list[torch.Tensor] = []
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (types_N, full-res frames_NCHW) not yet resized
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None
    num_slow = done = 0
    for part, frames_NHWC in read_frames(video, indices, chunk):
        frames_NCHW = torch.from_numpy(frames_NHWC).permute(0, 3, 1, 2)
        types_N = selector.update(frames_NCHW)
        types.append(types_N)
        num_slow += int((types_N == SLOW).sum())
        done += len(part)
        pending.append((types_N, frames_NCHW))
        if sizes is None and settled(num_slow, num_slow + count - done):
            # Sizes depend on the final slow count, which lies in [num_slow, num_slow + remaining];
            # all of those agree, so the sizes are final and frames can be resized now.
            sizes = sizes_for(num_slow)
        if sizes is not None:
            frames.extend(_resize_typed(pending, *sizes))
            pending = []
    frame_types = torch.cat(types)
    if sizes is None:
        sizes = sizes_for(num_slow)
        frames.extend(_resize_typed(pending, *sizes))
    num_fast = count - num_slow
    return VideoClip(
        frames=frames, frame_types=frame_types, timestamps=_timestamps(indices, video.fps),
        indices=torch.tensor(indices, dtype=torch.int64), slow_size=sizes[0], fast_size=sizes[1] if num_fast else None,
        source_fps=video.fps, backend=video.backend, source_size=(video.height, video.width),
        budget_tokens=int(_default(opts.total_pixels, sizing.VIDEO_TOTAL_PIXELS) // sizing.PIXELS_PER_TOKEN),
    )


def _resize_typed(pending, slow_size, fast_size) -> list[torch.Tensor]:
    """Resize each frame to its type's size; runs of one type go through one batched call on a
    slice (a view: no copy of the full-resolution frames)."""
    out: list[torch.Tensor] = []
    for types_N, frames_NCHW in pending:
        start = 0
        for kind, run in itertools.groupby(types_N.tolist()):
            stop = start + len(list(run))
            out.extend(resize_frames(frames_NCHW[start:stop], slow_size if kind == SLOW else fast_size))
            start = stop
    return out


def _sample_uniform(video: OpenedVideo, opts: VideoOptions, chunk: int) -> VideoClip:
    start, end = frame_range(opts, video.num_frames, video.fps, video.name)
    if opts.nframes is not None and opts.nframes > end - start + 1:
        raise VideoError(f"{video.name}: nframes={opts.nframes} is more than the {end - start + 1} frames available")
    try:
        count = sizing.qwen_nframes(end - start + 1, video.fps, fps=opts.fps, nframes=opts.nframes,
                                    min_frames=opts.min_frames, max_frames=opts.max_frames)
    except VideoError as err:
        raise VideoError(f"{video.name}: {err}") from err
    indices = _linspace_indices(start, end, count)
    size = _uniform_size(opts, video.height, video.width, count)
    frames: list[torch.Tensor] = []
    for _, frames_NHWC in read_frames(video, indices, chunk):
        frames.extend(resize_frames(torch.from_numpy(frames_NHWC).permute(0, 3, 1, 2), size))
    return VideoClip(
        frames=frames, frame_types=torch.full((count,), SLOW, dtype=torch.int32),
        timestamps=_timestamps(indices, video.fps), indices=torch.tensor(indices, dtype=torch.int64),
        slow_size=size, fast_size=None, source_fps=video.fps, backend=video.backend,
        source_size=(video.height, video.width),
    )


def _uniform_size(opts: VideoOptions, height: int, width: int, count: int) -> tuple[int, int]:
    if opts.resized is not None:
        return sizing.smart_resize(*opts.resized)
    min_pixels = _default(opts.min_pixels, sizing.UNIFORM_MIN_PIXELS)
    if opts.max_pixels is not None and opts.max_pixels < min_pixels:
        raise VideoError(f"max_pixels={opts.max_pixels} is below min_pixels={min_pixels} (uniform mode's default "
                         f"is {sizing.UNIFORM_MIN_PIXELS})")
    return sizing.uniform_size(height, width, count, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels,
                               total_pixels=opts.total_pixels)


SAMPLERS: dict[str, Callable[[OpenedVideo, VideoOptions, int], VideoClip]] = {
    "slow_fast": _sample_slow_fast,
    "uniform": _sample_uniform,
}


# ----------------------------------------------------------------------------- frame lists


def _frame_list_slow_fast(items: Sequence[Frame], opts: VideoOptions, name: str) -> VideoClip:
    """keye-vl-utils 1.5.2 frame lists: each frame first resized like a video frame (PIL), ``fps``
    (if given) dates them, then sampling, typing and sizing as for a file."""
    frames_TCHW = _stack_frames(items, opts, name, sizing.VIDEO_MIN_PIXELS, sizing.VIDEO_MAX_PIXELS)
    fps = opts.fps
    total, _, height, width = frames_TCHW.shape
    # keye-vl-utils dates a frame list at ``fps`` and samples it at that same rate (all frames
    # unless capped); without fps it assumes 2 fps for both.
    count = _keye_count(opts, total, _default(fps, sizing.DEFAULT_FPS), height, width, name)
    indices = _linspace_indices(0, total - 1, count)
    frames_TCHW = frames_TCHW[indices]
    types = select_slow_fast(frames_TCHW, _default(opts.min_frame_similarity, MIN_FRAME_SIMILARITY))
    num_slow = int((types == SLOW).sum())
    plan = _budget(opts, height, width, num_slow, count - num_slow)
    return VideoClip(
        frames=_resize_typed([(types, frames_TCHW)], plan.slow_size, plan.fast_size), frame_types=types,
        timestamps=_timestamps(indices, _default(fps, sizing.DEFAULT_FPS)), indices=torch.tensor(indices),
        slow_size=plan.slow_size, fast_size=plan.fast_size if count > num_slow else None, source_fps=fps,
        source_size=(height, width),
        budget_tokens=int(_default(opts.total_pixels, sizing.VIDEO_TOTAL_PIXELS) // sizing.PIXELS_PER_TOKEN),
    )


def _frame_list_uniform(items: Sequence[Frame], opts: VideoOptions, name: str) -> VideoClip:
    """qwen-vl-utils 0.0.14 frame lists: frames resized like images, padded to an even count by
    repeating the last one, then resized to one video size."""
    # qwen-vl-utils 0.0.14 passes its 28-pixel factor where fetch_image expects the 14-pixel patch
    # size, so list frames are first snapped to multiples of 56; kept for identical sizes.
    frames_TCHW = _stack_frames(items, opts, name, sizing.IMAGE_MIN_PIXELS, sizing.IMAGE_MAX_PIXELS,
                                factor=2 * sizing.FACTOR)
    indices = list(range(len(frames_TCHW)))
    indices += [indices[-1]] * (len(indices) % sizing.FRAME_FACTOR)
    frames_TCHW = frames_TCHW[indices]
    size = _uniform_size(opts, *frames_TCHW.shape[-2:], len(indices))
    fps = _default(opts.fps, sizing.DEFAULT_FPS)
    return VideoClip(
        frames=list(resize_frames(frames_TCHW, size)), frame_types=torch.full((len(indices),), SLOW, dtype=torch.int32),
        timestamps=torch.tensor([i / fps for i in range(len(indices))], dtype=torch.float32),
        indices=torch.tensor(indices), slow_size=size, fast_size=None, source_fps=opts.fps,
        source_size=tuple(frames_TCHW.shape[-2:]),
    )


def _stack_frames(items: Sequence[Frame], opts: VideoOptions, name: str, min_pixels: int, max_pixels: int,
                  factor: int = sizing.FACTOR) -> torch.Tensor:
    if not items:
        raise VideoError(f"{name}: the frame list is empty")
    if opts.video_start is not None or opts.video_end is not None:
        raise VideoError(f"{name}: video_start/video_end apply to video files, not to a list of frames")
    frames = []
    for i, item in enumerate(items):
        pil = load_image(item, f"{name} frame {i}")
        if opts.resized is not None:
            size = sizing.smart_resize(*opts.resized, factor)
        else:
            size = sizing.smart_resize(pil.height, pil.width, factor, _default(opts.min_pixels, min_pixels),
                                       _default(opts.max_pixels, max_pixels))
        frames.append(_pil_resize(pil, size))
    shapes = sorted({tuple(f.shape) for f in frames})
    if len(shapes) > 1:
        raise VideoError(f"{name}: frames of one video must share a size, got {shapes}")
    return torch.stack(frames)


FRAME_LIST_SAMPLERS = {"slow_fast": _frame_list_slow_fast, "uniform": _frame_list_uniform}


# ----------------------------------------------------------------------------- entry point


def read_video(source: VideoSource | Sequence[Frame], *, slow_fast: bool = True, backend: str = "auto",
               name: str | None = None, chunk: int = DEFAULT_CHUNK, **options) -> VideoClip:
    """Sample, type and resize one video.

    source: a path, a ``file://`` URL, the bytes of a video file, or a list of frames (PIL images,
        image paths, uint8 (H, W, 3) arrays or (3, H, W) tensors).
    slow_fast: Keye-VL-1.5 Slow-Fast (keye-vl-utils 1.5.2) when True, uniform sampling
        (qwen-vl-utils 0.0.14) when False.
    backend: "auto" (decord, else PyAV), "decord" or "pyav".
    options: message keys (fps, nframes, min_frames, max_frames, min_pixels, max_pixels,
        total_pixels / video_total_pixels, video_start, video_end, min_frame_similarity,
        resized_height, resized_width).
    Returns a ``VideoClip`` whose frames are uint8 (3, h, w) at slow_size / fast_size.
    """
    mode = "slow_fast" if slow_fast else "uniform"
    if isinstance(source, (list, tuple)):
        name = name or f"frame list of {len(source)}"
        return FRAME_LIST_SAMPLERS[mode](source, VideoOptions.from_message(options, name), name)
    name = name or source_name(source)
    opts = VideoOptions.from_message(options, f"video {name!r}")
    video = open_video(source, backend)
    try:
        return SAMPLERS[mode](video, opts, chunk)
    except DecodeError as first_error:
        other = "pyav" if video.backend == "decord" else "decord"
        if backend != "auto" or other not in available_backends():
            raise
        # The chosen backend opened the file but failed to decode it (decord trips on some odd frame
        # widths, e.g. 48 px; PyAV's seeking on some MPEG-TS files); "auto" means: try the other
        # backend before giving up, and report its verdict.
        try:
            fallback = open_video(source, other)
        except VideoError:
            raise first_error from None
        try:
            return SAMPLERS[mode](fallback, opts, chunk)
        finally:
            fallback.close()
    finally:
        video.close()
