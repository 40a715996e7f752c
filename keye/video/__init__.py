"""Video front-end: decode, sample, type (Slow-Fast) and resize videos and images for Keye-VL-style models.

``process_vision_info(messages)`` is the entry point; ``read_video`` / ``read_image`` handle one
item; ``sizing`` and ``slowfast`` hold the arithmetic and the frame selection on their own.
"""

from keye.video.decode import BACKENDS, open_video
from keye.video.process import VisionInputs, extract_vision_info, process_vision_info
from keye.video.reader import read_image, read_video, resize_frames
from keye.video.sizing import SlowFastBudget, keye_nframes, qwen_nframes, slow_fast_budget, smart_resize
from keye.video.slowfast import SlowFastSelector, rgb_to_hsv_opencv, select_slow_fast
from keye.video.types import FAST, SLOW, ImageInput, VideoClip

smart_nframes = qwen_nframes  # the qwen-vl-utils name; keye_nframes is Keye-VL-1.5's variant

__all__ = [
    "BACKENDS", "FAST", "SLOW", "ImageInput", "SlowFastBudget", "SlowFastSelector", "VideoClip", "VisionInputs",
    "extract_vision_info", "keye_nframes", "open_video", "process_vision_info", "qwen_nframes", "read_image",
    "read_video", "resize_frames", "rgb_to_hsv_opencv", "select_slow_fast", "slow_fast_budget", "smart_nframes",
    "smart_resize",
]
