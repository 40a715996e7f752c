"""Residual k-means semantic IDs: determinism, decode, save/load, collision policies, metric definitions."""

import math

import pytest
import torch

from keye.items.collisions import apply_collision_policy, sid_groups
from keye.items.metrics import code_usage_metrics, collision_metrics, reconstruction_metrics
from keye.items.semantic_ids import KMeansConfig, ResidualKMeans, SemanticIdConfig


def embeddings(n=400, d=12, seed=0, duplicates=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if duplicates:  # exact copies collide at every level whatever the centroids
        x[-duplicates:] = x[:duplicates]
    return x


def config(**kw):
    return SemanticIdConfig(**{"levels": 3, "codes": 8, "kmeans": KMeansConfig(iters=15), **kw})


def grid_items(k: int = 4, levels: int = 3, per_id: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Items at known semantic IDs: x = sum_l scale_l * u_l[code_l], scales 100, 10, 1 (+ tiny noise).

    Every one of the k ** levels IDs holds ``per_id`` items; the right tokenizer gives them exactly those IDs
    (up to a relabelling per level): no collision between different IDs and every level used uniformly."""
    g = torch.Generator().manual_seed(seed)
    books = [torch.randn(k, 16, generator=g) * 10.0 ** (levels - 1 - l) for l in range(levels)]
    ids = torch.cartesian_prod(*[torch.arange(k)] * levels).repeat_interleave(per_id, 0)
    x = sum(books[l][ids[:, l]] for l in range(levels)) + 1e-3 * torch.randn(len(ids), 16, generator=g)
    return x, ids


def test_fit_is_deterministic():
    x = embeddings()
    q1, c1 = ResidualKMeans.fit(x, config(seed=5))
    q2, c2 = ResidualKMeans.fit(x, config(seed=5))
    assert torch.equal(c1, c2)
    assert all(torch.equal(a, b) for a, b in zip(q1.centroids, q2.centroids))


def test_decode_is_the_sum_of_centroids_and_encode_reproduces_fit_codes():
    x = embeddings()
    q, codes = ResidualKMeans.fit(x, config())
    state = q.state_dict()
    assert sorted(state) == ["centroids.0", "centroids.1", "centroids.2"]
    i = 17
    manual = sum(state[f"centroids.{l}"][codes[i, l]] for l in range(3))
    torch.testing.assert_close(q.decode(codes)[i], manual)
    assert torch.equal(q.encode(x), codes)
    # every level removes error: the residual energy falls level by level
    errs = [float((x - q.decode(codes[:, :l])).pow(2).sum()) for l in range(4)]
    assert errs == sorted(errs, reverse=True) and errs[3] < errs[0]


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    x = embeddings()
    q, codes = ResidualKMeans.fit(x, config())
    path = q.save(tmp_path / "model.safetensors")
    assert {k: v.shape for k, v in load_file(path).items()} == {f"centroids.{l}": (8, 12) for l in range(3)}
    assert torch.equal(ResidualKMeans.load(path).encode(x), codes)


def test_policy_none_keeps_collisions_and_maps_every_pid():
    x = embeddings(duplicates=20)
    q, codes = ResidualKMeans.fit(x, config())
    ids = apply_collision_policy("none", codes, x, q)
    assert torch.equal(ids.codes_NM, codes)
    groups = sid_groups(ids.codes_NM, list(range(len(x))))
    assert sum(len(p) for _, p in groups) == len(x)
    assert max(len(p) for _, p in groups) >= 2  # the duplicates share an ID
    assert collision_metrics(ids.codes_NM)["collision_rate"] > 0


def test_policy_suffix_makes_ids_unique_with_one_more_level():
    x = embeddings(duplicates=20)
    q, codes = ResidualKMeans.fit(x, config())
    ids = apply_collision_policy("suffix", codes, x, q)
    assert ids.codes_NM.shape == (len(x), 4)
    assert torch.unique(ids.codes_NM, dim=0).shape[0] == len(x)
    assert torch.equal(ids.codes_NM[:, :3], codes)
    largest = int(torch.unique(codes, dim=0, return_counts=True)[1].max())
    assert ids.codebook_sizes == [8, 8, 8, largest] and int(ids.codes_NM[:, 3].max()) == largest - 1


def test_policy_reassign_is_unique_keeps_prefixes_and_the_best_fitting_item():
    x = embeddings(n=300, duplicates=10)
    q, codes = ResidualKMeans.fit(x, config(codes=16))
    # precondition of the promise: no (L-1)-prefix holds more than K items
    assert int(torch.unique(codes[:, :2], dim=0, return_counts=True)[1].max()) <= 16
    ids = apply_collision_policy("reassign", codes, x, q)
    assert ids.unresolved == 0
    assert ids.codes_NM.shape == codes.shape
    assert torch.unique(ids.codes_NM, dim=0).shape[0] == len(x)
    assert torch.equal(ids.codes_NM[:, :2], codes[:, :2])
    changed = (ids.codes_NM[:, 2] != codes[:, 2]).nonzero().squeeze(1)
    assert changed.numel() > 0
    for i in changed.tolist():  # a moved item shared its ID with an item that stayed
        same = (codes == codes[i]).all(1) & (ids.codes_NM[:, 2] == codes[i, 2])
        assert int(same.sum()) == 1


def test_policy_reassign_counts_what_it_cannot_separate():
    x = embeddings(n=40)
    x[:30] = x[0]  # 30 identical items share every prefix, and only 4 last-level codes exist
    q, codes = ResidualKMeans.fit(x, config(codes=4, levels=2))
    ids = apply_collision_policy("reassign", codes, x, q)
    prefix = (ids.codes_NM[:, 0] == ids.codes_NM[0, 0])
    assert torch.unique(ids.codes_NM[prefix, 1]).numel() == 4  # the full bucket uses every last-level code
    assert ids.unresolved >= 30 - 4
    assert len(x) - torch.unique(ids.codes_NM, dim=0).shape[0] == ids.unresolved


def test_default_config_finds_the_known_ids_of_a_clustered_set():
    x, true_ids = grid_items(k=4, levels=3)
    q, codes = ResidualKMeans.fit(x, SemanticIdConfig(levels=3, codes=4))
    assert collision_metrics(codes)["collision_rate"] == 0.0
    usage = code_usage_metrics(codes, [4, 4, 4])
    assert usage["perplexity"] == pytest.approx([4.0, 4.0, 4.0]) and usage["largest_code_share"] == [0.25] * 3
    # the found IDs are the true ones relabelled: same partition of the items at every prefix length
    for l in range(1, 4):
        assert len({(tuple(a), tuple(b)) for a, b in zip(codes[:, :l].tolist(), true_ids[:, :l].tolist())}) == 4**l


def test_balanced_levels_do_not_collapse_where_plain_kmeanspp_does():
    # a skewed catalogue: half the items in one tight clump, the rest spread; 3 levels x 16 codes
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.05 * torch.randn(256, 8, generator=g), 3 * torch.randn(256, 8, generator=g)])
    plain = SemanticIdConfig(levels=3, codes=16, kmeans=KMeansConfig(init="kmeans++", balanced=False, tol=1e-4))
    _, plain_codes = ResidualKMeans.fit(x, plain)
    _, codes = ResidualKMeans.fit(x, SemanticIdConfig(levels=3, codes=16))
    ours, theirs = code_usage_metrics(codes, [16] * 3), code_usage_metrics(plain_codes, [16] * 3)
    assert min(ours["perplexity"]) > 11 and max(theirs["perplexity"]) < 8
    # the previous defaults (k-means++, unbounded) gave the whole clump one ID
    assert collision_metrics(plain_codes)["largest_group"] == 256 and collision_metrics(codes)["largest_group"] < 20
    assert collision_metrics(codes)["collision_rate"] < collision_metrics(plain_codes)["collision_rate"]


def test_fit_codes_are_what_encode_gives_the_same_items():
    # balanced training places the centroids; the written codes must still be the nearest ones, or a consumer
    # that re-encodes the catalogue with the saved centroids (OpenOneRec's infer script) gets other IDs
    x = embeddings(n=500, d=12)
    q, codes = ResidualKMeans.fit(x, config(kmeans=KMeansConfig(balanced=True)))
    assert torch.equal(q.encode(x), codes)


def test_metric_definitions_on_a_hand_made_example():
    codes = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 1]])
    m = collision_metrics(codes)
    assert m["collision_rate"] == pytest.approx(0.25)
    assert m["collided_share"] == pytest.approx(0.5)
    assert m["largest_group"] == 2
    assert m["prefix_collision_rate"] == pytest.approx([0.5, 0.25])
    u = code_usage_metrics(codes, [4, 2])
    assert u["utilisation"] == pytest.approx([0.5, 1.0])
    h0 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert u["entropy_bits"] == pytest.approx([h0, 1.0])
    assert u["entropy_norm"] == pytest.approx([h0 / 2, 1.0])
    assert u["perplexity"] == pytest.approx([2**h0, 2.0])
    assert u["largest_code_share"] == pytest.approx([0.75, 0.5])


def test_reconstruction_metrics_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(50, 6, generator=g), torch.randn(50, 6, generator=g)
    m = reconstruction_metrics(x, r)
    xd, rd = x.double(), r.double()
    assert m["recon_mse"] == pytest.approx(float(((xd - rd) ** 2).mean()))
    assert m["relative_sq_error"] == pytest.approx(float(((xd - rd) ** 2).sum() / (xd**2).sum()))
    rel = ((xd - rd).abs() / (torch.maximum(xd.abs(), rd.abs()) + 1e-4)).mean()
    assert m["rel_loss"] == pytest.approx(float(rel))
