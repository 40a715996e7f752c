"""``process_vision_info``: every image and video of a conversation, ready for the processor."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from keye.errors import VideoError
from keye.video.decode import DEFAULT_CHUNK, source_name
from keye.video.options import MEDIA_KEYS, VideoOptions
from keye.video.reader import _read_image, read_video
from keye.video.types import ImageInput, VideoClip


@dataclass
class VisionInputs:
    """Images and videos of a conversation in order of appearance; unpacks and indexes like the peers'
    ``(images, videos)`` tuple (``images, videos = ...``, ``vision[0]``, ``len(vision) == 2``)."""

    images: list[ImageInput] = field(default_factory=list)
    videos: list[VideoClip] = field(default_factory=list)

    def __iter__(self) -> Iterator[list]:
        return iter((self.images, self.videos))

    def __getitem__(self, index):
        return (self.images, self.videos)[index]

    def __len__(self) -> int:
        return 2


def extract_vision_info(conversations: list[dict] | list[list[dict]]) -> list[tuple[str, dict]]:
    """(where, part) for each image/video part, ``where`` naming it for error messages.

    Accepts one conversation (a list of messages) or a batch of them, like the peers.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise VideoError(f"process_vision_info: expected a list of messages, got {type(conversations).__name__}")
    batch = [conversations] if isinstance(conversations[0], dict) else conversations
    found = []
    for c, conversation in enumerate(batch):
        for m, message in enumerate(conversation):
            if not isinstance(message, dict):
                raise VideoError(f"conversation {c} message {m}: expected a dict, got {type(message).__name__}")
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for p, part in enumerate(content):
                if not isinstance(part, dict):
                    continue
                if any(k in part for k in MEDIA_KEYS) or part.get("type") in ("image", "image_url", "video"):
                    where = f"message {m} part {p}" if len(batch) == 1 else f"conversation {c} message {m} part {p}"
                    found.append((where, part))
    return found


def process_vision_info(conversations: list[dict] | list[list[dict]], *, slow_fast: bool = True, backend: str = "auto",
                        chunk: int = DEFAULT_CHUNK) -> VisionInputs:
    """Read, sample, type and resize every image and video in ``conversations``.

    Message parts use the qwen-vl-utils / keye-vl-utils keys (see ``keye.video.options``).
    ``slow_fast`` picks Keye-VL-1.5 Slow-Fast sampling (keye-vl-utils 1.5.2) or uniform sampling
    (qwen-vl-utils 0.0.14); ``backend`` picks the decoder ("auto", "decord", "pyav"). A bad input
    raises ``VideoError`` naming the part (e.g. "video #2 (message 1 part 0)").
    """
    result = VisionInputs()
    for where, part in extract_vision_info(conversations):
        if "image" in part or "image_url" in part:
            image = part.get("image", part.get("image_url"))
            name = f"image #{len(result.images) + 1} ({where}{_describe(image)})"
            result.images.append(_read_image(image, VideoOptions.from_message(part, name), name))
        elif "video" in part:
            video = part["video"]
            name = f"video #{len(result.videos) + 1} ({where}{_describe(video)})"
            options = {k: v for k, v in part.items() if k not in ("type", "video", "text")}
            try:
                result.videos.append(read_video(video, slow_fast=slow_fast, backend=backend, chunk=chunk, **options))
            except VideoError as err:
                raise VideoError(f"{name}: {err}") from err
        else:
            raise VideoError(f"{where}: a part of type {part.get('type')!r} needs an 'image', 'image_url' "
                             "or 'video' key")
    return result


def _describe(media) -> str:
    if isinstance(media, (str, bytes)) or hasattr(media, "__fspath__"):
        return f", {source_name(media)!r}" if not isinstance(media, bytes) else f", {source_name(media)}"
    if isinstance(media, (list, tuple)):
        return f", {len(media)} frames"
    return ""
