"""results.json (the results matrix and the continual-learning metrics) and the report, rebuilt from the
finished phases of a run folder."""

from __future__ import annotations

import json

from ..evaluation.continual import continual_metrics, mcil_metrics
from ..evaluation.report import write_report
from ..run_folder import RunFolder
from ..utils.io import atomic_write_json


def write_results(folder: RunFolder, task_names: list[str], config: dict) -> dict:
    finished = folder.finished_records(task_names)
    matrix = [row["row"] + [None] * (len(task_names) - len(row["row"])) for row in finished]
    initial = json.loads(folder.initial_scores_file.read_text())["scores"] if folder.initial_scores_file.is_file() else None
    pre_step = [row.get("pre_step_score") for row in finished]
    results = {
        "tasks": task_names,
        "matrix": matrix,
        **continual_metrics(matrix, initial_scores=initial, pre_step_scores=pre_step),
        "initial_scores": initial,
        "pre_step_scores": pre_step,
        **_mcil(matrix, finished, initial, pre_step),
        "steps": [{k: v for k, v in row.items() if k != "log_history"} for row in finished],
        "complete": len(finished) == len(task_names),
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
