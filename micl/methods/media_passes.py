"""A task's training media through the projectors and the media modulator, as a forward puts them into the
LLM: what methods measure at the end of a task (Harmony's prototypes, adaptive fusion's task embedding,
mutual information and gate statistics)."""

from __future__ import annotations

from typing import Iterator

import torch


def projected_media(model, dataset, count: int, task: str, modalities=None,
                    chunk_size: int = 64) -> Iterator[tuple[dict, dict, dict]]:
    """Yields (tokens {modality: [n, T, d]}, media_rows {modality: [n]}, aux) over the dataset's first `count`
    samples, `chunk_size` at a time, each row one sample of `task` (the modulator routes them as that task's).
    `modalities` limits the media projected; a chunk whose items differ in token count goes one item at a
    time. Text-only samples yield nothing. Call under no_grad (and in the mode wanted: eval for no noise)."""
    for start in range(0, count, chunk_size):
        items = [{m: f for m, f in dataset.features[i].items() if modalities is None or m in modalities}
                 for i in range(start, min(start + chunk_size, count))]
        items = [item for item in items if item]
        if not items:
            continue
        uniform = all(all(m in item for item in items) and len({tuple(item[m].shape) for item in items}) == 1
                      for m in items[0])  # (presence first: an item without m must not be indexed by it)
        for group in [items] if uniform else [[item] for item in items]:
            features = {m: torch.stack([item[m] for item in group]).to(model.device) for m in group[0]}
            rows = {m: torch.arange(len(group)) for m in features}
            aux: dict = {}
            yield model.project_media(features, rows, [task] * len(group), aux), rows, aux
