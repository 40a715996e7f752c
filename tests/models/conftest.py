"""Shared helpers for the model tests: a seeded keye-nano, its processor, hand-made clips."""

import pytest
import torch

from keye.models import build_model
from keye.processing import load_nano_processor
from keye.video.types import FAST, SLOW, VideoClip


def make_clip(sizes_types, seed=0):
    """sizes_types: list of ((H, W), SLOW|FAST) -> VideoClip of random uint8 frames at 2 fps."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for (h, w), _ in sizes_types]
    types = torch.tensor([t for _, t in sizes_types], dtype=torch.int32)
    slow = next(s for s, t in sizes_types if t == SLOW)
    fast = next((s for s, t in sizes_types if t == FAST), None)
    return VideoClip(
        frames=frames, frame_types=types, timestamps=torch.arange(len(frames), dtype=torch.float32) * 0.5,
        indices=torch.arange(len(frames)), slow_size=slow, fast_size=fast, source_fps=2.0,
    )


@pytest.fixture
def nano():
    torch.manual_seed(0)
    return build_model("keye-nano").eval()


@pytest.fixture(scope="module")
def processor():
    return load_nano_processor()


def video_prompt(processor, question, answer=None, think_mode=None):
    messages = [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(messages, think_mode=think_mode, add_generation_prompt=answer is None)


@pytest.fixture
def clip_factory():
    return make_clip


@pytest.fixture
def prompt_factory():
    return video_prompt
