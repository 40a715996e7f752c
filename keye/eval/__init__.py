"""Benchmark runners and metrics.

* ``formats``: benchmark definitions (``eval/*.yaml``) and the Video-MME, MVBench and synthetic-world
  readers, one registered function each.
* ``runner``: ``run_eval`` (resumable, per-category accuracy, results JSON + markdown) and
  ``evaluate_world`` (per-kind accuracy on a world split, for training recipes and model cards).

Answers are read and judged by ``keye.data.answers``, which the training rewards share.
"""

from keye.eval.formats import FORMATS, EvalDefinition, EvalItem, load_definition, read_items
from keye.eval.runner import evaluate_world, pipeline_predictor, run_eval

__all__ = ["FORMATS", "EvalDefinition", "EvalItem", "evaluate_world", "load_definition", "pipeline_predictor",
           "read_items", "run_eval"]
