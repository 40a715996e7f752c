"""Conversation datasets from jsonl, in the layouts existing multimodal SFT data already uses.

Accepted row layouts, normalised into one ``Conversation`` (turns of role + content parts, media
paths resolved relative to the jsonl's folder):

* ShareGPT as LLaMA-Factory reads it: ``"conversations": [{"from": "human"|"gpt"|..., "value": str}]``
  plus optional ``"system"``, with ``<image>`` / ``<video>`` placeholders in the text, filled in
  order from the row's ``"images"`` / ``"videos"`` lists (LLaMA-Factory ``mm_plugin`` semantics).
* OpenAI-style messages as ms-swift and LLaMA-Factory read them: ``"messages": [{"role", "content": str}]``
  with the same placeholders and lists.
* The Keye / Qwen-VL message format: ``"messages": [{"role", "content": [{"type": "text", "text"},
  {"type": "image", "image": path}, {"type": "video", "video": path | [frame paths], "fps", ...}]}]``.
  Per-item video options (fps, max_frames, min/max_pixels, ...) are kept on the part.

Rows may mix the two content styles message by message. A row that cannot be used raises a
``ConversationError`` naming the file, the line and the problem; ``ConversationDataset`` skips
such rows, counts them by reason and logs one summary, so a bad row never stops a run.
Video decoding happens later (in the collator); ``SkipBadSamples`` wraps that step the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from torch.utils.data import Dataset

from keye.errors import KeyeInputError

log = logging.getLogger("keye.data")

MEDIA_TYPES = ("image", "video")
PLACEHOLDERS = {"image": "<image>", "video": "<video>"}
_PLACEHOLDER_RE = re.compile(r"(<image>|<video>)")
# role spellings of LLaMA-Factory's sharegpt tags (human/gpt/observation/function_call), OpenAI and
# ms-swift (user/assistant/tool), normalised to four roles. A function call is the assistant speaking
# (it is trained on); an observation / tool result is input, like a user turn.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
_URL_PREFIXES = ("http://", "https://", "data:")


class ConversationError(KeyeInputError):
    """A jsonl row that cannot be used. ``reason`` is a short key for counting skipped rows."""

    def __init__(self, source: str, reason: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source, self.reason, self.problem = source, reason, problem


@dataclass
class Part:
    """One content item. ``path`` is a resolved file path or URL (a list of them for a video given as frames)."""

    type: str  # "text" | "image" | "video"
    text: str | None = None
    path: str | list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant" | "tool"
    parts: list[Part]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if p.type == "text")


@dataclass
class Conversation:
    """A normalised row. ``meta`` keeps the row's other fields (id, kind, answer, ...)."""

    turns: list[Turn]
    source: str  # "file:line"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def media(self) -> list[Part]:
        return [p for t in self.turns for p in t.parts if p.type in MEDIA_TYPES]

    def to_messages(self) -> list[dict]:
        """The Keye / Qwen-VL message list (what ``process_vision_info`` and the processor take)."""
        out = []
        for turn in self.turns:
            content = []
            for p in turn.parts:
                if p.type == "text":
                    content.append({"type": "text", "text": p.text})
                else:
                    content.append({"type": p.type, p.type: p.path, **p.options})
            out.append({"role": turn.role, "content": content})
        return out


@dataclass(frozen=True)
class RowFormat:
    """Where a row keeps its turns. ``None`` tags are detected per row (LLaMA-Factory's dataset_info
    ``tags`` / ``columns`` let a user rename these; the defaults cover its sharegpt and openai styles)."""

    messages_key: str | None = None  # "messages" or "conversations"
    role_tag: str | None = None  # "role" or "from"
    content_tag: str | None = None  # "content" or "value"
    system_key: str = "system"
    images_key: str = "images"
    videos_key: str = "videos"


