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
    assert index["7"] == [f"<a_{c[0]}>", f"<b_{c[1]}>", f"<c_{c[2]}>", f"<d_{c[3]}>"]

    sid_map = pq.read_table(out / "sid_to_pids.parquet").to_pylist()
    assert sum(r["count"] for r in sid_map) == 300 and all(r["count"] == len(r["pids"]) for r in sid_map)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["codes"]["collision_rate"] > 0 and metrics["ids"]["collision_rate"] == 0
    assert len(metrics["codes"]["perplexity"]) == 3 and len(metrics["ids"]["largest_code_share"]) == 4
    recon = quantizer.decode(codes_NM[:, :3])
    assert metrics["ids"]["recon_mse"] == pytest.approx(float(((x - recon).double() ** 2).mean()), rel=1e-5)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["codes"] == 8 and saved["collision"] == "suffix" and saved["kmeans"]["iters"] == 10


def test_tokenize_rejects_duplicate_pids(tmp_path, capsys):
    emb = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"pid": [1, 2, 1], "embedding": np.eye(3).tolist()}), emb)
    assert run_cli(["items", "tokenize", str(emb), str(tmp_path / "o"), "codes=2"]) == 2
    assert "pid 1 appears more than once" in capsys.readouterr().err


@pytest.fixture
def tokenized(tmp_path):
    """Int pids that are not LC-Rec's dense ids (1-based, gaps), codes without a suffix level."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    x[-4:] = x[:4]  # collisions kept by the 'none' policy
    pids = [10 * i + 1 for i in range(200)]
    emb = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"pid": pids, "embedding": [row.tolist() for row in x]}), emb)
    out = tmp_path / "sid"
    assert run_cli(["items", "tokenize", str(emb), str(out), "codes=8", "kmeans.iters=5"]) == 0
    codes = torch.tensor(pq.read_table(out / "codes.parquet").column("codes").to_pylist())
    return out, pids, x, codes


def test_openonerec_reads_pid2sid_as_its_data_scripts_do(tokenized):
    import pandas as pd

    out, pids, x, codes = tokenized
    # OpenOneRec data/onerec_data/pretrain/video_rec.py, verbatim in substance
    sid_format = "<|sid_begin|><s_a_{c0}><s_b_{c1}><s_c_{c2}><|sid_end|>"
    df_pid2sid = pd.read_parquet(out / "pid2sid.parquet")
    pid2sid = dict(zip(df_pid2sid["pid"], df_pid2sid["sid"]))
    assert len(pid2sid) == 200
    for i in (0, 17, 199):
        code = pid2sid[pids[i]]
        c = codes[i].tolist()
        expected = f"<|sid_begin|><s_a_{c[0]}><s_b_{c[1]}><s_c_{c[2]}><|sid_end|>"
        assert sid_format.format(c0=code[0], c1=code[1], c2=code[2]) == expected
    # and its tokenizer re-encodes the catalogue to the same codes from the saved state dict
    quantizer = ResidualKMeans.load(out / "model.safetensors")
    assert torch.equal(quantizer.encode(x), codes)


def test_lcrec_reads_index_json_by_its_dense_item_ids(tokenized):
    out, pids, _, codes = tokenized
    # LC-Rec data.py: indices = json.load(open(f"{dataset}.index.json")); an item i of its inter.json is
    # "".join(indices[str(i)]); item ids are dense 0-based ints, mapped from the raw ids by {dataset}.item2id
    indices = json.loads((out / "index.json").read_text())
    item2id = dict(line.split("\t") for line in (out / "item2id").read_text().splitlines())
    assert sorted(int(v) for v in item2id.values()) == list(range(200))
    for i in (0, 5, 199):
        item = int(item2id[str(pids[i])])
        c = codes[i].tolist()
        assert "".join(indices[str(item)]) == f"<a_{c[0]}><b_{c[1]}><c_{c[2]}>"


def test_tokenize_refuses_non_finite_embeddings_naming_the_pid(tmp_path, capsys):
    rows = np.eye(4).tolist()
    rows[2][1] = float("nan")
    emb = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"pid": ["a", "b", "c", "d"], "embedding": rows}), emb)
    assert run_cli(["items", "tokenize", str(emb), str(tmp_path / "o"), "codes=2"]) == 2
    err = capsys.readouterr().err
    assert "1 embedding(s) hold NaN or inf: pid 'c'" in err
    assert not (tmp_path / "o" / "codes.parquet").exists()
