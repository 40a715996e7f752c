"""`keye items tokenize`: recipe loading, every output file, and agreement between them."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from keye.config import load_config
from keye.errors import ConfigError
from keye.cli import main
from keye.items.semantic_ids import ResidualKMeans, SemanticIdConfig

ROOT = Path(__file__).resolve().parents[2]


def run_cli(argv: list[str]) -> int:
    return main(argv)


def test_recipes_load_and_reject_unknown_keys(tmp_path):
    default = load_config(SemanticIdConfig, ROOT / "tokenizers/semantic_ids/default.yaml")
    assert default == SemanticIdConfig()  # the recipe documents the defaults
    ml = load_config(SemanticIdConfig, ROOT / "tokenizers/semantic_ids/movielens.yaml")
    assert (ml.levels, ml.codes, ml.collision) == (3, 64, "reassign")
    with pytest.raises(ConfigError, match="kmeans.itres"):
        load_config(SemanticIdConfig, ROOT / "tokenizers/semantic_ids/default.yaml", ["kmeans.itres=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("levels: 3\nlevles: 2\n")
    with pytest.raises(ConfigError, match="levles"):
        load_config(SemanticIdConfig, bad)
    with pytest.raises(ConfigError, match="collision"):
        load_config(SemanticIdConfig, None, ["collision=random"])


def test_tokenize_writes_consistent_outputs(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=g)
    x[-5:] = x[:5]  # guaranteed collisions for the suffix policy to resolve
    pids = [f"p{i}" for i in range(300)]
    emb = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"pid": pids, "embedding": [row.tolist() for row in x]}), emb)
    out = tmp_path / "sid"
    rc = run_cli(["items", "tokenize", str(emb), str(out), "codes=8", "collision=suffix", "kmeans.iters=10"])
    assert rc == 0 and "collision_rate" in capsys.readouterr().out

    codes = pq.read_table(out / "codes.parquet")
    assert codes.column("pid").to_pylist() == pids
    codes_NM = torch.tensor(codes.column("codes").to_pylist())
    assert codes_NM.shape == (300, 4) and torch.unique(codes_NM, dim=0).shape[0] == 300

    state = load_file(out / "model.safetensors")
    assert sorted(state) == ["centroids.0", "centroids.1", "centroids.2"]
    quantizer = ResidualKMeans.load(out / "model.safetensors")
    assert torch.equal(quantizer.encode(x), codes_NM[:, :3])

    index = json.loads((out / "index.json").read_text())
    c = codes_NM[7].tolist()
    assert index["p7"] == [f"<a_{c[0]}>", f"<b_{c[1]}>", f"<c_{c[2]}>", f"<d_{c[3]}>"]

    sid_map = pq.read_table(out / "sid_to_pids.parquet").to_pylist()
    assert sum(r["count"] for r in sid_map) == 300 and all(r["count"] == len(r["pids"]) for r in sid_map)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["codes"]["collision_rate"] > 0 and metrics["ids"]["collision_rate"] == 0
    recon = quantizer.decode(codes_NM[:, :3])
    assert metrics["ids"]["recon_mse"] == pytest.approx(float(((x - recon).double() ** 2).mean()), rel=1e-5)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["codes"] == 8 and saved["collision"] == "suffix" and saved["kmeans"]["iters"] == 10


def test_tokenize_rejects_duplicate_pids(tmp_path, capsys):
    emb = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"pid": [1, 2, 1], "embedding": np.eye(3).tolist()}), emb)
    assert run_cli(["items", "tokenize", str(emb), str(tmp_path / "o"), "codes=2"]) == 2
    assert "pid 1 appears more than once" in capsys.readouterr().err
