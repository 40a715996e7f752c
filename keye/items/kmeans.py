"""Seeded, deterministic k-means in torch with chunked distances, and a balanced (capacity-bounded) variant.

Written for the semantic-ID tokenizer: 8192 codes x 100k items x 4096 dims must fit on a CPU box, so the
(N, K) distance matrix is never materialised; it is produced ``chunk_rows`` rows at a time.

Algorithm (Lloyd, as in faiss / scikit-learn):
- init: uniform random points (``random``, faiss's rule: O(K D)) or greedy k-means++ (``kmeans++``; Arthur &
  Vassilvitskii 2007, 2 + ln K candidates per step as scikit-learn). k-means++ costs about (2 + ln K) Lloyd
  iterations of work *per centre*: ~18 minutes a level at 8192 codes x 200k items, before the fit starts;
- iterate: assign each point to its nearest centroid, move each centroid to the mean of its points;
- empty clusters are relocated to the points currently farthest from their centroid (scikit-learn's rule);
- stop after ``iters`` iterations or when the relative drop of the inertia falls under ``tol``.

Balanced k-means (``balanced=True``): every cluster holds at most ``ceil(capacity * N / K)`` points, in every
iteration. The assignment step is the nearest centroid followed by a greedy repair: each over-full cluster keeps
its closest points and the rest go, closest first, to their nearest cluster with room (a greedy solution of the
capacity-constrained assignment of Bradley, Bennett & Demiriz 2000, "Constrained k-means clustering"; Malinen &
Fraenti 2014, "Balanced k-means for clustering"). The update step is the plain mean, so each iteration lowers
the inertia among capacity-feasible assignments and the run converges like Lloyd's (``tol`` applies).

Why it matters for semantic IDs: on residual levels, plain k-means puts a few centroids on outliers and leaves one
code with a third of the items (a level that barely splits anything), and the items sharing that code share
their ID. The cap keeps every level's code histogram near uniform (perplexity close to K).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from keye.errors import ConfigError

# Rows per distance block: chunk_rows x K floats, 2^20 floats = 4 MiB per block.
_BLOCK_FLOATS = 1 << 20


@dataclass(frozen=True)
class KMeansResult:
    centroids_KD: torch.Tensor
    assign_N: torch.Tensor  # int64 code of every point under the final centroids
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int


def _chunk_rows(k: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, _BLOCK_FLOATS // max(k, 1))


def _partial_d2(x_BD: torch.Tensor, centroids_KD: torch.Tensor, c_sq_K: torch.Tensor | None = None) -> torch.Tensor:
    """``||c||^2 - 2 x.c`` in one addmm: squared distances less each row's ``||x||^2``, so ordered as they are."""
    c_sq_K = centroids_KD.pow(2).sum(1) if c_sq_K is None else c_sq_K
    return torch.addmm(c_sq_K.unsqueeze(0), x_BD, centroids_KD.T, alpha=-2.0)


def distance_blocks(
    x_ND: torch.Tensor, centroids_KD: torch.Tensor, chunk_rows: int | None = None, x_sq_N: torch.Tensor | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, d2_BK)``: squared distances of a block of points to every centroid, clamped at 0.
    ``x_sq_N``: the points' squared norms, where the caller already has them."""
    step = _chunk_rows(centroids_KD.shape[0], chunk_rows)
    c_sq_K = centroids_KD.pow(2).sum(1)
    for start in range(0, x_ND.shape[0], step):
        rows = slice(start, min(start + step, x_ND.shape[0]))
        x_BD = x_ND[rows]
        d2_BK = _partial_d2(x_BD, centroids_KD, c_sq_K)  # + ||x||^2: float32 cancellation can dip below 0
        x_sq_B = x_BD.pow(2).sum(1) if x_sq_N is None else x_sq_N[rows]
        d2_BK.add_(x_sq_B.unsqueeze(1)).clamp_(min=0)
        yield rows, d2_BK


