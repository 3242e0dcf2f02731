"""Score one task's predictions with the packaged `evaluate` modules.

``score_task("caption", preds, refs)`` -> coco-caption metrics with ``score`` = CIDEr (x100);
``score_task("qa", preds, refs)`` -> VQA accuracy and exact match with ``score`` = VQA accuracy
(``metric="exact_match"`` makes exact match the score). All scores are on a 0-100 scale.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

from micl.errors import ConfigError, DataError

__all__ = ["METRICS_DIR", "TASK_METRICS", "load_metric", "metric_path", "normalize_task_type", "score_task"]

#: Folder holding one sub-folder per `evaluate` module (packaged with micl).
METRICS_DIR = Path(__file__).resolve().parent / "metrics"

#: For each task type: metric names accepted as ``metric=`` (first = default) and the module used.
TASK_METRICS = {
    "caption": {
        "cider": "caption_metrics", "bleu_4": "caption_metrics", "meteor": "caption_metrics",
        "rouge_l": "caption_metrics", "bleu_1": "caption_metrics", "bleu_2": "caption_metrics",
        "bleu_3": "caption_metrics",
    },
    "qa": {"vqa_accuracy": "vqa_accuracy", "exact_match": "vqa_accuracy"},
}
_ALIASES = {"caption_metrics": "cider", "vqa": "vqa_accuracy", "accuracy": "vqa_accuracy", "em": "exact_match"}

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def metric_path(name: str) -> Path:
    """Local path of a packaged `evaluate` module (``caption_metrics``, ``vqa_accuracy``; exact match is a
    score of ``vqa_accuracy``)."""
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        known = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ConfigError(f"unknown metric module {name!r}; known: {', '.join(known)}")
    return path


def load_metric(name: str):
    """``evaluate.load`` of a packaged module from its local path, cached per process."""
    with _lock:
        if name not in _loaded:
            import evaluate  # heavy import (pulls in transformers): only when scoring

            _loaded[name] = evaluate.load(str(metric_path(name).parent), keep_in_memory=True)
        return _loaded[name]


def normalize_task_type(task_type: str) -> str:
    """``"caption"`` or ``"qa"`` from ``caption``/``captioning``/``image_caption``/``qa``/``vqa``/``audio_qa`` ..."""
    t = str(task_type).strip().lower().replace("-", "_")
    if t.endswith(("caption", "captioning", "captions")):
        return "caption"
    if t.endswith(("qa", "vqa", "question_answering")):
        return "qa"
    raise ConfigError(f"unknown task_type {task_type!r}: expected 'caption' or 'qa'")


def score_task(
    task_type: str,
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    metric: str | None = None,
    *,
    use_java: bool | None = None,
    meteor: bool = True,
) -> dict:
    """All metrics of one task plus ``score`` (the main one) and ``metric`` (its name).

    caption: cider, bleu_1..4, meteor (None without Java), rouge_l; default metric ``cider``.
    qa: vqa_accuracy, exact_match; default metric ``vqa_accuracy``.
    ``references[i]``: the reference list of sample i (a bare string is one reference).
    ``use_java``/``meteor``: caption only, see :func:`micl.evaluation.caption.compute_caption_metrics`.
    """
    kind = normalize_task_type(task_type)
    name = _ALIASES.get(metric, metric) if metric else next(iter(TASK_METRICS[kind]))
    if name not in TASK_METRICS[kind]:
        raise ConfigError(
            f"metric {metric!r} does not apply to {kind} tasks; choose one of {', '.join(TASK_METRICS[kind])}"
        )
    if isinstance(predictions, str):
        raise DataError("predictions must be a list of strings, not a string")
    predictions = ["" if p is None else str(p) for p in predictions]
    refs = [[r] if isinstance(r, str) else [str(x) for x in r] for r in references]
    if len(predictions) != len(refs):
        raise DataError(f"{len(predictions)} predictions but {len(refs)} reference lists")
    if not predictions:
        raise DataError(f"nothing to score: no predictions for this {kind} task")
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise DataError(f"{len(empty)} samples have no reference (first: index {empty[0]})")

    module = load_metric(TASK_METRICS[kind][name])
    if kind == "caption":
        meteor = meteor or name == "meteor"
        result = module.compute(predictions=predictions, references=refs, use_java=use_java, meteor=meteor)
    else:
        result = module.compute(predictions=predictions, references=refs)
    result = dict(result)
    result["score"] = result[name]
    result["metric"] = name
    return result
