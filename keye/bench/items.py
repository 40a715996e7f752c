"""Residual k-means benchmark: this toolkit against faiss and scikit-learn on the same embeddings, in one run.

    python -m keye.bench items                       # synthetic clustered data, 20k x 64, 3 levels x 256 codes
    python -m keye.bench items --embeddings runs/items/movielens/embeddings --codes 64

Peers (every one trains L levels of K codes greedily on the residual, with the same iteration budget):
- ``keye``: ``keye.items.semantic_ids.ResidualKMeans`` (k-means++ init, Lloyd, tol=0 so all iterations run);
- ``faiss-kmeans``: ``faiss.Kmeans`` per level on the residual (OpenOneRec's ``train_res_kmeans.py`` recipe),
  subsampling disabled;
- ``faiss-rq``: ``faiss.ResidualQuantizer`` with ``train_type = Train_default`` and ``max_beam_size = 1``
  (pinned: the defaults, progressive-dim training and beam 5, change with faiss versions and are not greedy);
- ``sklearn-kmeans`` / ``sklearn-minibatch``: ``KMeans`` (k-means++, n_init=1) / ``MiniBatchKMeans`` per level.

Each peer runs in its own subprocess after a small warm-up fit (imports, thread pools), so its peak memory is
its own: the peak resident set (VmHWM, reset after the warm-up) minus the resident set before the timed run.
MSE is the mean over items and dims of ``(x - decode(codes))^2``.
Prints a table with time and peak memory as ratios to ``keye`` and whether keye's MSE is within 2% of the
best peer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PEERS = ["keye", "faiss-kmeans", "faiss-rq", "sklearn-kmeans", "sklearn-minibatch"]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _residual_levels(x: np.ndarray, levels: int, fit_level) -> np.ndarray:
    """Generic greedy residual training: ``fit_level(residual) -> (centroids_KD, assign_N)``; returns recon."""
    residual = x.copy()
    for _ in range(levels):
        centroids, assign = fit_level(residual)
        residual -= centroids[assign]
    return x - residual


def run_keye(x, levels, k, iters, seed):
    import torch

    from keye.items.semantic_ids import KMeansConfig, ResidualKMeans, SemanticIdConfig

    config = SemanticIdConfig(levels=levels, codes=k, seed=seed, kmeans=KMeansConfig(iters=iters, tol=0.0))
    quantizer, codes = ResidualKMeans.fit(torch.from_numpy(x), config)
    return quantizer.decode(codes).numpy()


def run_faiss_kmeans(x, levels, k, iters, seed):
    import faiss

    def fit(residual):
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=x.shape[0], verbose=False)
        km.train(residual)
        _, assign = km.index.search(residual, 1)
        return km.centroids, assign[:, 0]

    return _residual_levels(x, levels, fit)


def run_faiss_rq(x, levels, k, iters, seed):
    import faiss

    nbits = int(np.log2(k))
    if 2**nbits != k:
        raise SystemExit(f"faiss-rq needs a power-of-two code count, got {k}")
    rq = faiss.ResidualQuantizer(x.shape[1], levels, nbits)
    rq.train_type = faiss.ResidualQuantizer.Train_default
    rq.max_beam_size = 1
    rq.cp.niter = iters
    rq.cp.seed = seed
    rq.cp.max_points_per_centroid = x.shape[0]
    rq.train(x)
    return rq.decode(rq.compute_codes(x))


def run_sklearn_kmeans(x, levels, k, iters, seed):
    from sklearn.cluster import KMeans

    def fit(residual):
        km = KMeans(k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, random_state=seed).fit(residual)
        return km.cluster_centers_.astype(np.float32), km.labels_

    return _residual_levels(x, levels, fit)


def run_sklearn_minibatch(x, levels, k, iters, seed):
    from sklearn.cluster import MiniBatchKMeans

    def fit(residual):
        km = MiniBatchKMeans(k, n_init=1, max_iter=iters, batch_size=4096, random_state=seed).fit(residual)
        return km.cluster_centers_.astype(np.float32), km.predict(residual)

    return _residual_levels(x, levels, fit)


RUNNERS = {
    "keye": run_keye,
    "faiss-kmeans": run_faiss_kmeans,
    "faiss-rq": run_faiss_rq,
    "sklearn-kmeans": run_sklearn_kmeans,
    "sklearn-minibatch": run_sklearn_minibatch,
}


def synthetic(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered, L2-normalised data (a stand-in for item embeddings): 512 Gaussian blobs of varied spread."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(512, d))
    which = rng.integers(0, 512, size=n)
    x = centers[which] + rng.normal(size=(n, d)) * rng.uniform(0.3, 1.0, size=(512, 1))[which]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _child(args) -> None:
    import torch

    import faiss
    from threadpoolctl import threadpool_limits

    # thread counts set in-process: an OMP_NUM_THREADS environment made torch's CPU kernels ~10x slower here
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    threadpool_limits(args.threads)
    x = np.load(args.data, allow_pickle=False)
    run = RUNNERS[args.one]
    run(x[: 2 * args.codes], 1, args.codes, 1, args.seed)  # warm-up: imports, thread pools, allocator
    base_mb = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    start = time.perf_counter()
    recon = run(x, args.levels, args.codes, args.iters, args.seed)
    seconds = time.perf_counter() - start
    peak_mb = _status_mb("VmHWM") - base_mb
    mse = float(np.mean((x.astype(np.float64) - recon) ** 2))
    print(json.dumps({"peer": args.one, "mse": mse, "seconds": seconds, "peak_mb": peak_mb}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", help="parquet file / shard folder (pid, embedding); default synthetic")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    # one thread per peer by default: on a busy 2-core box OpenMP's spin-waiting made 2-thread runs ~10x slower
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--one", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.one:
        _child(args)
        return 0

    if args.embeddings:
        from keye.items.tokenize import read_embeddings

        x = read_embeddings(args.embeddings)[1].numpy()
        source = args.embeddings
    else:
        x = synthetic(args.n, args.dim, args.seed)
        source = f"synthetic {args.n} x {args.dim}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "x.npy"
        np.save(data, x)
        for peer in args.peers.split(","):
            cmd = [sys.executable, "-m", "keye.bench", "items", "--one", peer, "--data", str(data),
                   "--levels", str(args.levels), "--codes", str(args.codes), "--iters", str(args.iters),
                   "--seed", str(args.seed), "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{peer}: failed\n{proc.stderr[-800:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"data: {source} ({x.shape[0]} x {x.shape[1]}); {args.levels} levels x {args.codes} codes, "
          f"{args.iters} iterations, seed {args.seed}, {args.threads} threads")  # fmt: skip
    ours = next((r for r in rows if r["peer"] == "keye"), None)
    header = ["peer", "mse", "mse/keye", "seconds", "keye time x", "peak MB", "keye mem x"]
    print(f"{header[0]:<18} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (11, 9, 8, 12, 8, 11))))
    for r in rows:
        rel = r["mse"] / ours["mse"] if ours else float("nan")
        t_ratio = ours["seconds"] / r["seconds"] if ours else float("nan")
        # under 1 MB the growth of the peak resident set is allocator noise, not a measurement
        m_ratio = f"{ours['peak_mb'] / r['peak_mb']:.2f}" if ours and min(r["peak_mb"], ours["peak_mb"]) >= 1 else "n/a"
        print(f"{r['peer']:<18} {r['mse']:>11.6g} {rel:>9.4f} {r['seconds']:>8.2f} {t_ratio:>12.2f} "
              f"{r['peak_mb']:>8.1f} {m_ratio:>11}")  # fmt: skip
    peers = [r for r in rows if r["peer"] != "keye"]
    if ours and peers:
        best = min(peers, key=lambda r: r["mse"])
        gap = ours["mse"] / best["mse"] - 1
        verdict = "within" if gap <= 0.02 else "NOT within"
        print(f"keye MSE vs best peer ({best['peer']}): {gap:+.2%} -> {verdict} 2%")
    return 0
