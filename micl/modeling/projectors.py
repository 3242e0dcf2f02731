"""Per-modality projectors from frozen-encoder features into the LLM's embedding space.

LayerNorm -> Linear(d_enc, d_hidden) -> GELU -> Linear(d_hidden, d_llm), as in the MoInCL reference.
Token-count reduction (patch / frame / time pooling) happens before, in the encoders, so cached
features are already small; see `micl/modeling/encoders/registry.py`.
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or output_dim
        self.norm = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.fc1.weight.dtype

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, input_dim] -> [batch, tokens, output_dim]"""
        return self.fc2(self.act(self.fc1(self.norm(features))))


def build_projectors(input_dims: dict[str, int], llm_dim: int, hidden_dim: int | None = None) -> nn.ModuleDict:
    return nn.ModuleDict({modality: Projector(dim, llm_dim, hidden_dim) for modality, dim in sorted(input_dims.items())})
