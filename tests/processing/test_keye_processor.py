"""Keye processor: Keye-VL-1.5 frame layout, pixel patches, chat template modes, assistant-only labels."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from keye.data.world.vocab import world_words
from keye.errors import KeyeInputError
from keye.processing import (
    NANO_TOKENIZER_DIR, PIXEL_MEAN, PIXEL_STD, REASONING_TOKENS, SPECIAL_TOKENS, build_nano_tokenizer,
    load_nano_processor,
)
from keye.video.types import FAST, SLOW, ImageInput, VideoClip


@pytest.fixture(scope="module")
def proc():
    return load_nano_processor()


def clip(sizes_types, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for (h, w), _ in sizes_types]
    return VideoClip(frames=frames, frame_types=torch.tensor([t for _, t in sizes_types], dtype=torch.int32),
                     timestamps=torch.tensor([0.0, 0.5, 1.25, 2.0][: len(frames)]), indices=torch.arange(len(frames)),
                     slow_size=sizes_types[0][0], fast_size=None, source_fps=2.0)


def user(*content):
    return {"role": "user", "content": list(content)}


def test_video_layout_per_frame_with_timestamps(proc):
    c = clip([((56, 84), SLOW), ((28, 56), FAST), ((56, 84), SLOW)])
    text = proc.apply_chat_template([user({"type": "video", "video": "v.mp4"}, {"type": "text", "text": "Why?"})])
    batch = proc(text=text, vision=SimpleNamespace(images=[], videos=[c]))
    decoded = proc.tokenizer.decode(batch["input_ids"][0])
    expected = ("<|vision_start|>"
                "<|frame|>0.0" + "<|video_pad|>" * 6
                + "<|frame|>0.5<|fast_start|>" + "<|video_pad|>" * 2 + "<|fast_end|>"
                + "<|frame|>1.2" + "<|video_pad|>" * 6
                + "<|vision_end|>Why?")
    assert expected in decoded.replace(" ", "")
    assert decoded.startswith("<|im_start|>system\n") and decoded.endswith("<|im_start|>assistant\n")
    pad_id = proc.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((batch["input_ids"] == pad_id).sum()) == c.num_tokens == 14
    assert batch["video_grid_thw"].tolist() == [[1, 4, 6], [1, 2, 4], [1, 4, 6]]


def test_pixel_patches_are_raster_ordered_and_normalised(proc):
    c = clip([((56, 84), SLOW), ((28, 56), FAST)], seed=3)
    batch = proc(text=proc.apply_chat_template([user({"type": "video"})]), videos=[c])
    pv = batch["pixel_values_videos"]
    assert pv.shape == (4 * 6 + 2 * 4, 3 * 14 * 14)
    frame0 = (c.frames[0].float() / 255 - PIXEL_MEAN) / PIXEL_STD
    # patch (row 1, col 2) of frame 0 is index 1 * 6 + 2
    torch.testing.assert_close(pv[8], frame0[:, 14:28, 28:42].reshape(-1))
    frame1 = (c.frames[1].float() / 255 - PIXEL_MEAN) / PIXEL_STD
    torch.testing.assert_close(pv[24 + 5], frame1[:, 14:28, 14:28].reshape(-1))


def test_images_expand_to_hw_over_784_pads(proc):
    img = ImageInput(pixels=torch.randint(0, 256, (3, 56, 112), dtype=torch.uint8))
    text = proc.apply_chat_template([user({"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"})])
    batch = proc(text=text, images=[img])
    pad_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == pad_id).sum()) == 56 * 112 // 784
    assert batch["image_grid_thw"].tolist() == [[1, 4, 8]] and batch["pixel_values"].shape == (32, 588)


def test_bad_sizes_and_counts_are_clear_errors(proc):
    text = proc.apply_chat_template([user({"type": "video"})])
    with pytest.raises(KeyeInputError, match="multiples of 28"):
        proc(text=text, videos=[clip([((56, 70), SLOW)])])
    with pytest.raises(KeyeInputError, match="more <\\|video_pad\\|> placeholders"):
        proc(text=text, videos=[])
    with pytest.raises(KeyeInputError, match="no placeholder"):
        proc(text=text, videos=[clip([((28, 28), SLOW)]), clip([((28, 28), SLOW)])])


# Expected prompts, written from what the Keye-VL release's own chat template renders for these messages
# (its keye-vl-8b-preview/chat_template.json; the 1.5 release ships the same text).
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
RELEASE_PROMPTS = [
    ({}, [user({"type": "video", "video": "a.mp4"}, {"type": "text", "text": "What happens?"})],
     SYSTEM + "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ({}, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ({"add_vision_id": True}, [user({"image_url": "http://x/a.png"}, {"text": "Describe."})],
     SYSTEM + "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ({"add_vision_id": True},
     [user({"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}), {"role": "assistant", "content": "A cat."},
      user({"type": "video", "video": "b.mp4"}, {"type": "image", "image": "c.png"}, {"type": "text", "text": "And these?"})],
     SYSTEM + "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n"
     "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nVideo 1: <|vision_start|><|video_pad|><|vision_end|>"
     "Picture 2: <|vision_start|><|image_pad|><|vision_end|>And these?<|im_end|>\n<|im_start|>assistant\n"),
    ({}, [user({"type": "image", "image": "a.png"}), user({"text": "two turns in a row"})],
     SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>user\n"
     "two turns in a row<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("kwargs, messages, expected", RELEASE_PROMPTS)
def test_prompts_equal_the_release_template(proc, kwargs, messages, expected):
    assert proc.apply_chat_template(messages, **kwargs) == expected
    body = expected.removesuffix("<|im_start|>assistant\n")
    assert proc.apply_chat_template(messages, add_generation_prompt=False, **kwargs) == body


def test_think_mode_suffix_on_last_user_text(proc):
    msgs = [user({"type": "text", "text": "first"}), {"role": "assistant", "content": "ok"},
            user({"type": "text", "text": "second"})]
    think = proc.apply_chat_template(msgs, think_mode="think")
    assert "second /think<|im_end|>" in think and "first<|im_end|>" in think
    assert "second /no_think<|im_end|>" in proc.apply_chat_template(msgs, think_mode="no_think")
    assert "/think" not in proc.apply_chat_template(msgs)
    with pytest.raises(KeyeInputError):
        proc.apply_chat_template(msgs, think_mode="maybe")


def test_labels_cover_assistant_turns_only(proc):
    msgs = [user({"type": "video"}, {"type": "text", "text": "Q1"}),
            {"role": "assistant", "content": "<think>look</think><answer>red</answer>"},
            user({"type": "text", "text": "Q2"}), {"role": "assistant", "content": "blue"}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=False)
    batch = proc(text=[text, proc.apply_chat_template(msgs[:2], add_generation_prompt=False)],
                 videos=[clip([((28, 56), SLOW)]), clip([((28, 28), SLOW)])], return_labels=True)
    labels, ids = batch["labels"], batch["input_ids"]
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    tok = proc.tokenizer
    assert tok.decode(labels[0][labels[0] != -100]) == "<think>look</think><answer>red</answer><|im_end|>blue<|im_end|>"
    assert tok.decode(labels[1][labels[1] != -100]) == "<think>look</think><answer>red</answer><|im_end|>"
    assert (labels[1][batch["attention_mask"][1] == 0] == -100).all()


def test_nano_tokenizer_files_load_and_rebuild_identically(tmp_path):
    shipped = AutoTokenizer.from_pretrained(str(NANO_TOKENIZER_DIR))
    for t in SPECIAL_TOKENS + REASONING_TOKENS:
        assert len(shipped.tokenize(t)) == 1, t
    assert shipped.chat_template and "/' + think_mode" in shipped.chat_template
    rebuilt = build_nano_tokenizer(tmp_path, whole_words=world_words())
    assert rebuilt.get_vocab() == shipped.get_vocab()
    assert shipped.decode(shipped("A blue cube at 12.5 s.")["input_ids"]) == "A blue cube at 12.5 s."