def parse_row(row: Any, source: str, base_dir: str | os.PathLike, fmt: RowFormat = RowFormat(), check_files: bool = True) -> Conversation:
    """Normalise one decoded jsonl row; raise ConversationError naming ``source`` on any problem."""
    if not isinstance(row, dict):
        raise ConversationError(source, "bad_row", f"a row must be a JSON object, got {type(row).__name__}")
    key = fmt.messages_key or next((k for k in ("messages", "conversations") if k in row), None)
    messages = row.get(key) if key else None
    if not isinstance(messages, list) or not messages:
        raise ConversationError(source, "no_messages", "no non-empty 'messages' or 'conversations' list")
    media = {kind: list(_as_list(row.get(getattr(fmt, f"{kind}s_key")), source, kind)) for kind in MEDIA_TYPES}
    used = {kind: 0 for kind in MEDIA_TYPES}
    base = Path(base_dir)

    turns: list[Turn] = []
    system = row.get(fmt.system_key)
    if isinstance(system, str) and system:
        turns.append(Turn("system", [Part("text", text=system)]))
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConversationError(source, "bad_row", f"message {i} must be an object")
        role_tag = fmt.role_tag or ("role" if "role" in message else "from")
        content_tag = fmt.content_tag or ("content" if "content" in message else "value")
        raw_role = message.get(role_tag)
        role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise ConversationError(source, "unknown_role", f"message {i} has unknown role {raw_role!r}; known: {sorted(ROLE_ALIASES)}")
        content = message.get(content_tag)
        if isinstance(content, str):
            parts = _split_placeholders(content, media, used, source, i)
        elif isinstance(content, list):
            parts = [_content_item(item, source, i) for item in content]
        else:
            raise ConversationError(source, "bad_row", f"message {i} content must be a string or a list, got {type(content).__name__}")
        if role == "assistant" and not any((p.text or "").strip() for p in parts if p.type == "text"):
            raise ConversationError(source, "empty_assistant", f"message {i} is an empty assistant turn")
        turns.append(Turn(role, parts))

    for kind in MEDIA_TYPES:
        if used[kind] != len(media[kind]):
            raise ConversationError(
                source, "placeholder_mismatch", f"{used[kind]} {PLACEHOLDERS[kind]} placeholders but {len(media[kind])} {kind}s listed"
            )
    if not any(t.role == "assistant" for t in turns):
        raise ConversationError(source, "no_assistant", "no assistant turn (nothing to train on)")
    for part in (p for t in turns for p in t.parts if p.type in MEDIA_TYPES):
        part.path = _resolve(part.path, base, source, part.type, check_files)
    meta = {k: v for k, v in row.items() if k not in {key, fmt.system_key, fmt.images_key, fmt.videos_key}}
    return Conversation(turns, source, meta)


def _as_list(value: Any, source: str, kind: str) -> Iterable:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    if isinstance(value, list):
        return value
    raise ConversationError(source, "bad_row", f"'{kind}s' must be a list, got {type(value).__name__}")


def _split_placeholders(text: str, media: dict[str, list], used: dict[str, int], source: str, i: int) -> list[Part]:
    parts = []
    for piece in _PLACEHOLDER_RE.split(text):
        if piece in ("<image>", "<video>"):
            kind = piece[1:-1]
            if used[kind] >= len(media[kind]):
                problem = f"message {i}: more {piece} placeholders than the {len(media[kind])} {kind}s listed"
                raise ConversationError(source, "placeholder_mismatch", problem)
            parts.append(_listed_media(kind, media[kind][used[kind]]))
            used[kind] += 1
        elif piece:
            parts.append(Part("text", text=piece))
    return parts


def _listed_media(kind: str, item: Any) -> Part:
    """An entry of a row's images / videos list: a path, or (ms-swift style) {"path": ..., options}."""
    if isinstance(item, dict):
        options = {k: v for k, v in item.items() if k not in ("path", kind)}
        return Part(kind, path=item.get("path") or item.get(kind), options=options)
    return Part(kind, path=item)


def _content_item(item: Any, source: str, i: int) -> Part:
    if isinstance(item, str):
        return Part("text", text=item)
    kind = item.get("type") if isinstance(item, dict) else None
    if kind == "text":
        return Part("text", text=str(item.get("text", "")))
    if kind in MEDIA_TYPES:
        path = item.get(kind)
        if path is None:
            raise ConversationError(source, "bad_row", f"message {i}: a {kind} item without its '{kind}' field")
        return Part(kind, path=path, options={k: v for k, v in item.items() if k not in ("type", kind)})
    raise ConversationError(source, "bad_row", f"message {i}: content item of unknown type {kind!r}")


