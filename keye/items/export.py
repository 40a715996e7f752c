"""Export one embedding per catalogue item as parquet shards (``pid, embedding``), resumably.

- Streamed: items are encoded ``batch_size`` at a time and written every ``shard_size`` rows or every
  ``shard_seconds``, whichever comes first, as ``part-00000.parquet``, ``part-00001.parquet``, ...; each shard is
  written to a temporary name and renamed, so a shard on disk is always complete, and a killed run loses at most
  one shard's rows or seconds of work, however slow the encoder.
- Resumable: a rerun reads the pids of the finished shards and skips them, so a run killed at any point ends,
  after reruns, with every pid exactly once. A rerun with a different encoder configuration is refused.
- Nothing vanishes silently: catalogue rows that do not parse, duplicate pids (the first one is kept), and items
  the encoder cannot read are counted, printed, and appended to ``<out>.problems.jsonl`` *beside* the shard folder,
  so the folder holds parquet shards only (readers such as ``pq.ParquetDataset(folder)`` take every file in it).
- Provenance (encoder, its config hash, the inputs used, catalogue, time) is in every shard's parquet metadata
  under ``keye.provenance``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from keye.errors import KeyeInputError
from keye.fileio import atomic_path
from keye.items.catalogue import BadRow, Item, iter_catalogue
from keye.items.encoders import ItemEncoder

PROVENANCE_KEY = b"keye.provenance"
_SHARD = re.compile(r"^part-(\d{5,})\.parquet$")


@dataclass
class ExportReport:
    written: int = 0  # items encoded and written by this run
    already_done: int = 0  # items skipped because a finished shard has them
    shards: list[str] = field(default_factory=list)  # shards written by this run
    problems: list[dict] = field(default_factory=list)  # {"pid", "where", "kind", "reason"}

    def summary(self) -> str:
        kinds = Counter(p["kind"] for p in self.problems)
        parts = [f"wrote {self.written} embeddings in {len(self.shards)} shards", f"{self.already_done} already done"]
        parts += [f"{n} {kind}" for kind, n in sorted(kinds.items())]
        return ", ".join(parts)


def problems_path(out_dir: str | Path) -> Path:
    """Where an export into ``out_dir`` reports its problems: ``<out_dir>.problems.jsonl``, beside the folder."""
    out = Path(out_dir)
    return out.with_name(out.name + ".problems.jsonl")


def finished_shards(out_dir: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in out_dir.iterdir() if (m := _SHARD.match(p.name))}


def shard_provenance(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(PROVENANCE_KEY, b"{}"))


class _ShardWriter:
    def __init__(self, out_dir: Path, first_index: int, provenance: dict, pid_type: pa.DataType | None):
        self.out_dir, self.index, self.provenance, self.pid_type = out_dir, first_index, provenance, pid_type
        self.pids: list = []
        self.rows: list[torch.Tensor] = []
        self.inputs: Counter = Counter()
        self.opened = time.monotonic()  # the work a kill would lose started here

    def age(self) -> float:
        """Seconds of work the open shard holds (0 while it has no row)."""
        return time.monotonic() - self.opened if self.pids else 0.0

    def add(self, item: Item, embedding_D: torch.Tensor) -> None:
        self.pids.append(item.pid)
        self.rows.append(embedding_D)
        self.inputs["+".join(item.modalities)] += 1

    def flush(self) -> str | None:
        if not self.pids:
            return None
        emb_BD = torch.stack(self.rows).float().numpy()
        dim = emb_BD.shape[1]
        table = pa.table(
            {
                "pid": pa.array(self.pids, type=self.pid_type),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb_BD.reshape(-1)), dim),
            }
        )
        meta = {**self.provenance, "dim": dim, "rows": len(self.pids), "inputs_used": dict(self.inputs)}
        table = table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(meta).encode()})
        path = self.out_dir / f"part-{self.index:05d}.parquet"
        with atomic_path(path, fsync=True) as tmp:  # a reader sees no shard or the whole shard
            pq.write_table(table, tmp)
        self.index += 1
        self.pids, self.rows, self.inputs = [], [], Counter()
        self.opened = time.monotonic()
        return path.name


def _pid_type(pid) -> pa.DataType:
    return pa.int64() if isinstance(pid, int) else pa.string()


def _encode_batch(encoder: ItemEncoder, batch: list[Item]) -> tuple[list[tuple[Item, torch.Tensor]], list[dict]]:
    """Encode a batch; when it fails, encode item by item so only the unreadable ones are dropped (and reported)."""
    try:
        emb_BD = encoder.encode(batch)
        pairs, problems = list(zip(batch, emb_BD)), []
    except Exception:  # noqa: BLE001 - isolate the bad item below; a genuine bug fails every item and re-raises
        pairs, problems, bugs = [], [], []
        for item in batch:
            try:
                pairs.append((item, encoder.encode([item])[0]))
            except KeyeInputError as err:
                problems.append({"pid": item.pid, "kind": "unreadable", "reason": str(err)})
            except Exception as err:  # noqa: BLE001
                problems.append({"pid": item.pid, "kind": "unreadable", "reason": f"{type(err).__name__}: {err}"})
                bugs.append(err)
        if bugs and len(bugs) == len(batch) and len(batch) > 1:
            raise bugs[0]
    good = []
    for item, emb_D in pairs:
        if torch.isfinite(emb_D).all():
            good.append((item, emb_D))
        else:
            problems.append({"pid": item.pid, "kind": "unreadable", "reason": "embedding is not finite"})
    return good, problems


def export_embeddings(
    catalogue: str | Path,
    encoder: ItemEncoder,
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    shard_size: int = 4096,
    shard_seconds: float = 60.0,
    progress: bool = True,
) -> ExportReport:
    """Encode every item of ``catalogue`` into parquet shards under ``out_dir`` (see module docstring)."""
    if batch_size < 1 or shard_size < 1 or shard_seconds <= 0:
        raise KeyeInputError(
            f"batch_size and shard_size must be >= 1 and shard_seconds > 0, got {batch_size}, {shard_size}, "
            f"{shard_seconds}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp*"):  # a killed run's half-written shard
        stale.unlink()
    provenance = {"encoder": encoder.provenance(), "catalogue": str(catalogue)}
    shards = finished_shards(out)
    done: set = set()
    pid_type = None
    for path in shards.values():
        previous = shard_provenance(path).get("encoder", {})
        if previous.get("config_hash") != provenance["encoder"]["config_hash"]:
            raise KeyeInputError(
                f"{out}: holds embeddings from another encoder configuration ({path.name}: "
                f"{previous.get('config_hash')} vs {provenance['encoder']['config_hash']}); use a new folder"
            )
        table = pq.read_table(path, columns=["pid"])
        pid_type = table.schema.field("pid").type
        done.update(table.column("pid").to_pylist())
    provenance["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    writer = _ShardWriter(out, max(shards, default=-1) + 1, provenance, pid_type)
    report = ExportReport()
    seen: set = set()
    batch: list[Item] = []

    def run_batch() -> None:
        good, problems = _encode_batch(encoder, batch)
        report.problems.extend(problems)
        for item, emb_D in good:
            writer.add(item, emb_D)
            report.written += 1
            if len(writer.pids) >= shard_size:
                report.shards.append(writer.flush())
        if writer.age() >= shard_seconds:
            report.shards.append(writer.flush())
        batch.clear()

    for entry in tqdm(iter_catalogue(catalogue), desc="export", unit="item", disable=not progress, file=sys.stderr):
        if isinstance(entry, BadRow):
            report.problems.append({"pid": entry.pid, "where": entry.where, "kind": "bad row", "reason": entry.reason})
            continue
        if writer.pid_type is None:
            writer.pid_type = _pid_type(entry.pid)
        if _pid_type(entry.pid) != writer.pid_type:
            reason = f"pid type {type(entry.pid).__name__} differs from the export's {writer.pid_type}"
            report.problems.append({"pid": entry.pid, "kind": "bad row", "reason": reason})
            continue
        if entry.pid in seen:
            reason = "pid seen earlier; kept the first"
            report.problems.append({"pid": entry.pid, "kind": "duplicate pid", "reason": reason})
            continue
        seen.add(entry.pid)
        if entry.pid in done:
            report.already_done += 1
            continue
        batch.append(entry)
        if len(batch) >= batch_size:
            run_batch()
    if batch:
        run_batch()
    if (name := writer.flush()) is not None:
        report.shards.append(name)
    if report.problems:
        with problems_path(out).open("a", encoding="utf-8") as f:
            for problem in report.problems:
                f.write(json.dumps({**problem, "run": provenance["started"]}, default=str) + "\n")
    return report