def nearest(
    x_ND: torch.Tensor, centroids_KD: torch.Tensor, chunk_rows: int | None = None, x_sq_N: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point. Returns ``(assign_N int64, d2_N)``; ``x_sq_N`` as in ``distance_blocks``."""
    assign_N = torch.empty(x_ND.shape[0], dtype=torch.long)
    d2_N = torch.empty(x_ND.shape[0], dtype=x_ND.dtype)
    step = _chunk_rows(centroids_KD.shape[0], chunk_rows)
    c_sq_K = centroids_KD.pow(2).sum(1)
    for start in range(0, x_ND.shape[0], step):
        rows = slice(start, min(start + step, x_ND.shape[0]))
        x_BD = x_ND[rows]
        best_B, idx_B = _partial_d2(x_BD, centroids_KD, c_sq_K).min(1)  # ||x||^2 is the same along a row
        assign_N[rows] = idx_B
        d2_N[rows] = (best_B + (x_BD.pow(2).sum(1) if x_sq_N is None else x_sq_N[rows])).clamp_(min=0)
    return assign_N, d2_N


def _init_random(x_ND: torch.Tensor, k: int, gen: torch.Generator, chunk_rows: int | None) -> torch.Tensor:
    return x_ND[torch.randperm(x_ND.shape[0], generator=gen)[:k]].clone()


def _init_kmeanspp(x_ND: torch.Tensor, k: int, gen: torch.Generator, chunk_rows: int | None) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn): draw 2 + ln(k) candidates with probability proportional to d2,
    keep the one that lowers the total d2 most. Costs about (2 + ln k) Lloyd iterations; use ``random`` for
    very large K x N x D."""
    n = x_ND.shape[0]
    trials = 2 + int(math.log(k))
    x_sq_N = x_ND.pow(2).sum(1)

    def d2_to(idx_T: torch.Tensor) -> torch.Tensor:  # (T,) point indices -> (T, N) squared distances
        return torch.addmm(x_sq_N.unsqueeze(0), x_ND[idx_T], x_ND.T, alpha=-2.0).add_(x_sq_N[idx_T, None]).clamp_(min=0)

    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = torch.randint(n, (1,), generator=gen)
    min_d2_N = d2_to(chosen[:1])[0]
    for j in range(1, k):
        total = float(min_d2_N.sum())
        if total <= 0:  # fewer distinct points than k: any point will do, relocation handles the rest
            cand_T = torch.randint(n, (trials,), generator=gen)
        else:
            cand_T = torch.multinomial(min_d2_N / total, trials, replacement=True, generator=gen)
        d2_TN = torch.minimum(d2_to(cand_T), min_d2_N)
        best = int(d2_TN.sum(1).argmin())
        chosen[j] = cand_T[best]
        min_d2_N = d2_TN[best]
    return x_ND[chosen].clone()


INITS: dict[str, Callable[[torch.Tensor, int, torch.Generator, int | None], torch.Tensor]] = {
    "kmeans++": _init_kmeanspp,
    "random": _init_random,
}


def _update(x_ND: torch.Tensor, assign_N: torch.Tensor, d2_N: torch.Tensor, k: int) -> torch.Tensor:
    """Centroid = mean of its points; empty clusters take the points farthest from their centroid."""
    counts_K = torch.bincount(assign_N, minlength=k)
    sums_KD = torch.zeros(k, x_ND.shape[1], dtype=x_ND.dtype).index_add_(0, assign_N, x_ND)
    centroids_KD = sums_KD / counts_K.clamp(min=1).unsqueeze(1).to(x_ND.dtype)
    empty_E = torch.nonzero(counts_K == 0).squeeze(1)
    if empty_E.numel():
        far_E = torch.topk(d2_N, empty_E.numel()).indices
        centroids_KD[empty_E] = x_ND[far_E]
    return centroids_KD


def capacity_of(n: int, k: int, capacity: float) -> int:
    """Largest cluster size the balanced variant allows: ceil(capacity * N / K)."""
    return max(1, math.ceil(capacity * n / k))


def repair_capacity(
    x_ND: torch.Tensor,
    centroids_KD: torch.Tensor,
    assign_N: torch.Tensor,
    d2_N: torch.Tensor,
    cap: int,
    chunk_rows: int | None = None,
    candidates: int = 16,
    x_sq_N: torch.Tensor | None = None,
    part_NK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move points out of clusters above ``cap`` so that none is; returns the new ``(assign_N, d2_N)``.

    ``d2_N`` is each point's squared distance to its assigned centroid. Each over-full cluster keeps its
    ``cap`` closest points; the others go, closest-first, to their nearest cluster that still has room.
    Requires ``cap * K >= N``.

    The moving points' ``candidates`` nearest clusters are found in one distance pass; a round looks only at
    those, and a point whose candidates have all filled up gets a fresh list. The result is the same as
    searching every cluster in every round, at a fraction of the distance passes.

    ``part_NK``: ``_partial_d2`` of every point and cluster, where the caller has them all (small N x K). Each
    round then searches the waiting points' whole rows, with no lists to select or refresh.
    """
    n, k = x_ND.shape[0], centroids_KD.shape[0]
    if cap * k < n:
        raise ConfigError(f"balanced k-means: capacity {cap} x {k} codes cannot hold {n} points")
    counts_K = torch.bincount(assign_N, minlength=k)
    if int(counts_K.max()) <= cap:
        return assign_N, d2_N
    # rank points inside their cluster by distance (stable sort => deterministic ties)
    order = torch.argsort(d2_N, stable=True)
    order = order[torch.argsort(assign_N[order], stable=True)]
    starts_K = torch.cumsum(counts_K, 0) - counts_K
    rank_in_cluster = torch.empty(n, dtype=torch.long)
    rank_in_cluster[order] = torch.arange(n) - starts_K[assign_N[order]]
    overflow = torch.nonzero(rank_in_cluster >= cap).squeeze(1)
    load_K = counts_K.clamp(max=cap)
    assign_N, d2_N = assign_N.clone(), d2_N.clone()

    def nearest_with_room(points: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``m`` nearest clusters with room of each point, nearest first: ``(d2_PM, cluster_PM)``."""
        d2_PM = torch.empty(points.numel(), m, dtype=d2_N.dtype)
        cluster_PM = torch.empty(points.numel(), m, dtype=torch.long)
        full_K = load_K >= cap
        x_sq_P = None if x_sq_N is None else x_sq_N[points]  # None: distance_blocks squares these points only
        for rows, d2_BK in distance_blocks(x_ND[points], centroids_KD, chunk_rows, x_sq_P):
            d2_PM[rows], cluster_PM[rows] = d2_BK.masked_fill_(full_K, float("inf")).topk(m, 1, largest=False)
        return d2_PM, cluster_PM

    m = min(candidates, k)
    if part_NK is None:
        cand_d2_OM, cand_OM = nearest_with_room(overflow, m)
    else:  # whole rows: column j is cluster j, so there is never a list to refresh
        x_sq_O = x_ND[overflow].pow(2).sum(1) if x_sq_N is None else x_sq_N[overflow]
        cand_d2_OM, cand_OM = part_NK[overflow].add_(x_sq_O.unsqueeze(1)).clamp_(min=0), None
    while overflow.numel():
        # each point's nearest candidate that still has room; a full one is skipped, never a nearer free one
        full_OM = load_K >= cap if cand_OM is None else load_K[cand_OM] >= cap
        best_d2_O, j_O = cand_d2_OM.masked_fill(full_OM, float("inf")).min(1)
        if cand_OM is None:
            best_O = j_O
        else:
            best_O = cand_OM.gather(1, j_O.unsqueeze(1)).squeeze(1)
            spent = torch.nonzero(torch.isinf(best_d2_O)).squeeze(1)
            if spent.numel():  # every candidate filled up: a fresh list among the clusters with room now
                cand_d2_OM[spent], cand_OM[spent] = nearest_with_room(overflow[spent], m)
                best_d2_O[spent], best_O[spent] = cand_d2_OM[spent, 0], cand_OM[spent, 0]
        # closest-first inside each target cluster; only as many as it has room for
        by_dist = torch.argsort(best_d2_O, stable=True)
        by_target = by_dist[torch.argsort(best_O[by_dist], stable=True)]
        tgt = best_O[by_target]
        tcounts_K = torch.bincount(tgt, minlength=k)
        tstarts_K = torch.cumsum(tcounts_K, 0) - tcounts_K
        rank = torch.arange(tgt.numel()) - tstarts_K[tgt]
        accepted = rank < (cap - load_K)[tgt]
        moved = overflow[by_target[accepted]]
        assign_N[moved] = tgt[accepted]
        d2_N[moved] = best_d2_O[by_target[accepted]]
        load_K += torch.bincount(tgt[accepted], minlength=k)
        waiting = by_target[~accepted]
        overflow, cand_d2_OM = overflow[waiting], cand_d2_OM[waiting]
        cand_OM = None if cand_OM is None else cand_OM[waiting]
    return assign_N, d2_N


def kmeans(
    x_ND: torch.Tensor,
    k: int,
    *,
    iters: int = 25,
    init: str = "kmeans++",
    seed: int = 0,
    tol: float = 1e-4,
    balanced: bool = False,
    capacity: float = 1.0,
    chunk_rows: int | None = None,
) -> KMeansResult:
    """Cluster ``x_ND`` (N, D) float32 into ``k`` centroids; same inputs and seed give the same result.

    Balanced runs return the capacity-bounded assignment and, as centroids, the means of its clusters.
    """
    n = x_ND.shape[0]
    if n < k:
        raise ConfigError(f"k-means: {k} codes need at least {k} points, got {n} (lower `codes`)")
    if init not in INITS:
        raise ConfigError(f"k-means: unknown init {init!r} (known: {', '.join(INITS)})")
    x_ND = x_ND.float().contiguous()
    gen = torch.Generator().manual_seed(seed)
    centroids_KD = INITS[init](x_ND, k, gen, chunk_rows)
    cap = capacity_of(n, k, capacity) if balanced else None
    x_sq_N = x_ND.pow(2).sum(1)  # once: every assignment needs them

    # a balanced assignment of a small set keeps the whole (N, K) block for the repair's searches
    whole = cap is not None and _chunk_rows(k, chunk_rows) >= n

    def assign(c_KD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cap is None:
            return nearest(x_ND, c_KD, chunk_rows, x_sq_N)
        if whole:
            part_NK = _partial_d2(x_ND, c_KD)
            best_N, a_N = part_NK.min(1)
            return repair_capacity(x_ND, c_KD, a_N, best_N.add_(x_sq_N).clamp_(min=0), cap, x_sq_N=x_sq_N,
                                   part_NK=part_NK)
        a_N, d2_N = nearest(x_ND, c_KD, chunk_rows, x_sq_N)
        return repair_capacity(x_ND, c_KD, a_N, d2_N, cap, chunk_rows, x_sq_N=x_sq_N)

    prev = math.inf
    it = 0
    for it in range(1, iters + 1):
        assign_N, d2_N = assign(centroids_KD)
        centroids_KD = _update(x_ND, assign_N, d2_N, k)
        inertia = float(d2_N.sum(dtype=torch.float64))
        if prev < math.inf and (prev - inertia) <= tol * prev:
            break
        prev = inertia
    assign_N, d2_N = assign(centroids_KD)
    if balanced:
        # the assignment is fixed by the capacity, so the best centroids for it are its means
        centroids_KD = _update(x_ND, assign_N, d2_N, k)
        d2_N = (x_ND - centroids_KD[assign_N]).pow(2).sum(1)
    return KMeansResult(centroids_KD, assign_N, float(d2_N.sum(dtype=torch.float64)), it)
