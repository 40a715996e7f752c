"""The Keye-checkpoint item encoder on a seeded keye-nano: export, fusion across items, unreadable media."""

import json

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from keye.cli import main
from keye.items.export import PROVENANCE_KEY
from keye.items.tokenize import read_embeddings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from keye.models import build_model
    from keye.processing import load_nano_processor

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    build_model("keye-nano").save_pretrained(folder)
    load_nano_processor().tokenizer.save_pretrained(folder)
    return folder


def test_keye_export_through_the_cli(tmp_path, checkpoint):
    from keye.items.encoders import item_text
    from keye.models.modeling import KeyeForConditionalGeneration
    from keye.processing import load_nano_processor
    from keye.video.synthetic import write_cut_clip

    clip = tmp_path / "clip.mp4"
    write_cut_clip(clip, num_frames=12, height=64, width=96, cuts=(5,))
    rows = [
        {"pid": 1, "video": str(clip)},
        {"pid": 2, "title": "a red square", "caption": "moving"},
        {"pid": 3, "video": str(clip), "title": "a red square", "caption": "moving"},
        {"pid": 4, "video": str(tmp_path / "missing.mp4")},
    ]
    catalogue = tmp_path / "cat.jsonl"
    catalogue.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([
        "items", "export", str(catalogue), str(tmp_path / "emb"), "--encoder", "keye", "--checkpoint", str(checkpoint),
        "--fps", "2", "--max-frames", "4", "--max-pixels", "12544", "--quiet", "--batch-size", "4",
    ]) == 0  # fmt: skip
    pids, x = read_embeddings(tmp_path / "emb")
    assert pids == [1, 2, 3] and x.shape == (3, 128)
    problems = [json.loads(line) for line in (tmp_path / "emb.problems.jsonl").read_text().splitlines()]
    assert [(p["pid"], p["kind"]) for p in problems] == [(4, "unreadable")] and "not found" in problems[0]["reason"]
    # mean fusion: the video+text item is the normalised sum of the video-only and text-only items
    torch.testing.assert_close(x[2], F.normalize(x[0] + x[1], dim=0), atol=1e-5, rtol=1e-5)
    # text-only embedding is the model's own encode_text on the processor's ids
    model = KeyeForConditionalGeneration.from_pretrained(checkpoint, use_safetensors=True).eval()
    from keye.items.catalogue import item_from_record

    ids = load_nano_processor()(text=[item_text(item_from_record(rows[1]))])
    ref = model.encode_text(ids["input_ids"], ids["attention_mask"], normalize=True)[0]
    torch.testing.assert_close(x[1], ref, atol=1e-5, rtol=1e-5)
    meta = json.loads(pq.read_schema(tmp_path / "emb" / "part-00000.parquet").metadata[PROVENANCE_KEY])
    assert meta["encoder"]["encoder"] == "keye" and meta["inputs_used"] == {"video": 1, "text": 1, "video+text": 1}


def test_vit_pooling_is_the_vision_encoders_mean_over_each_items_patches(tmp_path, checkpoint):
    from keye.models.modeling import KeyeForConditionalGeneration
    from keye.video.synthetic import write_cut_clip

    clips = []
    for i, size in enumerate([(64, 96), (96, 64)]):  # two items with different patch counts
        clips.append(tmp_path / f"clip{i}.mp4")
        write_cut_clip(clips[-1], num_frames=8, height=size[0], width=size[1], cuts=(4,))
    catalogue = tmp_path / "cat.jsonl"
    catalogue.write_text("".join(json.dumps({"pid": i, "video": str(c)}) + "\n" for i, c in enumerate(clips)))
    flags = ["--encoder", "keye", "--checkpoint", str(checkpoint), "--fps", "2", "--max-frames", "4",
             "--max-pixels", "12544", "--quiet", "--batch-size", "2"]  # fmt: skip
    assert main(["items", "export", str(catalogue), str(tmp_path / "vit"), *flags, "--vision-pooling", "vit"]) == 0
    assert main(["items", "export", str(catalogue), str(tmp_path / "dec"), *flags]) == 0
    _, vit = read_embeddings(tmp_path / "vit")
    _, dec = read_embeddings(tmp_path / "dec")
    model = KeyeForConditionalGeneration.from_pretrained(checkpoint, use_safetensors=True).eval()
    assert vit.shape == (2, model.config.vision_config.hidden_size) and dec.shape == (2, 128)
    # reference: the ViT alone on each clip's frames, one item at a time, mean over every patch
    from keye.items.catalogue import Item
    from keye.items.encoders import _media_messages
    from keye.processing import load_nano_processor
    from keye.video import process_vision_info

    processor = load_nano_processor()
    for i, clip in enumerate(clips):
        messages = _media_messages([Item(i, video=str(clip))], "video", {"fps": 2, "max_frames": 4, "max_pixels": 12544})
        inputs = processor(text=[processor.apply_chat_template(messages[0])], vision=process_vision_info(messages))
        with torch.no_grad():
            patches = model.visual(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        torch.testing.assert_close(vit[i], F.normalize(patches.mean(0), dim=0), atol=1e-5, rtol=1e-5)
    meta = json.loads(pq.read_schema(tmp_path / "vit" / "part-00000.parquet").metadata[PROVENANCE_KEY])
    assert meta["encoder"]["vision_pooling"] == "vit"
