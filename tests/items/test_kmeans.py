"""k-means: determinism, chunking, empty clusters, balance, and quality against scikit-learn."""

import math

import numpy as np
import pytest
import torch

from keye.errors import ConfigError
from keye.items import kmeans as km


def blobs(n_per: int, centers: int, dim: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c_CD = torch.randn(centers, dim, generator=g) * 10
    labels_N = torch.arange(centers).repeat_interleave(n_per)
    return c_CD[labels_N] + spread * torch.randn(len(labels_N), dim, generator=g), labels_N


def test_same_seed_same_result_other_seed_differs():
    x, _ = blobs(40, 12, 8, 3.0)
    a = km.kmeans(x, 10, seed=3, iters=10)
    b = km.kmeans(x, 10, seed=3, iters=10)
    c = km.kmeans(x, 10, seed=4, iters=10)
    assert torch.equal(a.centroids_KD, b.centroids_KD) and torch.equal(a.assign_N, b.assign_N)
    assert not torch.equal(a.centroids_KD, c.centroids_KD)


def test_chunked_nearest_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(301, 7, generator=g), torch.randn(13, 7, generator=g)
    assign, d2 = km.nearest(x, c, chunk_rows=17)
    ref = torch.cdist(x.double(), c.double()).pow(2)
    assert torch.equal(assign, ref.argmin(1))
    torch.testing.assert_close(d2.double(), ref.min(1).values, rtol=1e-4, atol=1e-4)


def test_recovers_separated_clusters():
    x, labels = blobs(30, 6, 5, 0.5)
    result = km.kmeans(x, 6, seed=0)
    # a perfect clustering is a bijection between found codes and true labels
    pairs = set(zip(result.assign_N.tolist(), labels.tolist()))
    assert len(pairs) == 6


def test_empty_cluster_moves_to_farthest_point():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [9.0, 9.0]])
    assign = torch.tensor([0, 0, 1, 1])
    d2 = torch.tensor([0.0, 0.01, 8.0, 8.0 + 1.0])
    centroids = km._update(x, assign, d2, 3)
    torch.testing.assert_close(centroids[0], torch.tensor([0.05, 0.0]))
    torch.testing.assert_close(centroids[2], x[3])  # code 2 had no points: it takes the farthest one


def test_inertia_close_to_sklearn():
    from sklearn.cluster import KMeans

    x, _ = blobs(40, 30, 16, 4.0, seed=1)
    ours = km.kmeans(x, 16, seed=0, iters=50, tol=0.0)
    ref = KMeans(16, n_init=1, max_iter=50, random_state=0).fit(x.numpy())
    assert ours.inertia <= 1.02 * ref.inertia_


def test_balanced_respects_capacity_where_plain_does_not():
    g = torch.Generator().manual_seed(0)
    # one dense blob with most of the points, a few scattered ones
    x = torch.cat([torch.randn(300, 4, generator=g) * 0.1, torch.randn(60, 4, generator=g) * 5])
    k = 12
    cap = km.capacity_of(len(x), k, 1.0)
    plain = km.kmeans(x, k, seed=0)
    balanced = km.kmeans(x, k, seed=0, balanced=True)
    assert torch.bincount(plain.assign_N, minlength=k).max() > cap
    assert torch.bincount(balanced.assign_N, minlength=k).max() <= cap == math.ceil(360 / 12)


def test_balanced_clusters_stay_under_capacity_every_iteration_and_converge():
    x, _ = blobs(50, 4, 6, 1.0, seed=2)  # 4 blobs of 50 points, 10 codes: a cap of 20 must split every blob
    result = km.kmeans(x, 10, seed=0, init="random", balanced=True, iters=50, tol=0.0)
    assert int(torch.bincount(result.assign_N, minlength=10).max()) <= 20
    # the returned centroids are the means of the returned clusters
    for code in range(10):
        torch.testing.assert_close(result.centroids_KD[code], x[result.assign_N == code].mean(0))
    # converged: one more capacity-bounded assignment under these centroids moves nobody
    a, d2 = km.nearest(x, result.centroids_KD)
    again, _ = km.repair_capacity(x, result.centroids_KD, a, d2, 20)
    assert torch.equal(again, result.assign_N)


