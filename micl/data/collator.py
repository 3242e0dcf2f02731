"""Batches of encoded samples: left padding (one layout for training and generation), media features
grouped per modality with the batch rows they belong to.

An item: input_ids, labels, media_mask, media ({stream modality: features [tokens, dim]}, {} for text),
optionally index (the sample's position in its dataset) and task (its task name). A row with two media
(a video and its sound) is in both modalities' groups. A batch with media also carries `media_tasks` (the
task name of every row), which a media modulator may use (per-task adapters and fusion routers).

Everything the model would otherwise have to read back from the device is worked out here, on the CPU,
while the data loader prepares the batch (no host synchronisation in the training step):
- `media_masks`: {modality: [batch, length] bool}, the placeholders of each modality (a row's blocks are
  in the prompt's MEDIA_ORDER), so that the model scatters each modality's tokens without sorting;
- `logits_to_keep`: how many final positions carry a prediction of a target token (targets sit at the end
  of left-padded rows); 0 = all positions (no targets);
- `indices`: the samples' dataset positions as a Python list (hooks seed their draws with it).
"""

from __future__ import annotations

import torch

from ..errors import MiclError
from ..modeling.prompting import IGNORE_INDEX, MEDIA_ORDER


def _media_order(media: dict) -> list[str]:
    return sorted(media, key=lambda m: MEDIA_ORDER.index(m) if m in MEDIA_ORDER else len(MEDIA_ORDER))


def label_window(labels: list[list[int]], length: int) -> int:
    """Number of final positions whose logits predict a target token (the logit at i predicts i + 1)."""
    starts = [next((i for i, label in enumerate(row) if label != IGNORE_INDEX), None) for row in labels]
    starts = [s for s in starts if s is not None]
    if not starts:
        return 0
    return length - max(min(starts) - 1, 0)


class MultimodalCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids, attention, labels, media_mask = [], [], [], []
        grouped: dict[str, list[torch.Tensor]] = {}
        rows: dict[str, list[int]] = {}
        masks: dict[str, torch.Tensor] = {}
        for row, example in enumerate(examples):
            pad = length - len(example["input_ids"])
            input_ids.append([self.pad_token_id] * pad + list(example["input_ids"]))
            attention.append([0] * pad + [1] * len(example["input_ids"]))
            labels.append([IGNORE_INDEX] * pad + list(example.get("labels") or [IGNORE_INDEX] * len(example["input_ids"])))
            media_mask.append([False] * pad + list(example["media_mask"]))
            positions = [i for i, is_media in enumerate(media_mask[-1]) if is_media]
            used = 0
            for modality in _media_order(example["media"]):
                features = example["media"][modality]
                count = features.shape[0]
                if used + count > len(positions):
                    raise MiclError(f"batch row {row} has {len(positions)} media placeholders but more media tokens "
                                    f"({', '.join(f'{m}: {f.shape[0]}' for m, f in example['media'].items())})")
                mask = masks.setdefault(modality, torch.zeros(len(examples), length, dtype=torch.bool))
                mask[row, positions[used:used + count]] = True
                used += count
                grouped.setdefault(modality, []).append(features)
                rows.setdefault(modality, []).append(row)
            if used != len(positions):
                raise MiclError(f"batch row {row} has {len(positions)} media placeholders but {used} media tokens")
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "media_mask": torch.tensor(media_mask, dtype=torch.bool),
            "logits_to_keep": label_window(labels, length),
        }
        if all("index" in e for e in examples):
            batch["sample_index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
            batch["indices"] = [int(e["index"]) for e in examples]
        if grouped:
            batch["media_features"] = {m: torch.stack(f) for m, f in grouped.items()}
            batch["media_rows"] = {m: torch.tensor(r, dtype=torch.long) for m, r in rows.items()}
            batch["media_masks"] = masks
            batch["media_tasks"] = [e.get("task", "") for e in examples]
        return batch
