"""Benchmark runners and metrics.

* ``answers``: split thinking from answers, extract option letters (``<answer>``, ``\\boxed{}``,
  a bare letter or the option text), normalise open answers.
* ``formats``: benchmark definitions (``eval/*.yaml``) and the Video-MME, MVBench and synthetic-world
  readers, one registered function each.
* ``runner``: ``run_eval`` (resumable, per-category accuracy, results JSON + markdown) and
  ``evaluate_world`` (per-kind accuracy on a world split, for training recipes and model cards).
"""

from keye.eval.answers import Answer, extract_choice, final_answer, is_correct, normalize, split_reasoning
from keye.eval.formats import FORMATS, EvalDefinition, EvalItem, load_definition, read_items
from keye.eval.runner import evaluate_world, pipeline_predictor, run_eval

__all__ = [
    "FORMATS", "Answer", "EvalDefinition", "EvalItem", "evaluate_world", "extract_choice", "final_answer",
    "is_correct", "load_definition", "normalize", "pipeline_predictor", "read_items", "run_eval", "split_reasoning",
]