def test_balanced_kmeans_gives_the_same_clusters_from_whole_distances_and_from_blocks():
    # 200 x 10 fits one distance block, so the repair gets whole rows; 7-row blocks take the candidate lists
    x, _ = blobs(50, 4, 6, 1.0, seed=2)
    whole = km.kmeans(x, 10, seed=0, init="random", balanced=True, iters=50, tol=0.0)
    blocks = km.kmeans(x, 10, seed=0, init="random", balanced=True, iters=50, tol=0.0, chunk_rows=7)
    assert torch.equal(whole.assign_N, blocks.assign_N)
    assert whole.iterations == blocks.iterations > 1
    torch.testing.assert_close(whole.centroids_KD, blocks.centroids_KD)


def test_repair_moves_the_worst_fitting_points_to_their_nearest_cluster_with_room():
    x = torch.tensor([[0.0], [0.1], [0.3], [10.0]])
    c = torch.tensor([[0.0], [10.0]])
    a, d2 = km.nearest(x, c)
    assert a.tolist() == [0, 0, 0, 1]
    moved, d2_moved = km.repair_capacity(x, c, a, d2, 2)
    assert moved.tolist() == [0, 0, 1, 1]  # 0.3 fits cluster 0 worst, so it goes
    torch.testing.assert_close(d2_moved, (x - c[moved]).pow(2).sum(1))


def _repair_reference(x, c, a, d2, cap):
    """The repair as specified, without shortcuts: every round, every waiting point looks at every cluster."""
    k = c.shape[0]
    d2_all = torch.cdist(x.double(), c.double()).pow(2)
    a, d2 = a.clone(), d2.clone()
    load = torch.bincount(a, minlength=k)
    waiting = []
    for code in range(k):
        members = [int(i) for i in torch.nonzero(a == code).squeeze(1)]
        members.sort(key=lambda i: (float(d2[i]), i))
        waiting += members[cap:]
        load[code] = min(int(load[code]), cap)
    while waiting:
        claims = {}
        for i in waiting:
            row = d2_all[i].masked_fill(load >= cap, float("inf"))
            claims.setdefault(int(row.argmin()), []).append((float(row.min()), i))
        waiting = []
        for code, bids in claims.items():
            bids.sort()
            room = cap - int(load[code])
            for _, i in bids[:room]:
                a[i] = code
            load[code] += min(room, len(bids))
            waiting += [i for _, i in bids[room:]]
    return a


@pytest.mark.parametrize("candidates", [1, 3, 16, "whole rows"])
def test_repair_with_few_candidates_equals_searching_every_cluster_every_round(candidates):
    g = torch.Generator().manual_seed(3)
    # a dense core pulls most points into a few clusters, so many rounds and many full candidate lists
    x = torch.cat([torch.randn(400, 8, generator=g) * 0.2, torch.randn(200, 8, generator=g) * 3])
    c = x[torch.randperm(600, generator=g)[:40]]
    a, d2 = km.nearest(x, c)
    cap = km.capacity_of(600, 40, 1.0)
    assert int(torch.bincount(a, minlength=40).max()) > 2 * cap
    if candidates == "whole rows":  # the caller hands over every distance (kmeans() does when N x K is small)
        moved, d2_moved = km.repair_capacity(x, c, a, d2, cap, part_NK=km._partial_d2(x, c))
    else:
        moved, d2_moved = km.repair_capacity(x, c, a, d2, cap, candidates=candidates)
    assert torch.equal(moved, _repair_reference(x, c, a, d2, cap))
    assert int(torch.bincount(moved, minlength=40).max()) <= cap
    torch.testing.assert_close(d2_moved, (x - c[moved]).pow(2).sum(1), rtol=1e-4, atol=1e-4)


def test_more_codes_than_points_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 8 points"):
        km.kmeans(torch.randn(5, 3), 8)
