"""Harmony's gated LoRA bridging as a PEFT tuner (arXiv 2504.13218, "cumulative modal bridging").

Each targeted linear layer computes

    y = W0 x + omega * scaling * B (A dropout(x)),   omega = gate_max * sigmoid(g),   scaling = lora_alpha / r

with one learned scalar gate logit g per module and adapter, initialised so that omega = `gate_init`
(default 1.0 of gate_max 2.0: a fresh adapter has plain LoRA's scale, so that at step 0 it trains exactly
as LoRA with the same A and B), A [r, in] Kaiming-uniform and B [out, r] zero at initialisation (the
adapter starts as the identity, as LoRA). Merging (PEFT's merge_adapter / merge_and_unload) adds omega * scaling * B A to W0;
unmerging subtracts it.

Registered with PEFT's own `register_peft_method` under `PeftType.GATED_LORA` (added to PEFT's enum on
import, see micl/adapters/peft_types.py), prefix "gated_lora_". After `import micl.adapters`,
`get_peft_model(llm, GatedLoraConfig(...))`, `save_pretrained` (a normal PEFT folder, adapter_config.json
with "peft_type": "GATED_LORA") and `PeftModel.from_pretrained` work as for LoRA.

Why a tuner of its own and not a LoRA variant: PEFT's `LoraVariant` hook is private API (it may change
between PEFT releases) and a variant's extra parameter would be saved under LoRA's peft_type, so plain
PEFT without micl would load the adapter silently *without* its gate. A separate peft_type fails loudly
there instead, and the gate is an ordinary adapter parameter (`gated_lora_gate`).

Phase-level merging ("parameter-level accumulation") is `low_rank_factors` + `MultimodalLM.merge_low_rank`
+ `reset_gated_lora`, driven by micl.methods.harmony; docs/harmony.md.
"""

from peft.utils import register_peft_method

from .config import GatedLoraConfig
from .layer import GatedLoraLayer, GatedLoraLinear
from .model import GatedLoraModel, gated_lora_layers, low_rank_factors, reset_gated_lora

__all__ = ["GatedLoraConfig", "GatedLoraLayer", "GatedLoraLinear", "GatedLoraModel",
           "gated_lora_layers", "low_rank_factors", "reset_gated_lora"]


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    if PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.GATED_LORA) is GatedLoraModel:
        return  # imported twice (e.g. a reload)
    register_peft_method(name="gated_lora", config_cls=GatedLoraConfig, model_cls=GatedLoraModel,
                         prefix=GatedLoraModel.prefix)


_register()
