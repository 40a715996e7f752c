"""Keye processor: Keye-VL-1.5 frame layout, pixel patches (resized and normalised as the release does), chat
template modes, assistant-only labels."""

from types import SimpleNamespace

import numpy as np
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


# ----------------------------------------------------------------------------- image path, frames without timestamps


def _patches_reference(image_HWC: np.ndarray) -> torch.Tensor:
    """(H, W, C) float -> (H/14 * W/14, C*14*14) patches in raster order, channel-major within a patch."""
    h, w = image_HWC.shape[0] // 14, image_HWC.shape[1] // 14
    x = image_HWC.reshape(h, 14, w, 14, 3).transpose(0, 2, 4, 1, 3)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(h * w, 3 * 14 * 14))


def test_nano_sized_image_and_frames_give_the_same_pixel_values_as_before(proc):
    g = torch.Generator().manual_seed(7)
    # keye-nano's 112x112, and a 28x56 image, what keye.video makes of a message with max_pixels=56*56
    images = [ImageInput(pixels=torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g))
              for size in ((112, 112), (28, 56))]
    c = clip([((112, 112), SLOW), ((56, 56), FAST)], seed=8)
    text = proc.apply_chat_template([user({"type": "image"}, {"type": "image"}, {"type": "video"})])
    batch = proc(text=text, images=images, videos=[c])
    # the processor before config-driven images: (x / 255 - 0.5) / 0.5 on the pixels as given, no resize
    before = [(f.float() / 255.0 - 0.5) / 0.5 for f in (images[0].pixels, images[1].pixels, *c.frames)]
    flat = [_patches_reference(x.permute(1, 2, 0).numpy()) for x in before]
    assert torch.equal(batch["pixel_values"], torch.cat(flat[:2]))
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 2, 4]]
    assert torch.equal(batch["pixel_values_videos"], torch.cat(flat[2:]))


@pytest.mark.parametrize("size, config, expected", [
    # smart_resize by hand: 100x150 rounds to 112x140 (4 x 5 blocks of 28), inside the default bounds
    ((100, 150), {}, (112, 140)),
    # over max_pixels 50176: beta = sqrt(600*900 / 50176) = 3.2805, floor(600/3.2805/28) * 28 = 168, 9 * 28 = 252
    ((600, 900), {"max_pixels": 50176, "resample": 3}, (168, 252)),
])
def test_image_path_resizes_and_normalises_as_the_release_processor(size, config, expected):
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling

    from keye.processing import ImageConfig, KeyeProcessor

    settings = ImageConfig.from_preprocessor_config({"processor_class": "KeyeVL1_5Processor", **config})
    assert settings.image_mean == tuple(OPENAI_CLIP_MEAN) and settings.image_std == tuple(OPENAI_CLIP_STD)
    tok = AutoTokenizer.from_pretrained(str(NANO_TOKENIZER_DIR))
    p = KeyeProcessor(tok, image_config=settings.to_dict())
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g)
    batch = p(text=p.apply_chat_template([user({"type": "image"})]), images=[ImageInput(pixels=pixels)])
    h, w = expected
    assert batch["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    assert int((batch["input_ids"] == p.token_ids["<|image_pad|>"]).sum()) == h * w // 784
    # reference: transformers' own resize / rescale / normalize, the calls the release's image processor makes
    fmt = ChannelDimension.LAST
    x = resize(pixels.permute(1, 2, 0).numpy(), (h, w), resample=PILImageResampling(config.get("resample", 2)),
               input_data_format=fmt)
    x = normalize(rescale(x, 1 / 255, input_data_format=fmt), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, input_data_format=fmt)
    torch.testing.assert_close(batch["pixel_values"], _patches_reference(x), rtol=0, atol=1e-6)


def test_image_config_round_trips_with_the_processor_and_rejects_bad_values(tmp_path):
    from transformers import AutoProcessor

    import keye.models  # noqa: F401  (registers KeyeProcessor with AutoProcessor)
    from keye.processing import ImageConfig, KeyeProcessor

    settings = ImageConfig.from_preprocessor_config({"image_mean": [0.1, 0.2, 0.3], "image_std": 0.25, "min_pixels": 784})
    assert settings.image_std == (0.25, 0.25, 0.25) and settings.max_pixels == 28 * 28 * 1280
    p = KeyeProcessor(AutoTokenizer.from_pretrained(str(NANO_TOKENIZER_DIR)), image_config=settings.to_dict())
    p.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).pixel_config == settings
    for bad, message in (({"patch_size": 16}, "patch_size = 16 is not supported"),
                         ({"image_std": [0.5, 0.0, 0.5]}, "image_std must be 3 numbers"),
                         ({"min_pixels": 10, "max_pixels": 5}, "min_pixels <= max_pixels"),
                         ({"resample": 42}, "resample 42 is not a PIL resampling filter")):
        with pytest.raises(KeyeInputError, match=message):
            ImageConfig.from_preprocessor_config(bad, "x/preprocessor_config.json")


def test_frames_without_timestamps_get_a_bare_frame_token(proc):
    c = clip([((28, 56), SLOW), ((28, 28), FAST)])
    c.timestamps = None
    batch = proc(text=proc.apply_chat_template([user({"type": "video"})]), videos=[c])
    decoded = proc.tokenizer.decode(batch["input_ids"][0]).replace(" ", "")
    expected = "<|vision_start|><|frame|>" + "<|video_pad|>" * 2 + "<|frame|><|fast_start|><|video_pad|><|fast_end|>"
    assert expected + "<|vision_end|>" in decoded


def test_mode_suffix_is_the_same_with_another_chat_template(proc):
    from keye.processing import KeyeProcessor

    # a minimal ChatML template written for this test: no system turn, no knowledge of think_mode
    plain = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
             "{% else %}{% for c in m['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|>"
             "<|vision_end|>{% elif 'text' in c %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    other = KeyeProcessor(proc.tokenizer, chat_template=plain)
    msgs = [user({"type": "text", "text": "first"}), {"role": "assistant", "content": "ok"},
            user({"type": "text", "text": "second"}, {"type": "video", "video": "v.mp4"})]
    ours = proc.apply_chat_template(msgs, think_mode="no_think")
    theirs = other.apply_chat_template(msgs, think_mode="no_think")
    assert theirs == ours.removeprefix(SYSTEM)
    assert theirs.endswith("second<|vision_start|><|video_pad|><|vision_end|> /no_think<|im_end|>\n<|im_start|>assistant\n")
    assert msgs[-1]["content"][-1] == {"type": "video", "video": "v.mp4"}  # the caller's messages are not changed
