"""Harmony (modality-incremental learning, arXiv 2504.13218) for a multimodal LLM, as hooks.

Needs `lora.type: gated_lora` (micl/adapters/gated_lora: W = W0 + omega * scaling * B A per module).
Three parts, each mapped onto micl's model (LLM + gated LoRA + per-modality projectors); every choice the
paper leaves open is listed, with its reason, in docs/harmony.md.

1. Adaptive compatible feature modulation (`FeatureModulator`, attached to the model as its
   `media_modulator`, so it is trained, checkpointed and saved with every phase). At the end of each phase
   the mean and per-dimension standard deviation of that phase's projected media tokens are stored as the
   modality's prototype (a running, count-weighted combination if the modality comes again). A batch of
   media tokens x of modality m gets, for the prototype (p, s) of every modality h learned before m was
   first learned (`FeatureModulator.historical`), a historical-feature proxy

       proxy_h = x + lambda_g * (p + sum_k pi_k * c_k * s * z_k - x),   z_k ~ N(0, I),  pi = softmax(learned)

   i.e. current tokens moved by lambda_g towards a draw of a K-component Gaussian mixture centred on the
   prototype, components with scales c_k * s (c = 0.5, 1, 2) and learned mixing coefficients pi (a weighted
   sum of the K draws, so that pi gets gradients). At evaluation z = 0 (no noise: deterministic outputs).
2. Cumulative modal bridging. Token level: the current tokens attend to their historical proxies (all of
   them, concatenated) with a single-head cross-attention in a `fusion_dim` bottleneck, added through a
   gate tanh(a) initialised at 0 (the module starts as the identity): x' = x + tanh(a) * O(attn(Qx, KP, VP)).
   The same proxies at training and evaluation, so the first modality is never modulated. Parameter
   level: after each phase (on_task_end, before evaluation) the gated LoRA is folded into the base weights
   (`MultimodalLM.merge_low_rank`, saved and replayed by every phase folder) and a fresh adapter
   starts (A redrawn from a generator seeded by (seed, step), B = 0, gate at gate_init).
3. Hybrid alignment (extra_loss): for every media batch that got proxies, the mean-pooled fused tokens
   z_i are aligned to the mean-pooled proxies y_i of the same sample:
       lambda * (MSE(z, y) + lambda_con * InfoNCE(z, y) + lambda_dis * L_dis(z, y))
   InfoNCE: cosine similarities / temperature, positives = the same sample's proxy; L_dis: squared
   difference of the weighted batch mean and weighted batch standard deviation of z and y, weights =
   softmax over the batch of each z_i's cosine similarity to the prototype (samples already closer to the
   historical modality count more), detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..data.schema import STREAMS
from ..errors import ConfigError
from .base import ContinualMethod, StepContext, unwrap_model
from .registry import register

KEY = "method_args.harmony"
PROXIES = "harmony_proxies"  # MultimodalOutput.aux key: {modality: {historical modality: proxies [n, T, d]}}


@dataclass
class HarmonyArgs:
    num_components: int = field(default=3, metadata={"help": "K, Gaussian components of the perturbation (paper: 3)"})
    lambda_g: float = field(default=0.6, metadata={"help": "perturbation intensity (paper: 0.6)"})
    component_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0], metadata={
        "help": "std of component k = scale_k * the prototype's per-dimension std (one per component)"})
    fusion_dim: int = field(default=64, metadata={"help": "cross-attention bottleneck width"})
    lambda_align: float = field(default=1.5, metadata={"help": "lambda, weight of the hybrid alignment (paper: 1.5)"})
    lambda_con: float = field(default=0.8, metadata={"help": "weight of the contrastive term (paper: 0.8)"})
    lambda_dis: float = field(default=0.6, metadata={"help": "weight of the distribution term (paper: 0.6)"})
    temperature: float = field(default=0.1, metadata={"help": "temperature of the contrastive/weighting softmax"})
    prototype_samples: int | None = field(default=None, metadata={
        "help": "training samples per phase used for the prototype (null = all)"})
    merge_after_phase: bool = field(default=True, metadata={
        "help": "fold the gated LoRA into the base weights after each phase and start a fresh one"})


# ---- feature modulation ------------------------------------------------------------------------------
class FeatureModulator(nn.Module):
    """The media modulator of a MultimodalLM (micl/modeling/multimodal.py calls it on the projected tokens
    {modality: [n, T, dim]}). Prototypes are buffers (saved with the module), kept in the order the
    modalities were first learned; a modality with no historical prototype (see `historical`) passes
    through unchanged."""

    def __init__(self, dim: int, modalities: list[str] | tuple = (), num_components: int = 3, lambda_g: float = 0.6,
                 component_scales: list[float] | tuple = (0.5, 1.0, 2.0), fusion_dim: int = 64, seed: int = 0):
        super().__init__()
        if len(component_scales) != num_components:
            raise ConfigError(f"{KEY}.component_scales needs one value per component ({num_components}), "
                              f"got {list(component_scales)}")
        self.dim, self.fusion_dim, self.seed = int(dim), int(fusion_dim), int(seed)
        self.num_components, self.lambda_g = int(num_components), float(lambda_g)
        self.component_scales = [float(c) for c in component_scales]
        self.mix_logits = nn.Parameter(torch.zeros(num_components))
        self.query = nn.Linear(dim, fusion_dim, bias=False)
        self.key = nn.Linear(dim, fusion_dim, bias=False)
        self.value = nn.Linear(dim, fusion_dim, bias=False)
        self.out = nn.Linear(fusion_dim, dim, bias=False)
        self.fusion_gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: starts as the identity
        generator = torch.Generator().manual_seed(self.seed)  # independent of the global RNG
        with torch.no_grad():
            for linear in (self.query, self.key, self.value, self.out):
                bound = 1.0 / math.sqrt(linear.in_features)
                linear.weight.copy_(torch.empty(linear.weight.shape).uniform_(-bound, bound, generator=generator))
        self.modalities: list[str] = []
        for modality in modalities:
            self._add_buffers(modality, torch.zeros(dim), torch.ones(dim))

    def modulator_config(self) -> dict:
        return {"dim": self.dim, "modalities": list(self.modalities), "num_components": self.num_components,
                "lambda_g": self.lambda_g, "component_scales": self.component_scales, "fusion_dim": self.fusion_dim,
                "seed": self.seed}

    # ---- prototypes ------------------------------------------------------------------------------------
    def _add_buffers(self, modality: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.register_buffer(f"proto_mean_{modality}", mean.clone())
        self.register_buffer(f"proto_std_{modality}", std.clone())
        self.modalities.append(modality)

    @torch.no_grad()
    def set_prototype(self, modality: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        like = self.mix_logits
        mean, std = mean.to(like.device, like.dtype), std.to(like.device, like.dtype)
        if modality in self.modalities:
            getattr(self, f"proto_mean_{modality}").copy_(mean)
            getattr(self, f"proto_std_{modality}").copy_(std)
        else:
            self._add_buffers(modality, mean, std)

    def prototype(self, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"proto_mean_{modality}"), getattr(self, f"proto_std_{modality}")

    def historical(self, modality: str) -> list[str]:
        """The modalities historical to `modality`: those whose prototype was stored before `modality` was
        first learned (all stored ones while it is learned for the first time). Training and evaluation use
        the same rule, and the first modality is never modulated."""
        if modality in self.modalities:
            return self.modalities[: self.modalities.index(modality)]
        return list(self.modalities)

    # ---- proxies and fusion ------------------------------------------------------------------------------
    def mixing(self) -> torch.Tensor:
        """pi: the learned mixing coefficients (softmax, sum 1)."""
        return torch.softmax(self.mix_logits, dim=0)

    def proxies(self, x: torch.Tensor, modality: str, noise: bool | None = None) -> torch.Tensor:
        """Historical-feature proxies of x [n, T, dim] for the stored prototype of `modality`: with noise (in
        training) x + lambda_g * (p + sum_k pi_k c_k s z_k - x), without (evaluation) x + lambda_g * (p - x)."""
        noise = self.training if noise is None else noise
        mean, std = self.prototype(modality)
        target = mean.to(x.dtype).expand_as(x)
        if noise:
            pi = self.mixing().to(x.dtype)
            z = torch.randn((self.num_components, *x.shape), device=x.device, dtype=x.dtype)
            scales = torch.tensor(self.component_scales, device=x.device, dtype=x.dtype)
            weights = (pi * scales).view(-1, *([1] * x.dim()))
            target = target + std.to(x.dtype) * (weights * z).sum(0)
        return x + self.lambda_g * (target - x)

    def fuse(self, x: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
        """x' = x + tanh(gate) * O(softmax(Q x (K P)^T / sqrt(d)) V P); x [n, T, d], proxies [n, S, d]."""
        q, k, v = self.query(x), self.key(proxies), self.value(proxies)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.fusion_dim), dim=-1)
        return x + torch.tanh(self.fusion_gate).to(x.dtype) * self.out(attention @ v)

    def forward(self, projected: dict[str, torch.Tensor], media_rows=None, media_tasks=None,
                aux: dict | None = None) -> dict[str, torch.Tensor]:
        """The fused tokens; in training with gradients, the proxies of every modulated modality go into
        `aux[PROXIES]` (the alignment loss pairs them with the fused tokens, MultimodalOutput.media_tokens)."""
        record = aux is not None and self.training and torch.is_grad_enabled()
        result = {}
        for modality, x in projected.items():
            others = self.historical(modality)
            if not others:
                result[modality] = x
                continue
            proxies = [self.proxies(x, h) for h in others]
            fused = self.fuse(x, torch.cat(proxies, dim=1))
            if record:
                aux.setdefault(PROXIES, {})[modality] = dict(zip(others, proxies))
            result[modality] = fused
        return result


