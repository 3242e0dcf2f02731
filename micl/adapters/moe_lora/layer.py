"""MoeLoraLayer / MoeLoraLinear: E LoRA experts + a router on one nn.Linear (see the package docstring)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Optional

import torch
from torch import nn

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer

from .config import MoeLoraConfig


class RoutingContext:
    """What the layers of one model need to know about the current forward call, set by a forward pre-hook on
    the wrapped transformers model (`MoeLoraModel`): the attention mask (padding is not counted and, with
    sample routing, not pooled) and the labels (sample routing pools the prompt: label -100), passed to the
    model or, by a caller that computes its loss itself, given through `MoeLoraModel.labels_for_routing`.

    Under activation checkpointing the decoder layers run again in the backward, after the model's forward has
    returned and cleared the context. `MoeLoraModel.checkpoint_context_fn` (torch.utils.checkpoint's
    `context_fn`) saves the context of every checkpointed call and puts it back for its recomputation with
    `replaying` set: the recomputed routing equals the forward's, and the statistics are not counted twice."""

    def __init__(self):
        self.attention_mask: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.given_labels: Optional[torch.Tensor] = None  # for callers that compute the loss themselves
        self.cached_length = 0  # positions already in the KV cache (> 0: incremental decoding)
        self.active = False  # inside a forward of the wrapped model
        self.replaying = False  # inside a checkpointed layer's recomputation in the backward

    def clear(self) -> None:
        self.attention_mask = None
        self.labels = None
        self.cached_length = 0
        self.active = False

    def snapshot(self) -> tuple:
        return self.attention_mask, self.labels, self.cached_length, self.active

    @contextmanager
    def replay(self, saved: tuple):
        """The context of a checkpointed call, for its recomputation (see the class docstring)."""
        previous, was_replaying = self.snapshot(), self.replaying
        self.attention_mask, self.labels, self.cached_length, self.active = saved
        self.replaying = True
        try:
            yield
        finally:
            self.attention_mask, self.labels, self.cached_length, self.active = previous
            self.replaying = was_replaying


