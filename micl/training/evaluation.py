"""Scoring one task: batched generation with the KV cache, then the task's metric."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.collator import MultimodalCollator
from ..evaluation.scoring import score_task


@torch.no_grad()
def generate_predictions(model, dataset, eval_args, desc: str = "generating") -> list[str]:
    collator = MultimodalCollator(model.tokenizer.pad_token_id)
    loader = DataLoader(dataset, batch_size=eval_args.batch_size, shuffle=False, collate_fn=collator)
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            predictions.extend(
                model.generate(
                    batch,
                    max_new_tokens=eval_args.max_new_tokens,
                    num_beams=eval_args.num_beams,
                    repetition_penalty=eval_args.repetition_penalty,
                )
            )
    finally:
        model.train(was_training)
    return predictions


def evaluate_task(model, task, dataset, eval_args, desc: str | None = None) -> dict:
    """Returns {"score": main metric, <all metrics>, "predictions": [{id, prediction, references}]}."""
    predictions = generate_predictions(model, dataset, eval_args, desc or f"eval {task.name}")
    references = [sample["references"] for sample in dataset.samples]
    metric = None if task.metric == "caption" else task.metric  # captioning: CIDEr is the main score
    metrics = score_task(task.task_type, predictions, references, metric=metric)
    metrics["predictions"] = [
        {"id": s["id"], "prediction": p, "references": s["references"]}
        for s, p in zip(dataset.samples, predictions)
    ]
    return metrics
