"""PEFT tuners of micl, one folder each (config.py, layer.py, model.py, as PEFT's own tuners), registered
with PEFT when this package is imported (`build_peft_config` and micl.modeling.multimodal import it; `import
micl` does not), so that `get_peft_model`, `save_pretrained` and `PeftModel.from_pretrained` handle them like
LoRA.

    lora        PEFT's LoRA itself
    gated_lora  Harmony's gated LoRA bridging (W = W0 + omega * scaling * B A), merged after each phase
    moe_lora    top-k routed LoRA experts with expert freezing
"""

from __future__ import annotations

from peft import LoraConfig, PeftConfig

from ..errors import ConfigError
from . import gated_lora  # noqa: F401
from . import moe_lora  # noqa: F401


def build_peft_config(lora_args) -> PeftConfig:
    """The PEFT config of a recipe's `lora` section (micl.config.LoraArgs)."""
    common = dict(r=lora_args.r, lora_alpha=lora_args.alpha, lora_dropout=lora_args.dropout,
                  target_modules=list(lora_args.target_modules), task_type="CAUSAL_LM")
    if lora_args.type == "lora":
        return LoraConfig(**common)
    if lora_args.type == "gated_lora":
        from .gated_lora import GatedLoraConfig

        try:
            return GatedLoraConfig(**common, gate_init=lora_args.gate_init)
        except ValueError as err:  # the config checks its values (gate_init in (0, gate_max), ...)
            raise ConfigError(f"lora: {err}") from err
    if lora_args.type == "moe_lora":
        from .moe_lora import MoeLoraConfig

        return MoeLoraConfig(**common, num_experts=lora_args.num_experts, top_k=lora_args.top_k,
                             routing=lora_args.routing)
    raise ConfigError(f"lora.type must be one of lora, gated_lora, moe_lora; got {lora_args.type!r}")
