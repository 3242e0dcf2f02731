"""Evaluation: task metrics as local `evaluate` modules, continual metrics, run reports.

See docs/metrics.md for the definitions and scales (CIDEr x100, accuracies in percent).
"""

from micl.evaluation.continual import continual_metrics
from micl.evaluation.report import write_report
from micl.evaluation.scoring import score_task

__all__ = ["continual_metrics", "score_task", "write_report"]
