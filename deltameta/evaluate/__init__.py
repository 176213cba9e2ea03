"""Few-shot evaluation against every baseline (``deltameta evaluate``).

::

    from deltameta.config import build_config
    from deltameta.evaluate import EvaluateConfig, run_evaluate

    config = build_config(EvaluateConfig, overrides={"adapter": "runs/meta", "multitask_adapter": "runs/multitask"})
    results = run_evaluate(config)   # also OUTPUT/results.json, results.md, plots/*.png
"""

from deltameta.evaluate.config import METHODS, TRAINING_METHODS, EvaluateConfig
from deltameta.evaluate.report import markdown_table, mean_ci, summarize
from deltameta.evaluate.runner import Evaluator, merge_evaluations, run_evaluate

__all__ = ["METHODS", "TRAINING_METHODS", "EvaluateConfig", "Evaluator", "markdown_table", "merge_evaluations", "mean_ci", "run_evaluate", "summarize"]
