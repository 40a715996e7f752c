"""`keye vq train` end to end on two tiny clips: loss falls, the report is honest, the files load."""

import json

import torch
import yaml

from keye.cli import main
from keye.models.visual_tokenizer import codebook_stats, load_visual_tokenizer
from keye.train.vq import VQDataConfig, frame_features, load_vision_tower, video_paths
from keye.video.synthetic import write_cut_clip


def test_keye_vq_train_trains_reports_and_saves(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for seed in range(2):
        write_cut_clip(videos / f"clip{seed}.mp4", num_frames=8, height=112, width=112, cuts=(3, 6), seed=seed)
    recipe = tmp_path / "vq.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": "keye-nano",
        "tokenizer": {"codebook_size": 32, "hidden_size": 64},
        "data": {"videos": [str(videos)], "video_options": {"fps": 2.0, "max_frames": 8, "max_pixels": 12544}},
        "kmeans_iters": 5,
        "run": {"steps": 40, "micro_batch": 4, "log_every": 1, "optim": {"lr": 3e-3}},
    }))
    out = tmp_path / "run"
    assert main(["vq", "train", "--config", str(recipe), "--out", str(out)]) == 0

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = steps[0], steps[-1]
    assert last["loss"] < 0.8 * first["loss"]
    assert last["recon_cosine"] > first["recon_cosine"]

    report = json.loads((out / "vq_report.json").read_text())
    final = report["final"]
    assert len(final["usage"]) == len(final["perplexity"]) == 8
    assert final["recon_cosine"] > report["after_kmeans_init"]["recon_cosine"]

    # the saved tokenizer reproduces the report from the same frames
    tokenizer = load_visual_tokenizer(out).eval()
    assert tokenizer.config.codebook_size == 32 and tokenizer.config.num_codebooks == 8
    # run() seeds with run.seed before building the variant, so its random ViT is rebuilt exactly here
    data = VQDataConfig(videos=[str(videos)], video_options={"fps": 2.0, "max_frames": 8, "max_pixels": 12544})
    torch.manual_seed(0)
    visual, merge, feature_dim, _ = load_vision_tower("keye-nano")
    assert feature_dim == tokenizer.feature_dim
    feats = torch.cat(frame_features(visual, merge, video_paths(data.videos), data))
    assert feats.shape[0] == final["tokens"]
    with torch.no_grad():
        usage, perplexity = codebook_stats(tokenizer.encode(feats), 32)
        cosine = torch.cosine_similarity(tokenizer(feats).reconstruction, feats, dim=-1).mean()
    assert [round(float(u), 4) for u in usage] == final["usage"]
    assert abs(float(cosine) - final["recon_cosine"]) < 1e-5
