"""``python -m keye.bench items``: every peer's figures come from the same definitions; --runs and --threads hold."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keye.bench import items as bench


def test_runs_and_threads_are_honoured_and_figures_are_the_metric_definitions(tmp_path):
    x = bench.structured(600, 16, seed=1)
    emb = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"pid": list(range(len(x))), "embedding": x.tolist()}), emb)
    out = tmp_path / "rows.json"
    args = ["items", "--data", str(emb), "--codes", "8", "--runs", "2", "--threads", "1",
            "--peers", "keye,faiss-loop", "--json", str(out)]  # fmt: skip
    from keye.bench import main

    assert main(args) == 0
    rows = {r["peer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"keye", "faiss-loop"}
    for row in rows.values():
        assert row["runs"] == 2 and row["threads"] == {"torch": 1, "faiss": 1, "blas": 1}
        assert len(row["perplexity"]) == 3 and all(1 <= p <= 8 for p in row["perplexity"])
        assert 0 <= row["collision_rate"] <= row["collided_share"] <= 1 and row["mse"] > 0


def test_code_figures_on_a_hand_made_example():
    x = np.zeros((4, 2), dtype=np.float32)
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 1]])
    recon = np.ones((4, 2))
    fig = bench.code_figures(x, codes, recon, 2)
    assert fig["mse"] == 1.0 and fig["collision_rate"] == pytest.approx(0.25) and fig["collided_share"] == 0.5
    assert fig["largest_code_share"] == [0.75, 0.5] and fig["perplexity"][1] == pytest.approx(2.0)


def test_the_structured_sets_reuploads_are_its_last_rows_and_originals_collide_apart():
    n = 500
    x = bench.structured(n, 16, seed=2)
    kept = bench.originals(n)
    assert kept == 490
    # each planted re-upload sits a hair from an original: far closer than any two originals do
    sim = x[kept:] @ x[:kept].T
    between = x[:kept] @ x[:kept].T
    np.fill_diagonal(between, -1)
    assert sim.max(1).min() > between.max(1).mean()
    codes = np.array([[0, 0], [0, 0], [1, 0], [1, 1], [1, 1]])  # the last row: a re-upload of the fourth
    fig = bench.code_figures(np.zeros((5, 2), np.float32), codes, np.zeros((5, 2)), 2, n_originals=4)
    assert fig["collision_rate"] == pytest.approx(0.4) and fig["collision_rate_originals"] == pytest.approx(0.25)
