"""A procedural, seeded world of short clips with ground truth: captions, question/answer pairs of
several kinds with reference answers, chains of thought and hints, and think-with-image crops.

    from keye.data.world import WorldConfig, generate_world
    generate_world("runs/world", WorldConfig(seed=0, clips={"train": 400, "val": 50, "test": 100}))

``scene.py`` draws what happens, ``render.py`` draws the pixels, ``questions.py`` asks about it,
``generate.py`` writes mp4 + jsonl. Or from the shell: ``keye world --out DIR``.
"""

from keye.data.world.generate import SPLITS, WorldConfig, answer_spaces, caption, generate_world, guess_baselines, make_clip
from keye.data.world.questions import HINT_LEVELS, QA, QUESTION_KINDS
from keye.data.world.render import render_clip
from keye.data.world.scene import Clip, SceneConfig

__all__ = [
    "HINT_LEVELS",
    "QA",
    "QUESTION_KINDS",
    "SPLITS",
    "Clip",
    "SceneConfig",
    "WorldConfig",
    "answer_spaces",
    "caption",
    "generate_world",
    "guess_baselines",
    "make_clip",
    "render_clip",
]
