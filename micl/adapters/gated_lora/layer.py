"""The gated LoRA layer: y = W0 x + omega * scaling * B (A dropout(x)), omega = gate_max * sigmoid(gate logit)
(gate_max 2 by default, the logit starting at 0: omega = 1, plain LoRA's scale).

`low_rank_factors(adapter)` gives (up, down, scale) with up @ down shaped like the base weight and
scale = omega * scaling, so that delta W = low_rank_delta(up, down, scale) (micl/modeling/low_rank.py) is
the one formula used by PEFT's merge/unmerge here and by the phase-level merge of micl.methods.harmony.
Base layers: torch.nn.Linear and transformers' Conv1D (GPT-2 style, weight stored [in, out]).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...modeling.low_rank import low_rank_delta
from .config import GatedLoraConfig


def _is_conv1d(layer: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(layer, Conv1D)


class GatedLoraLayer(BaseTunerLayer):
    adapter_layer_names = ("gated_lora_A", "gated_lora_B", "gated_lora_gate")
    other_param_names = ("r", "lora_alpha", "scaling", "gate_logit_init", "gate_max", "gated_lora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.gate_logit_init: dict[str, float] = {}
        self.gate_max: dict[str, float] = {}
        self.gated_lora_dropout = nn.ModuleDict({})
        self.gated_lora_A = nn.ParameterDict({})
        self.gated_lora_B = nn.ParameterDict({})
        self.gated_lora_gate = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        elif _is_conv1d(base):
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        else:
            raise TypeError(f"gated_lora: unsupported layer type {type(base).__name__} (torch.nn.Linear or Conv1D)")

    def update_layer(self, adapter_name: str, config: GatedLoraConfig) -> None:
        r = config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.gate_logit_init[adapter_name] = config.gate_logit
        self.gate_max[adapter_name] = float(config.gate_max)
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.gated_lora_dropout.update(nn.ModuleDict({adapter_name: dropout}))
        self.gated_lora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.gated_lora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        self.gated_lora_gate[adapter_name] = nn.Parameter(torch.empty(1))
        self.reset_adapter(adapter_name, init_weights=config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, init_weights: bool = True,
                      generator: torch.Generator | None = None) -> None:
        """A fresh adapter: A Kaiming-uniform (as LoRA), B = 0 (no effect yet), gate logit at its initial value.
        `generator` (a CPU generator) makes the draw independent of the global RNG."""
        if adapter_name not in self.gated_lora_A:
            return
        A, B = self.gated_lora_A[adapter_name], self.gated_lora_B[adapter_name]
        fresh = torch.empty(A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        A.copy_(fresh)
        if init_weights:
            B.zero_()
        else:
            fresh = torch.empty(B.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            B.copy_(fresh)
        self.gated_lora_gate[adapter_name].fill_(self.gate_logit_init[adapter_name])

    def gate(self, adapter_name: str) -> torch.Tensor:
        """omega = gate_max * sigmoid(gate logit), shape [1]."""
        return self.gate_max[adapter_name] * torch.sigmoid(self.gated_lora_gate[adapter_name])

    def low_rank_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(up, down, scale), detached: up @ down has the base weight's shape, scale = omega * scaling."""
        A = self.gated_lora_A[adapter_name].detach()
        B = self.gated_lora_B[adapter_name].detach()
        scale = (self.gate(adapter_name).detach().float() * self.scaling[adapter_name]).reshape(1)
        if self.fan_in_fan_out:
            return A.t().contiguous(), B.t().contiguous(), scale
        return B.clone(), A.clone(), scale

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return low_rank_delta(*self.low_rank_factors(adapter_name))


class GatedLoraLinear(nn.Module, GatedLoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GatedLoraConfig, **kwargs) -> None:
        super().__init__()
        GatedLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Adds omega * scaling * B A of each adapter to the base weight (PEFT's merge_adapter / merge_and_unload)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.gated_lora_A:
                continue
            delta = self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                if safe_merge:
                    merged = weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs in the merged weights; gated_lora adapter {name!r} seems broken")
                    weight.data = merged
                else:
                    weight.data.add_(delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.gated_lora_A:
                with torch.no_grad():
                    weight.data.sub_(self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.gated_lora_A:
                continue
            A = self.gated_lora_A[name]
            h = self.gated_lora_dropout[name](x.to(A.dtype))
            h = nn.functional.linear(nn.functional.linear(h, A), self.gated_lora_B[name])
            result = result + (h * (self.gate(name) * self.scaling[name])).to(result.dtype)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "gated_lora." + super().__repr__()