class ExpertRouter(nn.Linear):
    """The router (Linear in -> E, no bias). The rows of frozen experts enter the logits detached: they get
    an exact zero gradient, so the logits a frozen expert gets for any input stay as they were."""

    def forward(self, x: torch.Tensor, frozen: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight
        if frozen is not None:
            weight = torch.where(frozen.to(weight.device).unsqueeze(-1), weight.detach(), weight)
        return nn.functional.linear(x, weight)


class MoeLoraLayer(BaseTunerLayer):
    # trainable adapter weights, keyed by adapter name: per expert one A (r x in) and one B (out x r) parameter
    adapter_layer_names = ("moe_lora_A", "moe_lora_B", "moe_lora_router")
    other_param_names = ("r", "lora_alpha", "scaling", "num_experts", "top_k", "routing", "moe_lora_dropout",
                         "moe_lora_frozen")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.top_k: dict[str, int] = {}
        self.routing: dict[str, str] = {}
        self.moe_lora_A = nn.ModuleDict({})  # adapter -> ParameterList of E tensors [r, in]
        self.moe_lora_B = nn.ModuleDict({})  # adapter -> ParameterList of E tensors [out, r]
        self.moe_lora_router = nn.ModuleDict({})  # adapter -> ExpertRouter(in, E)
        self.moe_lora_dropout = nn.ModuleDict({})
        # saved with the adapter: which experts are frozen (bool [E]); re-applied by set_adapter
        self.moe_lora_frozen = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.routing_context: Optional[RoutingContext] = None
        # statistics (not saved): per adapter, expert activation counts since the last reset, the last
        # training forward's load-balancing loss, and (sample routing) the prefill's routing for decoding
        self._counts: dict[str, torch.Tensor] = {}
        self._units: dict[str, torch.Tensor] = {}
        self._balance: dict[str, torch.Tensor] = {}
        self._decode_routing: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"moe_lora adapts torch.nn.Linear only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    # ---- construction -----------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: MoeLoraConfig, **kwargs: Any) -> None:
        r, E = config.r, config.num_experts
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.num_experts[adapter_name] = E
        self.top_k[adapter_name] = config.top_k
        self.routing[adapter_name] = config.routing
        self.moe_lora_A[adapter_name] = nn.ParameterList(
            [nn.Parameter(torch.empty(r, self.in_features)) for _ in range(E)])
        self.moe_lora_B[adapter_name] = nn.ParameterList(
            [nn.Parameter(torch.empty(self.out_features, r)) for _ in range(E)])
        self.moe_lora_router[adapter_name] = ExpertRouter(self.in_features, E, bias=False)
        self.moe_lora_dropout[adapter_name] = (nn.Dropout(config.lora_dropout) if config.lora_dropout > 0
                                               else nn.Identity())
        self.moe_lora_frozen[adapter_name] = torch.zeros(E, dtype=torch.bool)
        self.reset_parameters(adapter_name, config)
        self.reset_expert_counts(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_parameters(self, adapter_name: str, config: MoeLoraConfig) -> None:
        with torch.no_grad():
            for A in self.moe_lora_A[adapter_name]:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            for B in self.moe_lora_B[adapter_name]:
                if config.init_weights:
                    nn.init.zeros_(B)
                else:
                    nn.init.normal_(B, std=0.02)
            nn.init.normal_(self.moe_lora_router[adapter_name].weight, std=config.router_init_std)

    # ---- freezing ----------------------------------------------------------------------------------------
    def _adapter(self, adapter_name: Optional[str]) -> str:
        if adapter_name is None:
            adapter_name = self.active_adapters[0]
        if adapter_name not in self.moe_lora_A:
            raise KeyError(f"moe_lora: no adapter {adapter_name!r} here; have {sorted(self.moe_lora_A)}")
        return adapter_name

    def freeze_experts(self, ids: Iterable[int], adapter_name: Optional[str] = None) -> None:
        """Freezes experts (requires_grad False on their A and B; recorded in the saved `moe_lora_frozen`
        buffer and re-applied whenever PEFT re-enables the adapter's gradients). A frozen expert is still
        routed to. Its router row enters the logits detached (`ExpertRouter`), so the logit it gets for an
        input does not move; the other experts' rows keep training."""
        name = self._adapter(adapter_name)
        E = self.num_experts[name]
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < E]
        if bad:
            raise ValueError(f"moe_lora: expert ids {bad} out of range 0..{E - 1}")
        if ids:
            self.moe_lora_frozen[name][torch.tensor(ids, dtype=torch.long)] = True
        self._apply_frozen(name)

    def frozen_experts(self, adapter_name: Optional[str] = None) -> list[int]:
        name = self._adapter(adapter_name)
        return [int(i) for i in torch.nonzero(self.moe_lora_frozen[name]).flatten().tolist()]

    def _apply_frozen(self, adapter_name: str) -> None:
        if adapter_name not in self.moe_lora_frozen:
            return
        for e in torch.nonzero(self.moe_lora_frozen[adapter_name]).flatten().tolist():
            self.moe_lora_A[adapter_name][e].requires_grad_(False)
            self.moe_lora_B[adapter_name][e].requires_grad_(False)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        super()._freeze_non_trainable_peft_weights(adapter_names)
        if adapter_names is None:
            adapter_names = list(self.moe_lora_frozen.keys())
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for name in adapter_names:
            self._apply_frozen(name)

    # ---- statistics --------------------------------------------------------------------------------------
    def reset_expert_counts(self, adapter_name: Optional[str] = None) -> None:
        names = [adapter_name] if adapter_name is not None else list(self.moe_lora_A)
        for name in names:
            self._counts[name] = torch.zeros(self.num_experts[name], dtype=torch.float64)  # exact far past 2^24
            self._units[name] = torch.zeros((), dtype=torch.float64)

    def expert_counts(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """Expert activations since the last reset (CPU int64 [E]): one per (routing unit, chosen expert),
        counted in training-mode forwards only; a routing unit is a non-padding token (token routing) or a
        sample (sample routing). The sum is top_k x the units routed."""
        name = self._adapter(adapter_name)
        return self._counts[name].cpu().round().long()

    def expert_statistics(self, adapter_name: Optional[str] = None) -> dict:
        """Counts and routed units since the last reset, exactly (float64), to be restored with
        `load_expert_statistics` (a step resumed from a checkpoint continues counting)."""
        name = self._adapter(adapter_name)
        return {"counts": self._counts[name].detach().cpu().clone(), "units": self._units[name].detach().cpu().clone()}

    def load_expert_statistics(self, statistics: dict, adapter_name: Optional[str] = None) -> None:
        name = self._adapter(adapter_name)
        self._counts[name] = statistics["counts"].double().clone()
        self._units[name] = statistics["units"].double().clone()

    def routed_units(self, adapter_name: Optional[str] = None) -> int:
        return int(round(float(self._units[self._adapter(adapter_name)])))

    def balance_loss(self, adapter_name: Optional[str] = None) -> Optional[torch.Tensor]:
        """Switch-Transformer load-balancing loss of the last training-mode forward: E * sum_e f_e * P_e,
        f_e = share of that forward's expert activations that went to e, P_e = mean router probability
        (softmax over all E) of e; over the forward's routing units. 1 when perfectly balanced."""
        return self._balance.get(self._adapter(adapter_name))

    # ---- forward ------------------------------------------------------------------------------------------
    def _masks(self, lead: torch.Size):
        """(attention mask, prompt mask) of the current call as bool [B, T], when they fit x's shape."""
        ctx = self.routing_context
        if ctx is None or len(lead) != 2:
            return None, None, False
        mask = ctx.attention_mask
        incremental = ctx.cached_length > 0  # KV-cached decoding: earlier positions are in the cache
        if mask is None:
            return None, None, incremental
        incremental = incremental or mask.shape[-1] > lead[1]  # the mask covers earlier positions too
        if tuple(mask.shape) != tuple(lead):
            return None, None, incremental
        mask = mask.bool()
        prompt = mask
        if ctx.labels is not None and tuple(ctx.labels.shape) == tuple(lead):
            prompt = mask & (ctx.labels == -100)
            prompt = torch.where(prompt.any(-1, keepdim=True), prompt, mask)  # no prompt token: all of it
        return mask, prompt, incremental

    def _route(self, name: str, x: torch.Tensor, flat: torch.Tensor):
        """Top-k expert ids and weights per token ([N, k] each), then for the statistics: the router logits
        of the routing units (None when decoding reuses the prefill's routing), their chosen ids and which
        of them count (None: all)."""
        router, frozen = self.moe_lora_router[name], self.moe_lora_frozen[name]
        k = self.top_k[name]
        lead = x.shape[:-1]
        mask, prompt, incremental = self._masks(lead)
        if self.routing[name] == "sample" and len(lead) == 2:
            B, T = lead
            cached = self._decode_routing.get(name)
            if incremental and not self.training and cached is not None and cached[0].shape[0] == B:
                ids, weights = cached  # decoding: the prompt's routing, decided at the prefill
                logits, valid = None, None
            else:
                pool = prompt if prompt is not None else torch.ones(lead, dtype=torch.bool, device=x.device)
                m = pool.unsqueeze(-1).to(flat.dtype)
                pooled = (flat.view(B, T, -1) * m).sum(1) / m.sum(1).clamp(min=1.0)
                logits = router(pooled, frozen)  # [B, E]
                top, ids = logits.topk(k, dim=-1)
                weights = torch.softmax(top.float(), dim=-1).to(flat.dtype)
                valid = None
                if not self.training:
                    self._decode_routing[name] = (ids.detach(), weights.detach())
            ids_t = ids.unsqueeze(1).expand(B, T, k).reshape(-1, k)
            weights_t = weights.unsqueeze(1).expand(B, T, k).reshape(-1, k)
            return ids_t, weights_t, logits, ids, valid
        logits = router(flat, frozen)  # [N, E]
        top, ids = logits.topk(k, dim=-1)
        weights = torch.softmax(top.float(), dim=-1).to(flat.dtype)
        valid = mask.reshape(-1) if mask is not None else None
        return ids, weights, logits, ids, valid

    def _counts_this_call(self) -> bool:
        """Whether a training-mode call is counted: not when it recomputes a checkpointed layer in the backward
        (the forward counted it). A call after the model's forward returned that is not such a replay is a
        recomputation without the saved context (checkpointing enabled without `checkpoint_context_fn`, or
        reentrant): its masks are gone, so its routing could differ from the forward's; refused."""
        ctx = self.routing_context
        if ctx is None or ctx.active:
            return not (ctx is not None and ctx.replaying)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "moe_lora: a layer ran outside the model's forward, as a gradient-checkpointing recomputation does "
                "without the routing context; enable checkpointing through MultimodalLM.activation_checkpointing_"
                "enable, or pass context_fn=<MoeLoraModel>.checkpoint_context_fn with use_reentrant=False")
        return True

    def _record(self, name: str, logits, unit_ids, valid, keep: bool = True) -> None:
        """Counts and load-balancing loss of a training-mode forward (see expert_counts / balance_loss).
        Masking by weights, not by indexing, and counts kept on the device: no host synchronisation. A
        checkpointed layer's recomputation (`keep` False) runs the same operations (the checkpoint checks
        that it saves the same tensors as the forward) and keeps nothing."""
        if logits is None:
            return
        E, k = self.num_experts[name], self.top_k[name]
        weight = (valid.to(torch.float32) if valid is not None
                  else torch.ones(unit_ids.shape[0], device=logits.device))
        counts = torch.zeros(E, device=logits.device).index_add_(
            0, unit_ids.reshape(-1), weight.repeat_interleave(k))
        units = weight.sum()
        f = counts / (units * k).clamp(min=1.0)
        P = (torch.softmax(logits.float(), dim=-1) * weight.unsqueeze(-1)).sum(0) / units.clamp(min=1.0)
        balance = E * (f * P).sum()
        if not keep:
            return
        self._counts[name] = self._counts[name].to(counts.device) + counts.detach().double()
        self._units[name] = self._units[name].to(counts.device) + units.detach().double()
        self._balance[name] = balance

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """sum over the chosen experts of w * scaling * B_e A_e x, as two dense GEMMs over the stacked
        experts (inner size E*r) with the unchosen experts' slots zeroed by the gate: exact top-k, no Python
        loop over tokens or experts (docs/moe_lora.md, "Computation")."""
        A_list, B_list = self.moe_lora_A[name], self.moe_lora_B[name]
        E, r = self.num_experts[name], self.r[name]
        dtype = A_list[0].dtype
        flat = x.to(dtype).reshape(-1, self.in_features)
        N = flat.shape[0]
        ids, weights, logits, unit_ids, valid = self._route(name, x, flat)
        if self.training:
            self._record(name, logits, unit_ids, valid, keep=self._counts_this_call())
        gate = torch.zeros(N, E, dtype=dtype, device=flat.device).scatter(1, ids, weights * self.scaling[name])
        A = torch.stack(tuple(A_list)).reshape(E * r, self.in_features)  # rows e*r .. e*r+r-1 = A_e
        B = torch.stack(tuple(B_list), dim=1).reshape(self.out_features, E * r)  # columns likewise = B_e
        hidden = self.moe_lora_dropout[name](flat) @ A.t()  # [N, E*r]
        hidden = (hidden.view(N, E, r) * gate.unsqueeze(-1)).view(N, E * r)
        return (hidden @ B.t()).view(*x.shape[:-1], self.out_features)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("moe_lora cannot be merged into the base weights: the experts' mix depends on "
                                  "the input (routing)")

    def unmerge(self) -> None:
        return None

    def get_delta_weight(self, adapter) -> torch.Tensor:
        raise NotImplementedError("moe_lora has no single delta weight (routing depends on the input)")


def _reapply_frozen(module: MoeLoraLayer, incompatible_keys) -> None:
    module._freeze_non_trainable_peft_weights()


class MoeLoraLinear(nn.Module, MoeLoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoeLoraConfig, **kwargs) -> None:
        super().__init__()
        MoeLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        # a loaded `moe_lora_frozen` buffer (PeftModel.from_pretrained(..., is_trainable=True),
        # set_peft_model_state_dict) takes effect at once, not only at the next set_adapter
        self.register_load_state_dict_post_hook(_reapply_frozen)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.moe_lora_A:
                result = result + self._delta(name, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "moe_lora." + super().__repr__()
