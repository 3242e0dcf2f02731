"""results.json (the results matrix, the continual-learning metrics, per metric too, and what the run cost) and the
report, rebuilt from the finished phases of a run folder."""

from __future__ import annotations

import json

from ..evaluation.continual import continual_metrics, grouped_metrics, mcil_metrics
from ..evaluation.efficiency import efficiency_summary
from ..evaluation.report import metric_line, write_report
from ..run_folder import RunFolder
from ..utils.io import atomic_write_json

__all__ = ["metric_line", "write_results"]


def _step_tasks(record: dict) -> list[str]:
    """The tasks a step learned (records of one task per step name only their `task`)."""
    return list(record.get("tasks") or [record["task"]])


def write_results(folder: RunFolder, task_names: list[str], config: dict, phases: list[str] | None = None,
                  task_metrics: dict[str, str] | None = None) -> dict:
    """`phases`: the name of each step's phase (default: one task per step); `task_metrics`: each task's main
    metric (its score's name: results are grouped by it, never averaged across metrics)."""
    phases = phases or task_names
    finished = folder.finished_records(phases)
    matrix = [row["row"] + [None] * (len(task_names) - len(row["row"])) for row in finished]
    initial = json.loads(folder.initial_scores_file.read_text())["scores"] if folder.initial_scores_file.is_file() else None
    learned_at, pre_step = [], []
    for step, record in enumerate(finished):
        scores = record.get("pre_step_scores")
        for task in _step_tasks(record):
            learned_at.append(step)
            pre_step.append(scores.get(task) if isinstance(scores, dict) else record.get("pre_step_score"))
    task_metrics = dict(task_metrics or {})
    for record in finished:  # what the evaluations recorded, for a caller that does not say
        for task, metrics in record.get("metrics", {}).items():
            task_metrics.setdefault(task, metrics.get("metric"))
    metrics = continual_metrics(matrix, initial_scores=initial, pre_step_scores=pre_step, num_tasks=len(task_names),
                                learned_at=learned_at)
    results = {
        "tasks": task_names,
        "phases": phases,
        "task_metrics": task_metrics,
        "matrix": matrix,
        "learned_at": learned_at,
        **metrics,
        "by_metric": grouped_metrics(matrix, [task_metrics.get(t) for t in task_names], initial, pre_step, learned_at),
        "initial_scores": initial,
        "pre_step_scores": pre_step,
        "efficiency": efficiency_summary(finished),
        **_mcil(matrix, finished, initial, pre_step),
        "steps": [{k: v for k, v in row.items() if k != "log_history"} for row in finished],
        "complete": len(finished) == len(phases),
        "config": config,
    }
    atomic_write_json(folder.results_file, results)
    write_report(folder.path)
    return results


def _mcil(matrix, finished: list[dict], initial, pre_step) -> dict:
    """{"mcil": M1 / M2} when a method reported their inputs for every step (`task_similarity`, and `nmi` once an
    audio-visual task was learned: the last one reported counts) in the records' `method_metrics`."""
    similarity, nmi = [], None
    for row in finished:
        reported = [m for m in (row.get("method_metrics") or {}).values() if "task_similarity" in m]
        if not reported:
            return {}
        similarity.append(reported[0]["task_similarity"])
        nmi = next((list(m["nmi"].values()) for m in reported if m.get("nmi")), nmi)
    if not similarity or nmi is None:
        return {}
    return {"mcil": mcil_metrics(matrix[: len(finished)], similarity, nmi, initial, pre_step)}