def _resolve(path: Any, base: Path, source: str, kind: str, check_files: bool) -> str | list[str]:
    if isinstance(path, list):  # a video given as a list of frame files
        if not path:
            raise ConversationError(source, "missing_file", f"{kind} given as an empty frame list")
        return [_resolve(p, base, source, kind, check_files) for p in path]
    if not isinstance(path, str) or not path:
        raise ConversationError(source, "bad_row", f"{kind} path must be a non-empty string, got {path!r}")
    if path.startswith(_URL_PREFIXES):
        return path
    resolved = base / path.removeprefix("file://")
    if check_files and not resolved.is_file():
        raise ConversationError(source, "missing_file", f"{kind} file {str(resolved)!r} does not exist")
    return str(resolved)


def read_conversations(
    path: str | os.PathLike, fmt: RowFormat = RowFormat(), check_files: bool = True
) -> Iterable[Conversation | ConversationError]:
    """Yield a Conversation per row, or the ConversationError that row raised.

    ``.jsonl``: one row per non-blank line (source "file:line"). ``.json``: one array of rows, as
    LLaMA-Factory's own dataset files are (source "file[index]").
    """
    path = Path(path)
    for source, row in _rows(path):
        if isinstance(row, ConversationError):
            yield row
            continue
        try:
            yield parse_row(row, source, path.parent, fmt, check_files)
        except ConversationError as err:
            yield err


def _rows(path: Path) -> Iterable[tuple[str, Any]]:
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise KeyeInputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        if not isinstance(rows, list):
            raise KeyeInputError(f"{path}: a .json dataset must hold an array of rows, got {type(rows).__name__}")
        yield from ((f"{path}[{i}]", row) for i, row in enumerate(rows))
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as err:
                yield source, ConversationError(source, "bad_json", f"not valid JSON ({err.msg} at column {err.colno})")


class ConversationDataset(Dataset):
    """All usable conversations of one or more jsonl files; bad rows are skipped and counted.

    ``skipped`` counts skipped rows by reason; ``errors`` keeps the first ``keep_errors`` messages.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        fmt: RowFormat = RowFormat(),
        check_files: bool = True,
        keep_errors: int = 20,
    ):
        self.paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        self.conversations: list[Conversation] = []
        self.skipped: Counter[str] = Counter()
        self.errors: list[str] = []
        for path in self.paths:
            if not path.is_file():
                raise KeyeInputError(f"conversation file {str(path)!r} does not exist")
            for item in read_conversations(path, fmt, check_files):
                if isinstance(item, ConversationError):
                    self.skipped[item.reason] += 1
                    if len(self.errors) < keep_errors:
                        self.errors.append(str(item))
                else:
                    self.conversations.append(item)
        if self.skipped:
            log.warning("%s", self.report())

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Conversation:
        return self.conversations[index]

    def report(self) -> str:
        names = ", ".join(p.name for p in self.paths)
        total = len(self) + sum(self.skipped.values())
        if not self.skipped:
            return f"{names}: {len(self)} conversations, none skipped"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        return f"{names}: kept {len(self)} of {total} rows; skipped {reasons}; first: {self.errors[0]}"


T = TypeVar("T")


class SkipBadSamples(Dataset, Generic[T]):
    """Apply ``load`` (e.g. decode the video and build model inputs) per conversation; a sample whose
    load raises a KeyeInputError (VideoError included) is counted by reason and replaced by the next
    index, so one undecodable file never crashes a long run. Raises only when ``max_tries``
    consecutive samples fail, which means the data, not one file, is broken.

    With DataLoader workers each worker counts its own skips; the training runner sends them back to
    the main process's copy with each batch (``keye.train.runner``).
    """

    def __init__(self, dataset: Dataset, load: Callable[[Any], T], max_tries: int = 16, keep_errors: int = 20):
        self.dataset, self.load, self.max_tries, self.keep_errors = dataset, load, max_tries, keep_errors
        self.skipped: Counter[str] = Counter()
        self.errors: list[str] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> T:
        for k in range(self.max_tries):
            item = self.dataset[(index + k) % len(self.dataset)]
            try:
                return self.load(item)
            except KeyeInputError as err:
                reason = getattr(err, "reason", None) or type(err).__name__
                self.skipped[reason] += 1
                where = getattr(item, "source", f"index {(index + k) % len(self.dataset)}")
                message = f"{where}: {err}" if where not in str(err) else str(err)
                if len(self.errors) < self.keep_errors:
                    self.errors.append(message)
                log.warning("skipping sample: %s", message)
        raise KeyeInputError(f"{self.max_tries} consecutive samples failed to load from index {index}; last errors: {self.errors[-3:]}")
