"""Visual tokenizer components: exact decode, k-means usage, id blocks, gradients, search vs faiss."""

import faiss
import numpy as np
import pytest
import torch

from keye.errors import KeyeInputError
from keye.models.configuration import KeyeVisualTokenizerConfig
from keye.models.visual_tokenizer import (
    KeyeVisualTokenizer,
    codebook_stats,
    code_ids,
    load_visual_tokenizer,
    save_visual_tokenizer,
    split_code_ids,
)

FEATURES = 48


def tiny(num_codebooks=4, codebook_size=64, code_dim=4, seed=0):
    torch.manual_seed(seed)
    config = KeyeVisualTokenizerConfig(num_codebooks=num_codebooks, codebook_size=codebook_size, code_dim=code_dim,
                                       hidden_size=64)
    return KeyeVisualTokenizer(config, FEATURES)


def clustered(clusters=64, per_cluster=24, seed=0):
    """Well-separated Gaussian blobs in feature space: (clusters * per_cluster, FEATURES)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, FEATURES, generator=g) * 4
    return (centres[:, None] + 0.05 * torch.randn(clusters, per_cluster, FEATURES, generator=g)).reshape(-1, FEATURES)


def test_decode_of_indices_reproduces_quantized_features_exactly_in_eval_mode():
    tok = tiny()
    x = clustered()
    tok.kmeans_init(x)
    tok.eval()
    with torch.no_grad():
        out = tok(x)
        assert torch.equal(tok.decode_codes(out.indices), out.quantized)
        assert torch.equal(tok.decode(out.indices), out.reconstruction)
        assert torch.equal(tok.encode(x), out.indices)
    # in training the straight-through output is x + (q - x): equal in value, not necessarily in bits
    tok.train()
    torch.testing.assert_close(tok(x).quantized, tok.decode_codes(out.indices))


def test_kmeans_init_uses_at_least_90_percent_of_every_codebook_on_clustered_data():
    x = clustered(clusters=64)
    tok = tiny(codebook_size=64)
    with torch.no_grad():
        random_usage, _ = codebook_stats(tok.encode(x), 64)
    tok.kmeans_init(x, iters=10)
    with torch.no_grad():
        usage, perplexity = codebook_stats(tok.encode(x), 64)
    assert bool((usage >= 0.9).all()), usage
    assert bool((perplexity > 0.6 * 64).all()), perplexity  # near-uniform use, not a few hot codes
    # the SimVQ default (a random Gaussian table) covers the data far worse: the init is what helps
    assert float(random_usage.mean()) < float(usage.mean()) - 0.2


def test_kmeans_init_needs_at_least_one_vector_per_code():
    with pytest.raises(KeyeInputError, match="at least"):
        tiny(codebook_size=64).kmeans_init(torch.randn(32, FEATURES))


def test_code_id_blocks_never_overlap_and_round_trip():
    vocab, N, K = 2048, 8, 256
    every = torch.arange(K)[:, None].expand(K, N)  # every index of every codebook
    ids = code_ids(every, vocab, K)
    assert int(ids.min()) == vocab and int(ids.max()) == vocab + N * K - 1
    blocks = [set(ids[:, i].tolist()) for i in range(N)]
    assert sum(len(b) for b in blocks) == N * K == len(set().union(*blocks))  # disjoint, and they tile the block
    for i, block in enumerate(blocks):
        assert min(block) == vocab + i * K and max(block) == vocab + (i + 1) * K - 1
    random_idx = torch.randint(0, K, (100, N))
    assert torch.equal(split_code_ids(code_ids(random_idx, vocab, K), vocab, K), random_idx)
    with pytest.raises(KeyeInputError):
        split_code_ids(code_ids(random_idx, vocab, K).flip(-1), vocab, K)  # column i holds another codebook
    with pytest.raises(KeyeInputError):
        code_ids(torch.full((1, N), K), vocab, K)


def test_reconstruction_gradient_reaches_the_encoder_through_the_straight_through_estimator():
    tok = tiny()
    x = clustered()
    tok.kmeans_init(x)
    out = tok(x)
    (1 - torch.cosine_similarity(out.reconstruction, x, dim=-1)).mean().backward()  # no VQ term at all
    for p in tok.encoder.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_codebook_loss_trains_the_simvq_maps_and_commitment_loss_the_encoder():
    tok = tiny()
    x = clustered()
    tok.kmeans_init(x)
    maps = [q.code_transform.weight for q in tok.quantizer.quantizers]
    out = tok(x)
    out.codebook_loss.mean().backward(retain_graph=True)
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in maps)
    assert all(p.grad is None for p in tok.encoder.parameters())
    tok.zero_grad(set_to_none=True)
    out.commitment_loss.mean().backward()
    assert all(w.grad is None for w in maps)
    assert all(p.grad is not None for p in tok.encoder.parameters())
    assert all(not q.frozen_codebook.requires_grad for q in tok.quantizer.quantizers)


def test_nearest_code_search_matches_faiss_exact_l2():
    tok = tiny(num_codebooks=3, codebook_size=64, code_dim=4)
    x = torch.randn(500, FEATURES)
    with torch.no_grad():
        z = torch.nn.functional.normalize(tok.encoder(x).reshape(500, 3, 4), dim=-1)
        ours = tok.encode(x)
        books = tok.quantizer.codebooks()
    for i in range(3):
        index = faiss.IndexFlatL2(4)
        index.add(books[i].numpy().astype(np.float32))
        _, ref = index.search(z[:, i].numpy().astype(np.float32), 1)
        assert (ours[:, i].numpy() == ref[:, 0]).mean() > 0.995  # float ties aside


def test_codebook_stats_closed_form():
    indices = torch.tensor([[0, 1], [0, 1], [1, 1], [2, 1]])  # codebook 0: counts 2,1,1,0; codebook 1: all 1
    usage, perplexity = codebook_stats(indices, codebook_size=4)
    torch.testing.assert_close(usage, torch.tensor([0.75, 0.25]))
    h0 = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
    torch.testing.assert_close(perplexity, torch.tensor([np.exp(h0), 1.0], dtype=torch.float32))


def test_save_load_round_trip(tmp_path):
    tok = tiny()
    x = clustered()
    tok.kmeans_init(x)
    save_visual_tokenizer(tok, tmp_path)
    loaded = load_visual_tokenizer(tmp_path).eval()
    tok.eval()
    assert loaded.config.codebook_size == 64 and loaded.feature_dim == FEATURES
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), tok.encode(x))
        assert torch.equal(loaded(x).reconstruction, tok(x).reconstruction)


def test_training_improves_reconstruction_without_killing_codes_on_diverse_data():
    # SimVQ's point: every code moves through the shared map W, so codes that start in use stay in use
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(512, FEATURES, generator=g)
    x = centres[torch.randint(0, 512, (4096,), generator=g)] + 0.3 * torch.randn(4096, FEATURES, generator=g)
    tok = tiny(codebook_size=64)
    tok.kmeans_init(x)

    def report():
        tok.eval()
        with torch.no_grad():
            out = tok(x)
            cosine = torch.cosine_similarity(out.reconstruction, x, dim=-1).mean()
        tok.train()
        return codebook_stats(out.indices, 64)[0], float(cosine)

    _, cosine_before = report()
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    for _ in range(80):
        batch = x[torch.randint(0, 4096, (512,), generator=g)]
        loss = tok.losses(tok(batch), batch)["total"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    usage, cosine_after = report()
    assert cosine_after > cosine_before + 0.2
    assert bool((usage >= 0.9).all()), usage
