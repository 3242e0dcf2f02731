"""A weightless encoder for benchmarks and tests of the feature pipeline: deterministic random features
[tokens, dim] drawn from a generator seeded by each file's bytes (the same content gives the same features,
on any process or machine)."""

from __future__ import annotations

import hashlib

import torch

from ...errors import MediaError
from .registry import MediaEncoder


class SyntheticEncoder(MediaEncoder):
    def __init__(self, modality: str = "image", tokens: int = 4, dim: int = 8, seed: int = 0):
        self.modality = modality
        self.num_tokens = tokens
        self.output_dim = dim
        self.seed = seed
        self.identity = f"{modality}|synthetic|seed{seed}|{tokens}x{dim}"

    def weight_locations(self) -> list:
        return []  # no weights: the features are a function of the file's bytes and the seed

    def load(self, path: str) -> bytes:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as err:
            raise MediaError(path, f"cannot read: {err.strerror}") from err

    def encode(self, items: list[bytes]) -> torch.Tensor:
        features = []
        for data in items:
            seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little") ^ self.seed
            generator = torch.Generator().manual_seed(seed)
            features.append(torch.randn(self.num_tokens, self.output_dim, generator=generator))
        return self.inputs(torch.stack(features))
