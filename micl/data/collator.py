"""Batches of encoded samples: left padding (one layout for training and generation), media features
grouped per modality with the batch rows they belong to.

An item: input_ids, labels, media_mask, media ({stream modality: features [tokens, dim]}, {} for text),
optionally index (the sample's position in its dataset) and task (its task name). A row with two media
(a video and its sound) is in both modalities' groups; when a batch has such rows it also carries
`media_tasks` (the task name of every row), which a media modulator may use (per-task fusion routers)."""

from __future__ import annotations

import torch

from ..modeling.prompting import IGNORE_INDEX


class MultimodalCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids, attention, labels, media_mask = [], [], [], []
        grouped: dict[str, list[torch.Tensor]] = {}
        rows: dict[str, list[int]] = {}
        for row, example in enumerate(examples):
            pad = length - len(example["input_ids"])
            input_ids.append([self.pad_token_id] * pad + list(example["input_ids"]))
            attention.append([0] * pad + [1] * len(example["input_ids"]))
            labels.append([IGNORE_INDEX] * pad + list(example.get("labels") or [IGNORE_INDEX] * len(example["input_ids"])))
            media_mask.append([False] * pad + list(example["media_mask"]))
            for modality, features in example["media"].items():
                grouped.setdefault(modality, []).append(features)
                rows.setdefault(modality, []).append(row)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "media_mask": torch.tensor(media_mask, dtype=torch.bool),
        }
        if all("index" in e for e in examples):
            batch["sample_index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        if grouped:
            batch["media_features"] = {m: torch.stack(f) for m, f in grouped.items()}
            batch["media_rows"] = {m: torch.tensor(r, dtype=torch.long) for m, r in rows.items()}
        if any(len(e["media"]) > 1 for e in examples):
            batch["media_tasks"] = [e.get("task", "") for e in examples]
        return batch
