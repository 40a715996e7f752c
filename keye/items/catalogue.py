"""Item catalogues: jsonl or parquet rows with a ``pid`` and whatever an item has.

Recognised fields: ``pid`` (int or str, required), ``video`` and ``image`` (paths), and the text fields
``title``, ``caption``, ``asr``, ``ocr``. Other fields are ignored. Rows are streamed, never loaded whole.
A row that cannot be parsed comes back as a ``BadRow`` so the export can report it instead of dropping it; a jsonl
line that is not UTF-8 is one such row (its line number and the byte offset of the bad byte in the file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from keye.errors import KeyeInputError

TEXT_FIELDS = ("title", "caption", "asr", "ocr")


@dataclass(frozen=True)
class Item:
    pid: int | str
    video: str | None = None
    image: str | None = None
    texts: dict[str, str] = field(default_factory=dict)  # field name -> text, only non-empty ones

    @property
    def modalities(self) -> list[str]:
        return [m for m, present in (("video", self.video), ("image", self.image), ("text", self.texts)) if present]


@dataclass(frozen=True)
class BadRow:
    where: str  # "line 12" / "row 12"
    pid: int | str | None
    reason: str


def item_from_record(record: dict) -> Item:
    """Validate one catalogue record; raises ``KeyeInputError`` saying what is wrong."""
    if not isinstance(record, dict):
        raise KeyeInputError(f"expected an object, got {type(record).__name__}")
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, (int, str)) or pid == "":
        raise KeyeInputError(f"'pid' must be a non-empty int or string, got {pid!r}")
    texts = {}
    for name in TEXT_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise KeyeInputError(f"pid {pid!r}: '{name}' must be a string, got {type(value).__name__}")
        if value.strip():
            texts[name] = value.strip()
    media = {}
    for name in ("video", "image"):
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise KeyeInputError(f"pid {pid!r}: '{name}' must be a path string, got {type(value).__name__}")
        media[name] = value or None
    return Item(pid=pid, texts=texts, **media)


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    # read bytes and decode line by line: one bad byte costs its line, not the whole export
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                where = f"line {number}, byte {start + err.start}"
                yield where, None, f"not UTF-8 (byte 0x{raw[err.start]:02x} at offset {start + err.start})"
                continue
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line), None
            except json.JSONDecodeError as err:
                yield f"line {number}", None, f"not valid JSON ({err.msg})"


def _parquet_records(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            yield f"row {number}", record, None


def iter_catalogue(path: str | Path) -> Iterator[Item | BadRow]:
    """Stream a ``.jsonl`` / ``.parquet`` catalogue as ``Item`` (good rows) or ``BadRow`` (reported rows)."""
    path = Path(path)
    if not path.is_file():
        raise KeyeInputError(f"catalogue {path}: no such file")
    readers = {".jsonl": _jsonl_records, ".json": _jsonl_records, ".parquet": _parquet_records}
    if path.suffix not in readers:
        raise KeyeInputError(f"catalogue {path}: expected a .jsonl or .parquet file")
    for where, record, problem in readers[path.suffix](path):
        if problem:
            yield BadRow(where, None, problem)
            continue
        try:
            yield item_from_record(record)
        except KeyeInputError as err:
            pid = record.get("pid") if isinstance(record, dict) else None
            yield BadRow(where, pid if isinstance(pid, (int, str)) else None, str(err))
