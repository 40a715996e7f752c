"""Answers about videos in three lines::

    import keye
    pipe = keye.load("runs/nano/sft/model")        # a toolkit checkpoint, a published folder, or a variant name
    print(pipe.ask("clip.mp4", "What happens after the cut?", mode="think", fps=1.0).text)

``loading`` finds out what a source is and builds the pipeline; ``pipeline`` holds ``KeyePipeline``
(messages, batched and streamed generation, answers split from their reasoning). The ``keye ask`` command
is a thin shell over both (``keye.cli.ask``).
"""

from keye.api.loading import LOADERS, best_device, best_dtype, load, register_loader
from keye.api.pipeline import MODES, KeyePipeline, build_messages, media_part
from keye.data.answers import Answer

__all__ = ["LOADERS", "MODES", "Answer", "KeyePipeline", "best_device", "best_dtype", "build_messages", "load",
           "media_part", "register_loader"]
