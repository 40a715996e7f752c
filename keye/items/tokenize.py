"""From an embeddings parquet (``pid, embedding``) to semantic IDs and every file the ecosystem reads.

``run_tokenize`` writes into ``out_dir`` (the README's "Semantic IDs" section says which consumer reads what):

| file | format | read by |
| --- | --- | --- |
| ``pid2sid.parquet`` | ``pid, sid`` (list<int64>: the final ID, one code per level) | OpenOneRec's data scripts (``--pid2sid``: ``dict(zip(df['pid'], df['sid']))``) |
| ``codes.parquet`` | ``pid, codes`` (list<int32>, fixed length) | OpenOneRec ``infer_res_kmeans.py`` output layout; TIGER (codes + suffix level) |
| ``model.safetensors`` | ``centroids.{l}`` state dict, ``(K, D)`` each | OpenOneRec ``ResKmeans.load_state_dict`` |
| ``index.json`` | ``{"0": ["<a_12>", "<b_5>", "<c_40>"], ...}`` keyed by LC-Rec item id | LC-Rec ``{dataset}.index.json`` |
| ``item2id`` | ``pid<TAB>item id`` lines: LC-Rec's dense 0-based ids, in ``codes.parquet`` row order | LC-Rec ``{dataset}.item2id`` |
| ``sid_to_pids.parquet`` | ``sid, count, pids`` | the OpenOneRec-style sid -> pids map |
| ``metrics.json`` | metrics before / after the collision policy | people (``keye items tokenize`` prints it) |
| ``config.yaml`` | the resolved config | reruns |

OpenOneRec saves its state dict with ``torch.save`` as ``model.pt``; this toolkit writes tensors as safetensors
only, so ``ResKmeans().load_state_dict(safetensors.torch.load_file("model.safetensors"))`` is the way in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from keye.config import save_config
from keye.errors import KeyeInputError
from keye.fileio import atomic_path, atomic_write_text
from keye.items.collisions import SemanticIds, apply_collision_policy, sid_groups
from keye.items.metrics import semantic_id_metrics
from keye.items.semantic_ids import ResidualKMeans, SemanticIdConfig


@dataclass(frozen=True)
class TokenizeResult:
    quantizer: ResidualKMeans
    codes_NL: torch.Tensor  # the quantizer's codes, before the collision policy
    ids: SemanticIds  # after it
    metrics: dict  # {"codes": ..., "ids": ...}


def embedding_files(path: str | Path) -> list[Path]:
    """One parquet file, or every ``*.parquet`` in a folder (an export's shards), sorted by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise KeyeInputError(f"embeddings {path}: folder holds no .parquet files")
        return files
    if not path.is_file():
        raise KeyeInputError(f"embeddings {path}: no such file or folder")
    return [path]


def read_embeddings(path: str | Path) -> tuple[list, torch.Tensor]:
    """Read ``pid, embedding`` rows -> ``(pids, x_ND float32)``; duplicate pids are an error."""
    pids: list = []
    chunks: list[np.ndarray] = []
    for file in embedding_files(path):
        table = pq.read_table(file, columns=["pid", "embedding"])
        pids.extend(table.column("pid").to_pylist())
        emb = table.column("embedding").combine_chunks()
        if pa.types.is_fixed_size_list(emb.type):
            chunks.append(emb.flatten().to_numpy().reshape(len(emb), emb.type.list_size))
        else:
            chunks.append(np.stack(emb.to_numpy(zero_copy_only=False)))
    if not pids:
        raise KeyeInputError(f"embeddings {path}: no rows")
    if len(set(pids)) != len(pids):
        seen, dup = set(), None
        for p in pids:
            if p in seen:
                dup = p
                break
            seen.add(p)
        raise KeyeInputError(f"embeddings {path}: pid {dup!r} appears more than once")
    return pids, torch.from_numpy(np.concatenate(chunks).astype(np.float32, copy=False))


def check_finite(x_ND: torch.Tensor, pids: list | None = None) -> None:
    """Refuse NaN / inf rows, naming the first pids (or row numbers): one such row poisons every centroid."""
    bad = torch.nonzero(~torch.isfinite(x_ND).all(1)).squeeze(1).tolist()
    if bad:
        names = [repr(pids[i]) if pids is not None else f"row {i}" for i in bad[:5]]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise KeyeInputError(
            f"{len(bad)} embedding(s) hold NaN or inf: pid {', '.join(names)}{more}; drop or re-export them"
        )


def tokenize(x_ND: torch.Tensor, config: SemanticIdConfig, pids: list | None = None) -> TokenizeResult:
    """Fit residual k-means on ``x_ND`` (N, D), apply the collision policy, measure both.

    ``pids`` (optional, one per row) name the rows in errors."""
    check_finite(x_ND, pids)
    quantizer, codes_NL = ResidualKMeans.fit(x_ND, config)
    ids = apply_collision_policy(config.collision, codes_NL, x_ND, quantizer)
    levels = quantizer.levels
    metrics = {
        "codes": semantic_id_metrics(x_ND, quantizer.decode(codes_NL), codes_NL, quantizer.codebook_sizes),
        "ids": semantic_id_metrics(
            x_ND, quantizer.decode(ids.codes_NM[:, :levels]), ids.codes_NM, ids.codebook_sizes
        ),
    }
    metrics["ids"]["policy"] = ids.policy
    metrics["ids"]["unresolved"] = ids.unresolved
    return TokenizeResult(quantizer, codes_NL, ids, metrics)


def lcrec_tokens(codes: list[int]) -> list[str]:
    """LC-Rec index tokens: ``<a_12>``, ``<b_5>``, ... one letter per level."""
    return [f"<{chr(ord('a') + level)}_{code}>" for level, code in enumerate(codes)]


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def write_outputs(out_dir: str | Path, pids: list, result: TokenizeResult, config: SemanticIdConfig) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    codes_NM = result.ids.codes_NM.to(torch.int32).numpy()
    m = codes_NM.shape[1]
    codes_col = pa.FixedSizeListArray.from_arrays(pa.array(codes_NM.reshape(-1)), m)
    _write_parquet(pa.table({"pid": pa.array(pids), "codes": codes_col}), out / "codes.parquet")
    result.quantizer.save(out / "model.safetensors", metadata={"collision": config.collision, "seed": config.seed})
    sid_col = pa.array(codes_NM.astype(np.int64).tolist(), type=pa.list_(pa.int64()))
    _write_parquet(pa.table({"pid": pa.array(pids), "sid": sid_col}), out / "pid2sid.parquet")
    # LC-Rec keys its index by its own dense item ids (row i of its embedding matrix is item i), as strings
    codes_list = codes_NM.tolist()
    _write_json({str(i): lcrec_tokens(c) for i, c in enumerate(codes_list)}, out / "index.json")
    atomic_write_text(out / "item2id", "".join(f"{pid}\t{i}\n" for i, pid in enumerate(pids)))
    groups = sid_groups(result.ids.codes_NM, pids)
    sid_table = pa.table(
        {
            "sid": pa.array([g[0] for g in groups], type=pa.list_(pa.int32())),
            "count": pa.array([len(g[1]) for g in groups], type=pa.int32()),
            "pids": pa.array([g[1] for g in groups]),
        }
    )
    _write_parquet(sid_table, out / "sid_to_pids.parquet")
    _write_json({**result.metrics, "codebook_sizes": result.ids.codebook_sizes}, out / "metrics.json")
    save_config(config, out)
    return out


def run_tokenize(embeddings: str | Path, out_dir: str | Path, config: SemanticIdConfig) -> TokenizeResult:
    pids, x_ND = read_embeddings(embeddings)
    result = tokenize(x_ND, config, pids)
    write_outputs(out_dir, pids, result, config)
    return result
