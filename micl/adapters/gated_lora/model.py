"""GatedLoraModel: the PEFT tuner that swaps the targeted Linear/Conv1D layers for GatedLoraLinear."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .config import GatedLoraConfig
from .layer import GatedLoraLayer, GatedLoraLinear


class GatedLoraModel(BaseTuner):
    """Built by `get_peft_model(model, GatedLoraConfig(...))` (registered in micl/adapters/gated_lora/__init__)."""

    prefix: str = "gated_lora_"
    tuner_layer_cls = GatedLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config: GatedLoraConfig, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        if isinstance(target, GatedLoraLinear):
            target.update_layer(adapter_name, config)
            return
        new_module = GatedLoraLinear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)


def gated_lora_layers(model: torch.nn.Module, adapter_name: str):
    """(name, layer) of every GatedLoraLayer of `model` that holds `adapter_name`."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, GatedLoraLayer) and adapter_name in m.gated_lora_A]


def low_rank_factors(model: torch.nn.Module, adapter_name: str) -> dict:
    """{name of the base weight parameter in `model`: (up, down, scale)} of one adapter: what
    `MultimodalLM.merge_low_rank` (micl/modeling/low_rank.py) folds into the base weights."""
    names = {id(p): n for n, p in model.named_parameters()}
    factors = {}
    for _, layer in gated_lora_layers(model, adapter_name):
        factors[names[id(layer.get_base_layer().weight)]] = layer.low_rank_factors(adapter_name)
    if not factors:
        raise ValueError(f"gated_lora: the model has no gated_lora adapter {adapter_name!r}")
    return factors


def reset_gated_lora(model: torch.nn.Module, adapter_name: str, seed: int | None = None) -> None:
    """A fresh adapter in every layer: new A, B = 0, gate at its initial value. With `seed`, A is drawn from a
    generator seeded with it (layer by layer in module order), not from the global RNG."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for _, layer in gated_lora_layers(model, adapter_name):
        layer.reset_adapter(adapter_name, init_weights=True, generator=generator)
