"""moe_lora: top-k routed LoRA experts with expert freezing, as a PEFT tuner (after the cross-modality MoE
adapters of arXiv 2511.06723, moved from the encoders' blocks into the LLM's Linear layers).

Per adapted nn.Linear (`target_modules`): E = `num_experts` LoRA experts (A_e: r x in, B_e: out x r) and a
router (Linear in -> E, no bias, normal(0, 0.02) init). For each routing unit the router's logits choose the
top_k experts; their weights are the softmax over the k chosen logits only:

    y = base(x) + sum_{e in topk} w_e * (lora_alpha / r) * B_e A_e dropout(x)

Choices where the paper is silent (docs/moe_lora.md):
- Routing unit. `routing="token"` (default): every token on its own hidden state (the layer's input).
  `routing="sample"`: one decision per sample, from the router logits of the mean of the sample's prompt
  tokens in that layer (attention mask 1 and label -100; all non-padding tokens when there are no labels).
  Pooling the prompt only makes training (prompt + target) and generation (prompt, then one token at a
  time) route identically: during KV-cached decoding the routing decided at the prefill is reused (beams of
  one sample share the prompt, so beam reordering does not matter).
- Masks come from a forward pre-hook on the wrapped transformers model (`attention_mask`, `labels` kwargs),
  so they are also seen in the forwards `generate` makes.
- Experts are separate parameters (one A and one B per expert, in a ParameterList per adapter), stacked in
  each forward: freezing an expert is `requires_grad=False` on its own tensors, so it gets no gradient, is
  left out of the optimizer that the next task creates, and AdamW's weight decay / momentum cannot move it
  (no gradient-mask hook needed). The stack costs one copy of E*r*(in+out) numbers per forward.
- Computation: two dense GEMMs over the stacked experts (inner size E*r) with the unchosen experts zeroed
  by the gate, which is exactly the top-k sum. At E*r = 80 this measured as fast as a grouped dispatch
  (tokens gathered per expert, 2E skinny GEMMs, index_add) on CPU, 1024 tokens, 1 thread: 2.9-3.6 ms vs
  2.4-3.3 ms per forward, noisy; it has no data-dependent loop and a simpler backward.
- A frozen expert's router row enters the logits detached (`ExpertRouter`): no gradient, so the logit the
  expert gets for an input stays; the other rows train.
- Frozen experts are recorded in a boolean buffer `moe_lora_frozen` saved with the adapter and re-applied
  whenever PEFT re-enables the adapter's gradients (`set_adapter`, `enable_adapters`) and after a state-dict
  load (`PeftModel.from_pretrained(..., is_trainable=True)`, `set_peft_model_state_dict`).
- Statistics, per layer and adapter, in training-mode forwards only (teacher forwards, evaluation and
  generation run in eval mode and are not counted): `expert_counts()` = activations since
  `reset_expert_counts()`, one per (routing unit, chosen expert), padding tokens excluded (sum = top_k x
  routed units); `balance_loss()` = Switch-Transformer loss E * sum_e f_e * P_e of the last training
  forward (f_e = share of its activations, P_e = mean full-softmax router probability; 1 when balanced).
- Activation checkpointing: `MoeLoraModel.checkpoint_context_fn` (torch checkpoint's `context_fn`) gives the
  recomputation in the backward the masks of its forward and keeps it out of the statistics.
- Not mergeable (the mix depends on the input): `merge_and_unload` raises.

Registered with PEFT through `peft.utils.register_peft_method` (PeftType gains MOE_LORA), so that
`get_peft_model`, `save_pretrained` and `PeftModel.from_pretrained` (after `import micl.adapters`) handle it.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MOE_LORA, MoeLoraConfig, MoeLoraConfigError
from .layer import MoeLoraLayer, MoeLoraLinear, RoutingContext
from .model import MoeLoraModel

__all__ = ["MoeLoraConfig", "MoeLoraConfigError", "MoeLoraLayer", "MoeLoraLinear", "MoeLoraModel",
           "RoutingContext", "moe_layers"]

if MOE_LORA not in PEFT_TYPE_TO_TUNER_MAPPING:  # a second import (e.g. importlib.reload) must not fail
    register_peft_method(name="moe_lora", config_cls=MoeLoraConfig, model_cls=MoeLoraModel, prefix="moe_lora_")


def moe_layers(model) -> dict[str, MoeLoraLayer]:
    """The MoeLoraLayer modules of any model (PeftModel, MultimodalLM, ...), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoeLoraLayer)}
