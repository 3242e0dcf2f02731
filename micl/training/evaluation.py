"""Scoring one task: batched generation with the KV cache, then the task's metric.

Under a launcher every process generates its share of the evaluation batches (`sharded=True`: batch r,
r + N, ... on rank r; `micl.utils.distributed.map_sharded`) and the predictions are gathered; the main
process scores. The batches are the ones a single process would make, so the predictions (and scores)
equal a single process's. Under ZeRO-3 (every forward gathers weights collectively) the ranks also make
the same number of generate calls.
"""

from __future__ import annotations

import torch

from ..data.collator import MultimodalCollator
from ..evaluation.scoring import score_task
from ..utils.distributed import is_main_process, is_partitioned, map_sharded
from ..utils.progress import progress_bar


def decoding_settings(eval_args) -> dict:
    """The recipe's decoding settings as MultimodalLM.generate keywords."""
    return {"max_new_tokens": eval_args.max_new_tokens, "num_beams": eval_args.num_beams,
            "repetition_penalty": eval_args.repetition_penalty}


def batch_indices(size: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, size))) for start in range(0, size, batch_size)]


def is_zero3(model) -> bool:
    return any(is_partitioned(p) for p in model.parameters())


@torch.no_grad()
def generate_predictions(model, dataset, eval_args, desc: str = "generating", sharded: bool = False,
                         generate=None) -> list[str]:
    """Predictions for every sample of `dataset` (on every rank when `sharded`). `generate` (default
    `model.generate`) takes a collated batch and the decoding settings."""
    collator = MultimodalCollator(model.tokenizer.pad_token_id)
    generate = generate or model.generate
    jobs = batch_indices(len(dataset), eval_args.batch_size)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=len(jobs), desc=desc, unit="batch", leave=False, disable=not is_main_process())

    def run(indices: list[int]) -> list[str]:
        batch = collator([dataset[i] for i in indices])
        texts = generate(batch, **decoding_settings(eval_args))
        bar.update(1)
        return texts

    try:
        if sharded:
            batches = map_sharded(run, jobs, uniform=is_zero3(model))
        else:
            batches = [run(indices) for indices in jobs]
    finally:
        bar.close()
        model.train(was_training)
    return [text for texts in batches for text in texts]


def main_metric(task) -> str:
    """The name of the metric a task's score is (the `metric` score_predictions records): CIDEr for `caption`."""
    return "cider" if task.metric == "caption" else task.metric


def score_predictions(task, dataset, predictions: list[str]) -> dict:
    """{"score": main metric, <all metrics>, "predictions": [{id, prediction, references}]}."""
    references = [sample["references"] for sample in dataset.samples]
    metric = None if task.metric == "caption" else task.metric  # captioning: CIDEr is the main score
    metrics = score_task(task.task_type, predictions, references, metric=metric)
    metrics["predictions"] = [
        {"id": s["id"], "prediction": p, "references": s["references"]}
        for s, p in zip(dataset.samples, predictions)
    ]
    return metrics


def evaluate_task(model, task, dataset, eval_args, desc: str | None = None, sharded: bool = False) -> dict:
    """Returns {"score": main metric, <all metrics>, "predictions": [...]}; with `sharded`, called on every
    rank: the main process scores, the others get {"score": None, "predictions": []}."""
    predictions = generate_predictions(model, dataset, eval_args, desc or f"eval {task.name}", sharded=sharded)
    if sharded and not is_main_process():
        return {"score": None, "predictions": []}
    return score_predictions(task, dataset, predictions)
