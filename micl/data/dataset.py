"""A task's samples + their stored media features, rendered into token sequences on the fly.

Training draws a random instruction template per sample and epoch (seeded by run seed, epoch and
index, so a resumed run renders the same prompts); evaluation uses the one fixed prompt.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from .prompts import render_instruction


class EncodedTaskDataset(Dataset):
    """`features[i]`: {stream modality: features [tokens, dim]} of sample i ({} for text-only samples): a list,
    or the lazy `micl.modeling.feature_store.SampleFeatures` (read from the feature store on access, so a
    split's features are never all in memory; safe in forked DataLoader workers)."""

    def __init__(self, samples, features, builder, templates, train: bool, seed: int = 0):
        if len(samples) != len(features):
            raise ValueError("one feature tensor per sample is required")
        self.samples = samples
        self.features = features
        self.builder = builder
        self.templates = templates
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        instruction = render_instruction(sample, self.templates, train=self.train, rng=rng)
        return {**self.encode_item(index, instruction, sample["target"] if self.train else None), "index": index}

    def input_length(self, index: int) -> int:
        """Tokens of item `index` as `__getitem__` renders it, without reading its features when the feature
        store can tell their token counts."""
        counts = getattr(self.features, "token_counts", None)
        media = counts(index) if counts is not None else {m: f.shape[0] for m, f in self.features[index].items()}
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        instruction = render_instruction(sample, self.templates, train=self.train, rng=rng)
        return len(self.builder.encode(instruction, media, sample["target"] if self.train else None).input_ids)

    def encode_item(self, index: int, instruction: str, target: str | None) -> dict:
        """A collator item for sample `index` with this instruction (and target, for training)."""
        media: dict[str, torch.Tensor] = self.features[index]
        encoded = self.builder.encode(instruction, {m: f.shape[0] for m, f in media.items()}, target)
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, "media_mask": encoded.media_mask,
                "media": media, "task": self.samples[index]["task"]}