# ---- hybrid alignment --------------------------------------------------------------------------------
def alignment_terms(z: torch.Tensor, y: torch.Tensor, prototype: torch.Tensor, temperature: float = 0.1) -> dict:
    """MSE, InfoNCE and distribution-level terms between current features z [n, d] and proxies y [n, d]."""
    z, y = z.float(), y.float()
    mse = F.mse_loss(z, y)
    logits = F.normalize(z, dim=-1) @ F.normalize(y, dim=-1).T / temperature
    contrastive = F.cross_entropy(logits, torch.arange(z.shape[0], device=z.device))
    with torch.no_grad():
        w = torch.softmax(F.cosine_similarity(z, prototype.float().expand_as(z), dim=-1) / temperature, dim=0)
    w = w.unsqueeze(1)
    mean_z, mean_y = (w * z).sum(0), (w * y).sum(0)
    std_z = ((w * (z - mean_z) ** 2).sum(0) + 1e-8).sqrt()
    std_y = ((w * (y - mean_y) ** 2).sum(0) + 1e-8).sqrt()
    distribution = F.mse_loss(mean_z, mean_y) + F.mse_loss(std_z, std_y)
    return {"mse": mse, "contrastive": contrastive, "distribution": distribution}


def hybrid_alignment_loss(z, y, prototype, lambda_align=1.5, lambda_con=0.8, lambda_dis=0.6, temperature=0.1):
    t = alignment_terms(z, y, prototype, temperature)
    return lambda_align * (t["mse"] + lambda_con * t["contrastive"] + lambda_dis * t["distribution"])


