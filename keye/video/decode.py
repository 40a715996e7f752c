"""Video decoding backends: decord and PyAV, chosen per stream, both decoding only the frames asked for.

A backend opens a source (a path or the bytes of a file) and yields the requested frame indices,
in order, as uint8 (N, H, W, 3) chunks. Frame index i is the i-th frame in presentation order,
the way decord counts, so both backends hand out the same frames for the same indices.

Backends are registered functions in ``BACKENDS``; ``backend="auto"`` picks PyAV for streams with
B-frames (it skips the unwanted ones) and decord otherwise (see ``_auto_backend``), and tries the
other one when the chosen backend is missing or cannot open the file.
"""

from __future__ import annotations

import bisect
import io
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue

import numpy as np

from keye.errors import VideoError

VideoSource = str | os.PathLike | bytes


class DecodeError(VideoError):
    """The file opened but its frames could not be decoded (truncated, corrupt, or a decoder bug)."""


Chunks = Iterator[tuple[list[int], np.ndarray]]  # (indices, frames_NHWC uint8)

DEFAULT_CHUNK = 8
CHUNK_BYTES = 8 << 20  # full-resolution frames per chunk are capped to about this many bytes
# decord's decoder threads (0 = its automatic choice, which measured fastest on the 2-core
# machine even with the analysis thread beside it); override with KEYE_DECORD_THREADS.
DECORD_THREADS = int(os.environ.get("KEYE_DECORD_THREADS", "0"))


@dataclass
class OpenedVideo:
    """An open video: its geometry and a way to decode selected frames."""

    name: str
    backend: str
    num_frames: int
    fps: float
    height: int
    width: int
    read: Callable[[Sequence[int], int], Chunks]  # (sorted unique indices, chunk size) -> chunks
    close: Callable[[], None] = lambda: None
    frames_decoded: int = 0  # PyAV only: frames the decoder produced (wanted or not), to check seeking


def source_name(source: VideoSource) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return str(source)


def resolve_path(source: VideoSource) -> str | bytes:
    """A local path (``file://`` stripped) that exists, or the bytes unchanged."""
    if isinstance(source, bytes):
        if not source:
            raise VideoError("video <0 bytes>: empty input")
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise VideoError(f"video {source!r}: expected a path, file:// URL, bytes or a list of frames, "
                         f"got {type(source).__name__}")
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        raise VideoError(f"video {text!r}: remote URLs are not fetched; download the file and pass its path")
    path = text[len("file://"):] if text.startswith("file://") else text
    if Path(path).is_dir():
        raise VideoError(f"video {text!r}: is a folder, not a video file")
    if not Path(path).is_file():
        raise VideoError(f"video {text!r}: file not found")
    return path


def _file_like(source: str | bytes):
    return io.BytesIO(source) if isinstance(source, bytes) else source


@dataclass(frozen=True)
class StreamHeader:
    """What the container header and the first packets say about the first video stream."""

    height: int
    width: int
    reorders: bool  # packets arrive out of presentation order: the stream has B-frames


REORDER_PROBE_PACKETS = 48  # x264's default GOPs show their first B-frame within a few packets


def probe_header(source: str | bytes) -> StreamHeader:
    """Frame size and whether frames are reordered, read without decoding anything.

    A tiny probe size skips FFmpeg's stream-info probing, which decodes frames (~20 ms on 720p,
    paid before decoding can start); containers that keep the size in the header (mp4, mkv, ...)
    answer at once (~2 ms). Anything else gets the full probe.
    """
    import av

    quick = {"probesize": "32"}
    for options in (quick, {}):
        try:
            with av.open(_file_like(source), options=options) as container:
                stream = container.streams.video[0]
                height, width = stream.codec_context.height, stream.codec_context.width
                if (height and width) or options is not quick:
                    return StreamHeader(height, width, _reorders(container, stream))
        except (av.error.FFmpegError, IndexError):
            if options is not quick:
                raise
    raise AssertionError("unreachable: the full probe returns or raises")


def _reorders(container, stream) -> bool:
    """Whether a packet among the first ``REORDER_PROBE_PACKETS`` has an earlier pts than one before it."""
    latest = None
    for count, packet in enumerate(container.demux(stream)):
        if packet.pts is not None:
            if latest is not None and packet.pts < latest:
                return True
            latest = packet.pts if latest is None else max(latest, packet.pts)
        if count >= REORDER_PROBE_PACKETS:
            break
    return False


# ----------------------------------------------------------------------------- decord


