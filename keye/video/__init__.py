"""Video front-end: decode, sample, type (Slow-Fast) and resize videos and images for Keye-VL-style models.

``process_vision_info(messages)`` is the entry point; ``read_video`` / ``read_image`` handle one
item; ``sizing`` and ``slowfast`` hold the arithmetic and the frame selection on their own;
``VideoOptions`` is what a message part, a recipe's ``video:`` section and the command's flags set.

Names are imported on first use (PEP 562), so ``from keye.video import VideoOptions`` stays cheap: the
command line builds its flags from it without loading torch.
"""

import importlib

_WHERE = {
    "BACKENDS": "decode", "open_video": "decode",
    "VideoOptions": "options",
    "VisionInputs": "process", "extract_vision_info": "process", "process_vision_info": "process",
    "read_image": "reader", "read_video": "reader", "resize_frames": "reader",
    "SlowFastBudget": "sizing", "keye_nframes": "sizing", "qwen_nframes": "sizing", "slow_fast_budget": "sizing",
    "smart_resize": "sizing", "smart_nframes": "sizing",
    "SlowFastSelector": "slowfast", "rgb_to_hsv_opencv": "slowfast", "select_slow_fast": "slowfast",
    "FAST": "types", "SLOW": "types", "ImageInput": "types", "VideoClip": "types",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"keye.video.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'keye.video' has no attribute {name!r}")
