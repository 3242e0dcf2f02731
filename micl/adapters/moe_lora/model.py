"""MoeLoraModel: the PEFT tuner that puts MoeLoraLinear layers into any model (see the package docstring)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .config import MoeLoraConfig
from .layer import MoeLoraLayer, MoeLoraLinear, RoutingContext


class MoeLoraModel(BaseTuner):
    prefix: str = "moe_lora_"
    tuner_layer_cls = MoeLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs):
        self.routing_context = RoutingContext()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        self._install_context_hooks()

    # ---- the masks of the current call, for every layer ---------------------------------------------------
    def _install_context_hooks(self) -> None:
        """A forward pre-hook on the wrapped transformers model records attention_mask, labels and the length
        of the KV cache (also for the forwards that `generate` makes, which do not pass through this class); a
        forward hook clears them."""
        context = self.routing_context

        def before(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            context.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            labels = kwargs.get("labels")
            if labels is None:
                labels = context.given_labels
            context.labels = labels if isinstance(labels, torch.Tensor) else None
            context.cached_length = 0
            context.active = True
            for key in ("past_key_values", "cache"):
                cache = kwargs.get(key)
                if cache is not None and hasattr(cache, "get_seq_length"):
                    try:
                        context.cached_length = int(cache.get_seq_length())
                    except Exception:  # a cache type that cannot tell: treat as no cache
                        context.cached_length = 0
                    break

        def after(module, args, kwargs, output):
            context.clear()

        self.model.register_forward_pre_hook(before, with_kwargs=True)
        self.model.register_forward_hook(after, with_kwargs=True, always_call=True)
        for module in self.model.modules():
            if isinstance(module, MoeLoraLayer):
                module.routing_context = context

    @contextlib.contextmanager
    def labels_for_routing(self, labels: Optional[torch.Tensor]):
        """The labels of the forwards inside, for a caller that computes its loss itself and so calls the model
        without them (MultimodalLM): sample routing pools the prompt (label -100) as the docs promise, in
        training as in generation, rather than prompt and targets."""
        previous = self.routing_context.given_labels
        self.routing_context.given_labels = labels
        try:
            yield
        finally:
            self.routing_context.given_labels = previous

    def checkpoint_context_fn(self):
        """torch.utils.checkpoint's `context_fn` (non-reentrant): called at every checkpointed call in the
        forward, it saves the routing context of that call; the second context manager puts it back (with
        `replaying` set) while the backward recomputes the call, so the recomputation routes as the forward
        did and counts nothing (see RoutingContext). MultimodalLM.activation_checkpointing_enable passes it."""
        saved = self.routing_context.snapshot()
        return contextlib.nullcontext(), self.routing_context.replay(saved)

    # ---- BaseTuner ---------------------------------------------------------------------------------------
    def _check_new_adapter_config(self, config: MoeLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        config.validate()

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key=None,
                            **optional_kwargs):
        if current_key is None:
            raise ValueError("current_key must not be None")
        if isinstance(target, MoeLoraLinear):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"moe_lora: target module {current_key!r} is a {type(base).__name__}; only "
                            f"torch.nn.Linear is supported")
        new_module = MoeLoraLinear(target, adapter_name, config)
        new_module.routing_context = getattr(self, "routing_context", None)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    # ---- micl's helpers ----------------------------------------------------------------------------------
    def moe_layers(self) -> dict[str, MoeLoraLayer]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MoeLoraLayer)}

    def reset_expert_counts(self, adapter_name: Optional[str] = None) -> None:
        for layer in self.moe_layers().values():
            layer.reset_expert_counts(adapter_name)

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError("moe_lora cannot be merged: the experts' mix depends on the input (routing)")