def open_decord(source: str | bytes, name: str, header: StreamHeader | None = None) -> OpenedVideo:
    import decord

    try:
        reader = decord.VideoReader(_file_like(source), num_threads=DECORD_THREADS)
    except (decord.DECORDError, RuntimeError) as err:
        raise VideoError(f"video {name!r}: decord cannot open it ({_first_line(err)})") from err
    num_frames = len(reader)
    if num_frames == 0:
        raise VideoError(f"video {name!r}: the video stream has no frames")
    header = header or probe_header(source)

    def read(indices: Sequence[int], chunk: int) -> Chunks:
        for start in range(0, len(indices), chunk):
            part = list(indices[start:start + chunk])
            try:
                frames_NHWC = reader.get_batch(part).asnumpy()
            except (decord.DECORDError, RuntimeError) as err:
                raise DecodeError(f"video {name!r}: decoding frames {part[0]}..{part[-1]} failed, the file is "
                                 f"truncated or corrupt ({_first_line(err)})") from err
            yield part, frames_NHWC

    return OpenedVideo(name, "decord", num_frames, float(reader.get_avg_fps()), header.height, header.width, read)


# ----------------------------------------------------------------------------- PyAV


def open_pyav(source: str | bytes, name: str) -> OpenedVideo:
    """PyAV backend: demux once (no decoding) to learn every frame's pts and the keyframes, then
    decode runs that start at the keyframe before each wanted frame, so sparse sampling skips
    whole GOPs. Packets of frames nobody wants are decoded with ``skip_frame=NONREF``, which
    drops non-reference (B) frames without affecting the others."""
    import av

    try:
        container = av.open(_file_like(source))
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise VideoError(f"video {name!r}: PyAV cannot open it ({_first_line(err)})") from err
    if not container.streams.video:
        container.close()
        raise VideoError(f"video {name!r}: the file has no video stream")
    stream = container.streams.video[0]
    try:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None and p.size]
    except av.error.FFmpegError as err:
        container.close()
        raise VideoError(f"video {name!r}: the file is truncated or corrupt ({_first_line(err)})") from err
    if not packets:
        container.close()
        raise VideoError(f"video {name!r}: the video stream has no frames")
    pts_sorted = sorted(pts for pts, _ in packets)
    index_of = {pts: i for i, pts in enumerate(pts_sorted)}
    keyframes = sorted(index_of[pts] for pts, key in packets if key) or [0]
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 25.0
    stream.thread_type = "SLICE"  # frame threads: same frames, more CPU, no faster on 2 cores (measured)

    def runs(indices: Sequence[int]) -> list[list[int]]:
        """Group wanted indices so each group is decoded from one seek: a new group starts when a
        keyframe lies between the previous wanted frame and this one."""
        groups: list[list[int]] = []
        for index in indices:
            key = keyframes[max(bisect.bisect_right(keyframes, index) - 1, 0)]
            if groups and key <= groups[-1][-1]:
                groups[-1].append(index)
            else:
                groups.append([index])
        return groups

    def decode_run(run: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        key = keyframes[max(bisect.bisect_right(keyframes, run[0]) - 1, 0)]
        wanted = {pts_sorted[i] for i in run}
        remaining = len(run)
        codec = stream.codec_context
        container.seek(pts_sorted[key], stream=stream, backward=True, any_frame=False)
        for packet in container.demux(stream):
            codec.skip_frame = "DEFAULT" if packet.pts in wanted or packet.pts is None else "NONREF"
            for frame in packet.decode():
                opened.frames_decoded += 1
                if frame.pts in wanted:
                    wanted.discard(frame.pts)
                    remaining -= 1
                    yield index_of[frame.pts], frame.to_ndarray(format="rgb24")
            if remaining == 0:
                codec.skip_frame = "DEFAULT"
                return
        codec.skip_frame = "DEFAULT"

    def read(indices: Sequence[int], chunk: int) -> Chunks:
        got_indices, got_frames = [], []
        try:
            for run in runs(indices):
                for index, frame_HWC in decode_run(run):
                    got_indices.append(index)
                    got_frames.append(frame_HWC)
                    if len(got_frames) == chunk:
                        yield got_indices, np.stack(got_frames)
                        got_indices, got_frames = [], []
        except av.error.FFmpegError as err:
            raise DecodeError(f"video {name!r}: decoding failed, the file is truncated or corrupt "
                             f"({_first_line(err)})") from err
        if got_frames:
            yield got_indices, np.stack(got_frames)

    opened = OpenedVideo(name, "pyav", len(pts_sorted), fps, stream.codec_context.height,
                         stream.codec_context.width, read, close=container.close)
    return opened


# ----------------------------------------------------------------------------- selection


def _decord_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("decord") is not None


BACKENDS: dict[str, Callable[[str | bytes, str], OpenedVideo]] = {"decord": open_decord, "pyav": open_pyav}


def available_backends() -> list[str]:
    return [name for name in BACKENDS if name != "decord" or _decord_available()]


# Above this frame area "auto" reads with PyAV: decord's memory grows with the sampled frames at full
# resolution (an 8000x8000 clip took 5.2 GB at 24 frames, against 1.6 GB through PyAV).
HUGE_FRAME_PIXELS = 3840 * 2160


def _auto_backend(source: str | bytes) -> tuple[str, StreamHeader | None]:
    """decord, unless the stream has B-frames or frames larger than 4K UHD: then PyAV, which decodes
    fewer frames (B-frames) and holds fewer full-resolution frames at once (huge frames).

    decord decodes every frame from the keyframe to each sampled frame; PyAV skips the unwanted
    non-reference (B) frames. At the default 2 fps sampling that is ~30-45% fewer frames on
    x264 streams (bikes.mp4: 129 vs 225), which outweighs decord's frame threads even on an idle
    2-core machine (wall time 0.15 vs 0.19 s on bikes.mp4, 0.54 vs 0.78 s on a 60 s 360p clip).
    Without B-frames both decode the same frames and decord's threads win (bigbuckbunny.mp4 720p:
    0.36 vs 0.42 s). Sampling near the native rate of a B-frame stream has nothing to skip: pass
    ``backend="decord"`` there.
    """
    import av

    if not _decord_available():
        return "pyav", None
    try:
        header = probe_header(source)
    except (av.error.FFmpegError, IndexError, UnicodeDecodeError):  # the backends report it in their words
        return "decord", None
    return ("pyav" if header.reorders or header.height * header.width > HUGE_FRAME_PIXELS else "decord"), header


def open_video(source: VideoSource, backend: str = "auto") -> OpenedVideo:
    """Open ``source`` with ``backend``: "decord", "pyav" or "auto" (the rule is ``_auto_backend``;
    when the chosen backend cannot open the file the other one is tried, and PyAV's error is the
    one reported if both fail)."""
    name = source_name(source)
    resolved = resolve_path(source)
    if backend == "auto":
        choice, header = _auto_backend(resolved)
        openers = {"decord": lambda: open_decord(resolved, name, header), "pyav": lambda: open_pyav(resolved, name)}
        errors: dict[str, VideoError] = {}
        for candidate in [choice, *(b for b in available_backends() if b != choice)]:
            try:
                return openers[candidate]()
            except VideoError as err:
                errors[candidate] = err
        raise errors["pyav"] from errors.get("decord")
    if backend not in BACKENDS:
        raise VideoError(f"video {name!r}: unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    return BACKENDS[backend](resolved, name)


def _prefetch(chunks: Chunks, depth: int = 1) -> Chunks:
    """Run the decoder a chunk ahead in a thread: decord and PyAV release the GIL while decoding,
    so decoding the next chunk overlaps the Slow-Fast analysis and resizing of this one."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce():
        try:
            for item in chunks:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(("error", err))

    worker = threading.Thread(target=produce, name="keye-video-decode", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise payload
            yield payload
    finally:
        stop.set()
        worker.join()


def read_frames(video: OpenedVideo, indices: Sequence[int], chunk: int = DEFAULT_CHUNK,
                prefetch: bool = True) -> Chunks:
    """Decode sorted unique ``indices`` of ``video`` in chunks, checking every one arrives.

    Chunks hold at most ``chunk`` frames and about ``CHUNK_BYTES``: with one chunk queued, one
    being decoded and one being processed, a 1080p clip keeps ~25 MB of full-resolution frames in
    flight however long it is.
    """
    chunk = max(1, min(chunk, CHUNK_BYTES // (video.height * video.width * 3)))
    expected = iter(indices)
    count = 0
    chunks = video.read(indices, chunk)
    for part, frames_NHWC in _prefetch(chunks) if prefetch else chunks:
        for index in part:
            if index != next(expected, None):
                raise DecodeError(f"video {video.name!r}: frame {index} arrived out of order ({video.backend})")
        count += len(part)
        yield part, frames_NHWC
    if count != len(indices):
        raise DecodeError(f"video {video.name!r}: only {count} of {len(indices)} sampled frames could be decoded "
                         f"(last wanted index {indices[-1]} of {video.num_frames}); the file is truncated or corrupt")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
