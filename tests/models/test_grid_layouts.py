"""Both video grid layouts: one row per frame (the toolkit's processor) and adjacent same-size frames merged
into one t > 1 row with ``num_frames`` (the official Keye-VL-1.5 processor) give the same model outputs, and
the vision tower never attends across frames whatever the grid says."""

import pytest
import torch

from keye.errors import KeyeInputError
from keye.models.modeling import mrope_positions
from keye.models.vision import frame_grids
from keye.video.types import FAST, SLOW


def _two_clip_batch(processor, prompt_factory, clip_factory, **kw):
    # clip 1 ends and clip 2 starts with the same slow size: merged rows must still stop at the video boundary
    clips = [
        clip_factory([((56, 84), SLOW), ((56, 84), SLOW), ((28, 56), FAST), ((28, 56), FAST), ((56, 84), SLOW)], seed=4),
        clip_factory([((56, 84), SLOW), ((56, 84), SLOW), ((28, 28), FAST)], seed=5),
    ]
    texts = [prompt_factory(processor, "What moves?", "A ball."), prompt_factory(processor, "Count them.", "Two.")]
    return processor(text=texts, videos=clips, return_labels=True, **kw)


def test_merged_rows_give_the_per_frame_logits_loss_and_generation(nano, processor, prompt_factory, clip_factory):
    per_frame = _two_clip_batch(processor, prompt_factory, clip_factory)
    merged = _two_clip_batch(processor, prompt_factory, clip_factory, merge_frames=True)
    # expected rows written by hand from the frame sizes (H/14, W/14): 56x84 -> (4, 6), 28x56 -> (2, 4), 28x28 -> (2, 2)
    assert merged["video_grid_thw"].tolist() == [[2, 4, 6], [2, 2, 4], [1, 4, 6], [2, 4, 6], [1, 2, 2]]
    assert merged["num_frames"].tolist() == [5, 3]
    assert per_frame["video_grid_thw"].tolist() == [[1, 4, 6]] * 2 + [[1, 2, 4]] * 2 + [[1, 4, 6]] * 3 + [[1, 2, 2]]
    assert torch.equal(merged["input_ids"], per_frame["input_ids"])
    assert torch.equal(merged["pixel_values_videos"], per_frame["pixel_values_videos"])
    with torch.no_grad():
        a, b = nano(**per_frame), nano(**merged)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)

    prompt = {k: v[:1] for k, v in per_frame.items() if k in ("input_ids", "attention_mask")}
    frames = int(per_frame["video_grid_thw"][:5].prod(-1).sum())
    one = dict(prompt, pixel_values_videos=per_frame["pixel_values_videos"][:frames])
    gen_a = nano.generate(**one, video_grid_thw=per_frame["video_grid_thw"][:5], max_new_tokens=4, do_sample=False)
    gen_b = nano.generate(**one, video_grid_thw=merged["video_grid_thw"][:3], num_frames=torch.tensor([5]),
                          max_new_tokens=4, do_sample=False)
    assert torch.equal(gen_a, gen_b)


def test_mrope_positions_split_merged_rows_per_frame(nano, processor, prompt_factory, clip_factory):
    per_frame = _two_clip_batch(processor, prompt_factory, clip_factory)
    merged = _two_clip_batch(processor, prompt_factory, clip_factory, merge_frames=True)
    ids, mask = per_frame["input_ids"], per_frame["attention_mask"]
    pos_a, delta_a = mrope_positions(ids, mask, nano.config, video_grid_thw=per_frame["video_grid_thw"])
    pos_b, delta_b = mrope_positions(ids, mask, nano.config, video_grid_thw=merged["video_grid_thw"])
    assert torch.equal(pos_a, pos_b) and torch.equal(delta_a, delta_b)


def test_vision_tower_never_attends_across_frames_of_a_merged_row(nano):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3 * 4 * 6, 3 * 14 * 14, generator=g)
    merged, per_frame = torch.tensor([[3, 4, 6]]), torch.tensor([[1, 4, 6]] * 3)
    with torch.no_grad():
        tower_merged = nano.visual(pixels, merged)
        assert torch.equal(tower_merged, nano.visual(pixels, per_frame))
        for k in range(3):  # each frame alone gives its own slice: nothing leaked in from the other two
            alone = nano.visual(pixels[k * 24:(k + 1) * 24], torch.tensor([[1, 4, 6]]))
            torch.testing.assert_close(tower_merged[k * 24:(k + 1) * 24], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(nano.visual_features(pixels, merged), nano.visual_features(pixels, per_frame))


def test_encode_video_accepts_both_layouts(nano, processor, prompt_factory, clip_factory):
    per_frame = _two_clip_batch(processor, prompt_factory, clip_factory)
    merged = _two_clip_batch(processor, prompt_factory, clip_factory, merge_frames=True)
    common = dict(input_ids=per_frame["input_ids"], pixel_values_videos=per_frame["pixel_values_videos"],
                  attention_mask=per_frame["attention_mask"])
    a = nano.encode_video(**common, video_grid_thw=per_frame["video_grid_thw"])
    b = nano.encode_video(**common, video_grid_thw=merged["video_grid_thw"], num_frames=merged["num_frames"])
    assert torch.equal(a, b)


def test_frame_grids_splits_rows_and_checks_num_frames():
    rows = torch.tensor([[2, 4, 6], [1, 2, 4], [3, 2, 2]])
    assert frame_grids(rows).tolist() == [[1, 4, 6]] * 2 + [[1, 2, 4]] + [[1, 2, 2]] * 3
    assert frame_grids(rows, torch.tensor([3, 3])).tolist() == frame_grids(rows).tolist()
    with pytest.raises(KeyeInputError, match="adds up to 5 frames but video_grid_thw holds 6"):
        frame_grids(rows, torch.tensor([2, 3]))
    with pytest.raises(KeyeInputError, match="covers frames of two videos"):
        frame_grids(rows, torch.tensor([1, 5]))  # the first row's two frames would belong to two videos
    with pytest.raises(KeyeInputError, match="shape \\(N, 3\\)"):
        frame_grids(torch.tensor([2, 4, 6]))


def test_num_frames_is_honoured_by_the_model(nano, processor, prompt_factory, clip_factory):
    merged = _two_clip_batch(processor, prompt_factory, clip_factory, merge_frames=True)
    with torch.no_grad(), pytest.raises(KeyeInputError, match="num_frames \\[3, 5\\]"):
        nano(**dict(merged, num_frames=torch.tensor([3, 5])))  # rows of 2, 2, 1, ... frames: the 2nd would span both
    with pytest.raises(KeyeInputError, match="num_frames was given without video_grid_thw"):
        nano(input_ids=merged["input_ids"], num_frames=merged["num_frames"])
