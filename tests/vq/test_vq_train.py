"""The vq stage alone (`keye train tokenizers/visual/...`) end to end on two tiny clips: loss falls, the
report is honest, the files load."""

import json

import torch
import yaml

from keye.cli import main
from keye.models import build_model
from keye.models.visual_tokenizer import codebook_stats, load_visual_tokenizer
from keye.train.stages.vq import frame_features, video_paths, vision_tower
from keye.video import VideoOptions
from keye.video.synthetic import write_cut_clip


def test_keye_vq_train_trains_reports_and_saves(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for seed in range(2):
        write_cut_clip(videos / f"clip{seed}.mp4", num_frames=8, height=112, width=112, cuts=(3, 6), seed=seed)
    recipe = tmp_path / "vq.yaml"
    video = {"fps": 2.0, "max_frames": 8, "max_pixels": 12544}
    recipe.write_text(yaml.safe_dump({
        "stage": "vq",
        "model": "keye-nano",
        "discrete_model": False,
        "tokenizer": {"codebook_size": 32, "hidden_size": 64},
        "data": {"videos": ["../videos"]},  # relative to the run folder
        "video": video,
        "kmeans_iters": 5,
        "run": {"steps": 40, "micro_batch": 4, "log_every": 1, "optim": {"lr": 3e-3}},
    }))
    assert main(["train", str(recipe), "--run-root", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "vq" / "tokenizer"
    assert not (tmp_path / "run" / "vq" / "model").exists()  # discrete_model: false, the tokenizer alone

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
    # the stage seeds with run.seed before building the variant, so its random ViT is rebuilt exactly here
    torch.manual_seed(0)
    visual, merge, feature_dim, _ = vision_tower(build_model("keye-nano"))
    assert feature_dim == tokenizer.feature_dim
    feats = torch.cat(frame_features(visual, merge, video_paths([str(videos)]), VideoOptions(**video)))
    assert feats.shape[0] == final["tokens"]
    with torch.no_grad():
        usage, perplexity = codebook_stats(tokenizer.encode(feats), 32)
        cosine = torch.cosine_similarity(tokenizer(feats).reconstruction, feats, dim=-1).mean()
    assert [round(float(u), 4) for u in usage] == final["usage"]
    assert abs(float(cosine) - final["recon_cosine"]) < 1e-5


def test_dead_code_restarts_bring_unused_codes_back():
    """Codes pushed where no latent lies are never picked; with restarts on they are moved onto latents
    of the batch (exactly: W C = z) and the held-out features use more codes than without restarts."""
    import torch.nn.functional as F

    from keye.models.configuration import KeyeVisualTokenizerConfig
    from keye.models.visual_tokenizer import KeyeVisualTokenizer
    from keye.train.optim import OptimConfig
    from keye.train.runner import RunConfig, train
    from keye.train.stages.vq import _Trainee, collate_features, vq_loss

    def trained(restart_below, tmp):
        torch.manual_seed(0)
        centres = F.normalize(torch.randn(32, 24), dim=-1)
        features = centres[torch.randint(0, 32, (4096,))] + 0.05 * torch.randn(4096, 24)
        tok = KeyeVisualTokenizer(KeyeVisualTokenizerConfig(num_codebooks=2, codebook_size=16, code_dim=4, hidden_size=32), 24)
        tok.kmeans_init(features)
        with torch.no_grad():  # half of each codebook far from every latent: dead from the start
            for q in tok.quantizer.quantizers:
                q.frozen_codebook[8:] = -q.frozen_codebook[:8].mean(0) * 100
        used_before = codebook_stats(tok.encode(features), 16)[0]
        trainee = _Trainee(tok, restart_below)
        cfg = RunConfig(steps=40, micro_batch=64, save_every=0, optim=OptimConfig(lr=1e-3, warmup_steps=0))
        train(trainee, list(features.split(4)), collate_features, vq_loss, lambda b: b.shape[0], cfg, tmp)
        return used_before, codebook_stats(tok.encode(features), 16)[0], tok

    import tempfile
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        before, without, _ = trained(0.0, a)
        _, with_restarts, tok = trained(0.5, b)
    # the 8 pushed-away codes are one point: at most one of them is ever nearest
    assert (before <= 9 / 16).all() and (without <= 9 / 16).all()
    assert (with_restarts == 1).all()

    z = F.normalize(torch.randn(3, 4), dim=-1)
    tok.quantizer.restart_codes(1, torch.tensor([0, 5, 9]), z)
    torch.testing.assert_close(tok.quantizer.codebooks()[1][[0, 5, 9]], z, atol=1e-5, rtol=1e-5)


def test_frame_features_show_a_frame_difference_tower_the_frame_before(tmp_path):
    """A tower with ``frame_difference`` gets each frame beside the one before, as the model's forward gives
    it: the clip's first frame reads as it does alone, a later one as it does beside its own predecessor."""
    from keye.models.vision import enable_frame_difference
    from keye.models.visual_tokenizer import merged_vit_features
    from keye.processing import patchify
    from keye.video import read_video

    path = tmp_path / "clip.mp4"
    write_cut_clip(path, num_frames=6, height=56, width=56, cuts=(3,), seed=0)
    video = VideoOptions(fps=2.0, max_pixels=3136, min_pixels=3136, slow_fast=False)
    torch.manual_seed(0)
    model = build_model("keye-nano")
    enable_frame_difference(model.visual)
    torch.nn.init.normal_(model.visual.vision_model.embeddings.difference_embedding.weight, std=0.05)
    visual, merge, _, _ = vision_tower(model)
    feats = frame_features(visual, merge, [path], video)
    frames = [patchify(f) for f in read_video(str(path), slow_fast=False, **video.message()).frames]
    assert len(feats) == len(frames) >= 3
    for k in (0, 2):
        patches, grid = frames[k]
        before = frames[k - 1][0] if k else patches
        with torch.no_grad():
            expected = merged_vit_features(visual, patches, torch.tensor([grid]), merge, before)
            stills = merged_vit_features(visual, patches, torch.tensor([grid]), merge)
        torch.testing.assert_close(feats[k], expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(feats[k], stills, atol=1e-5) == (k == 0)
