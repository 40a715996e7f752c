"""``frame_difference``: each video frame's patches also see their difference from the frame before, through
a second patch embedding that starts at zero. Turning it on changes no output; trained, it reads each video
on its own (a batch's second video never differences against the first one's last frame), whichever grid
layout the processor wrote, and it survives a save and a load."""

import pytest
import torch

from keye.errors import KeyeInputError
from keye.models.modeling import frames_per_video
from keye.models.vision import enable_frame_difference, previous_frame_pixels
from keye.video.types import FAST, SLOW


def _batch(processor, prompt_factory, clip_factory, **kw):
    # clip 1 ends and clip 2 starts at the same size: only the prompt says where one video stops
    clips = [
        clip_factory([((56, 84), SLOW), ((56, 84), SLOW), ((28, 56), FAST), ((28, 56), FAST), ((56, 84), SLOW)], seed=4),
        clip_factory([((56, 84), SLOW), ((56, 84), SLOW), ((28, 28), FAST)], seed=5),
    ]
    texts = [prompt_factory(processor, "What moves?", "A ball."), prompt_factory(processor, "Count them.", "Two.")]
    return processor(text=texts, videos=clips, return_labels=True, **kw), clips


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_previous_frame_pixels_shift_by_one_frame_inside_each_video():
    g = torch.Generator().manual_seed(0)
    grids = [(1, 2, 2), (1, 2, 2), (1, 1, 2), (1, 2, 2), (1, 2, 2)]
    pixels = torch.randn(sum(h * w for _, h, w in grids), 6, generator=g)
    frames = list(pixels.split([h * w for _, h, w in grids]))
    # videos of 3 and 2 frames: frame 1 follows frame 0; frame 2 changes size; frame 3 starts the second video
    expected = [frames[0], frames[0], frames[2], frames[3], frames[3]]
    assert torch.equal(previous_frame_pixels(pixels, grids, [3, 2]), torch.cat(expected))
    with pytest.raises(KeyeInputError, match="one \\(1, h, w\\) grid row per frame"):
        previous_frame_pixels(pixels, grids, [3, 3])


def test_frame_difference_starts_at_zero_then_reads_each_video_alone(nano, processor, prompt_factory, clip_factory):
    batch, clips = _batch(processor, prompt_factory, clip_factory)
    before = _logits(nano, batch)
    torch.manual_seed(3)
    draw = torch.rand(4)
    torch.manual_seed(3)
    assert enable_frame_difference(nano.visual) and not enable_frame_difference(nano.visual)
    assert torch.equal(torch.rand(4), draw)  # a seeded stage's next draws are untouched
    assert nano.config.vision_config.frame_difference
    assert torch.equal(_logits(nano, batch), before)  # a zero embedding: every output as it was

    torch.manual_seed(1)
    torch.nn.init.normal_(nano.visual.vision_model.embeddings.difference_embedding.weight, std=0.02)
    trained = _logits(nano, batch)
    assert not torch.allclose(trained, before, atol=1e-4)
    per_video = frames_per_video(batch["input_ids"], nano.config, [h * w // 4 for _, h, w in batch["video_grid_thw"].tolist()])
    assert per_video == [len(c.frames) for c in clips]

    # the second sample alone: its first frame has nothing before it, as in the batch
    frames = int(batch["video_grid_thw"][:5].prod(-1).sum())
    alone = {"input_ids": batch["input_ids"][1:], "attention_mask": batch["attention_mask"][1:],
             "pixel_values_videos": batch["pixel_values_videos"][frames:], "video_grid_thw": batch["video_grid_thw"][5:]}
    keep = batch["attention_mask"][1].bool()
    torch.testing.assert_close(_logits(nano, alone)[0, keep], trained[1, keep], rtol=1e-4, atol=1e-4)

    merged, _ = _batch(processor, prompt_factory, clip_factory, merge_frames=True)
    torch.testing.assert_close(_logits(nano, merged), trained, rtol=1e-5, atol=1e-5)

    # the item side's ViT pooling reads the differences too, per video
    pooled = nano.encode_video(batch["input_ids"], batch["pixel_values_videos"], batch["video_grid_thw"], pooling="vit")
    pooled_alone = nano.encode_video(alone["input_ids"], alone["pixel_values_videos"], alone["video_grid_thw"],
                                     pooling="vit")
    torch.testing.assert_close(pooled_alone[0], pooled[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        nano.visual.vision_model.embeddings.difference_embedding.weight.zero_()
    assert not torch.allclose(nano.encode_video(batch["input_ids"], batch["pixel_values_videos"],
                                                batch["video_grid_thw"], pooling="vit"), pooled, atol=1e-4)


def test_frame_difference_weights_survive_save_and_load(nano, tmp_path):
    from transformers import AutoModelForImageTextToText

    enable_frame_difference(nano.visual)
    weight = nano.visual.vision_model.embeddings.difference_embedding.weight
    torch.nn.init.normal_(weight, std=0.02)
    nano.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, use_safetensors=True)
    assert loaded.config.vision_config.frame_difference
    assert torch.equal(loaded.visual.vision_model.embeddings.difference_embedding.weight, weight)


def test_frame_difference_needs_the_prompt_to_split_the_videos(nano, processor, prompt_factory, clip_factory):
    batch, _ = _batch(processor, prompt_factory, clip_factory)
    enable_frame_difference(nano.visual)
    embeds = nano.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(KeyeInputError, match="frame_difference needs input_ids"):
        nano(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
             pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"])