# ---- the method --------------------------------------------------------------------------------------

@register
class Harmony(ContinualMethod):
    name = "harmony"
    Args = HarmonyArgs
    requires_tuner = "gated_lora"
    supports_zero3 = False  # merges the adapter into partitioned base weights
    uses_media_modulator = True

    def __init__(self, args: HarmonyArgs | None = None):
        super().__init__(args or HarmonyArgs())
        a = self.args
        if a.num_components < 1:
            raise ConfigError(f"{KEY}.num_components must be >= 1, got {a.num_components}")
        if len(a.component_scales) != a.num_components or any(c <= 0 for c in a.component_scales):
            raise ConfigError(f"{KEY}.component_scales needs {a.num_components} positive values (one per "
                              f"component), got {a.component_scales}")
        if not 0.0 <= a.lambda_g <= 1.0:
            raise ConfigError(f"{KEY}.lambda_g must be in [0, 1], got {a.lambda_g}")
        if min(a.lambda_align, a.lambda_con, a.lambda_dis) < 0:
            raise ConfigError(f"{KEY}: lambda_align, lambda_con and lambda_dis must be >= 0")
        if a.temperature <= 0 or a.fusion_dim < 1:
            raise ConfigError(f"{KEY}: temperature must be > 0 and fusion_dim >= 1")
        if a.prototype_samples is not None and a.prototype_samples < 1:
            raise ConfigError(f"{KEY}.prototype_samples must be >= 1 or null, got {a.prototype_samples}")
        # modality -> {"mean", "std", "count"} (float32 CPU), over every phase of that modality so far
        self.prototypes: dict[str, dict] = {}
        self.merges = 0

    # ---- checks ------------------------------------------------------------------------------------------
    @staticmethod
    def _adapter(model) -> str:
        from ..adapters.gated_lora import GatedLoraConfig

        peft_model = model.llm
        config = getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", None))
        if not isinstance(config, GatedLoraConfig):
            kind = getattr(config, "peft_type", None)
            raise ConfigError(f"method 'harmony' needs 'lora.type: gated_lora' (its gated adapter is merged after "
                              f"each phase); the model's adapter is {getattr(kind, 'value', kind)!r}")
        return peft_model.active_adapter

    # ---- hooks -------------------------------------------------------------------------------------------
    def on_task_start(self, ctx: StepContext) -> None:
        model = unwrap_model(ctx.model)
        self._adapter(model)
        modulator = model.media_modulator
        if modulator is None:
            a = self.args
            modulator = FeatureModulator(model.llm.get_input_embeddings().embedding_dim, (), a.num_components,
                                         a.lambda_g, a.component_scales, a.fusion_dim, seed=ctx.seed)
            model.set_media_modulator(modulator)
        elif not isinstance(modulator, FeatureModulator):
            raise ConfigError(f"method 'harmony': the model already has a media modulator of another kind "
                              f"({type(modulator).__name__})")
        for modality, proto in self.prototypes.items():  # the method state is the source of the prototypes
            modulator.set_prototype(modality, proto["mean"], proto["std"])

    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        """The hybrid alignment of the main forward's fused tokens with their historical proxies."""
        records = (outputs.aux or {}).get(PROXIES)
        if not records or self.args.lambda_align == 0:
            return None
        modulator = unwrap_model(ctx.model if ctx is not None and ctx.model is not None else model).media_modulator
        a, losses = self.args, []
        for modality, proxies_of in records.items():
            z = outputs.media_tokens[modality].mean(1)
            for historical, proxies in proxies_of.items():
                prototype = modulator.prototype(historical)[0]
                losses.append(hybrid_alignment_loss(z, proxies.mean(1), prototype, a.lambda_align, a.lambda_con,
                                                    a.lambda_dis, a.temperature))
        return torch.stack(losses).mean() if losses else None

    def on_task_end(self, ctx: StepContext) -> None:
        model = unwrap_model(ctx.model)
        for modality in STREAMS[ctx.task.modality]:  # a video with its sound updates both prototypes
            self._update_prototype(model, ctx, modality)
        modulator = model.media_modulator
        for modality, proto in self.prototypes.items():
            modulator.set_prototype(modality, proto["mean"], proto["std"])
        if self.args.merge_after_phase:
            from ..adapters.gated_lora import low_rank_factors, reset_gated_lora

            adapter = self._adapter(model)
            model.merge_low_rank(low_rank_factors(model.llm, adapter))
            reset_gated_lora(model.llm, adapter, seed=ctx.seed * 1_000_003 + ctx.step)
            self.merges += 1

    @torch.no_grad()
    def _update_prototype(self, model, ctx: StepContext, modality: str) -> None:
        dataset = ctx.train_dataset
        if modality not in model.projectors or not len(dataset):
            return
        indices = list(range(len(dataset)))
        if self.args.prototype_samples is not None:
            indices = indices[: self.args.prototype_samples]
        projector = model.projectors[modality]
        was_training = projector.training
        projector.eval()
        total, total_sq, count = None, None, 0
        dtype, device = next(projector.parameters()).dtype, next(projector.parameters()).device
        try:
            for start in range(0, len(indices), 32):
                chunk = [dataset.features[i][modality] for i in indices[start:start + 32]]
                tokens = torch.cat([projector(f.to(device, dtype).unsqueeze(0)).flatten(0, -2) for f in chunk])
                tokens = tokens.cpu().double()  # accumulated in float64 on the CPU
                total = tokens.sum(0) if total is None else total + tokens.sum(0)
                total_sq = (tokens ** 2).sum(0) if total_sq is None else total_sq + (tokens ** 2).sum(0)
                count += tokens.shape[0]
        finally:
            projector.train(was_training)
        mean, mean_sq = total / count, total_sq / count
        old = self.prototypes.get(modality)
        if old is not None:  # pooled over the phases of this modality
            n = old["count"]
            old_sq = old["std"].double() ** 2 + old["mean"].double() ** 2
            mean = (old["mean"].double() * n + mean * count) / (n + count)
            mean_sq = (old_sq * n + mean_sq * count) / (n + count)
            count += n
        std = (mean_sq - mean ** 2).clamp(min=0).sqrt()
        self.prototypes[modality] = {"mean": mean.float(), "std": std.float(), "count": count}

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"prototypes": {m: dict(p) for m, p in self.prototypes.items()}, "merges": self.merges}

    def load_state_dict(self, state: dict) -> None:
        state = state or {}
        self.prototypes = {m: {"mean": p["mean"].float().clone(), "std": p["std"].float().clone(),
                               "count": int(p["count"])} for m, p in state.get("prototypes", {}).items()}
        self.merges = int(state.get("merges", 0))
