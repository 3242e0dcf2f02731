"""Harmony (modality-incremental learning, arXiv 2504.13218) for a multimodal LLM, as hooks.

Needs `lora.type: gated_lora` (micl/adapters/gated_lora: W = W0 + omega * scaling * B A per module, omega
starting at 1, plain LoRA's scale). The paper's parts, mapped onto micl's model (LLM + gated LoRA +
per-modality projectors); every choice the paper leaves open is listed, with its reason, in docs/harmony.md.

1. Prototypes (`prototype_bank`, at the end of every phase with media). The paper's semantic prototypes
   are the historical classifier's weights, one per class; an LLM has no class head, so the old task's
   media tokens as they enter the LLM (projector + media modulator, evaluation mode) are mean-pooled per
   sample and clustered by a seeded k-means (`num_prototypes` clusters): the prototypes are the cluster
   centres, with each cluster's per-dimension spread and size, the task's mean per-position token offset
   (its token layout), and the (instruction, answer) pairs of the members nearest each centre: the old
   task's prompt. One bank per finished task, kept in the method state.
2. Adaptive compatible feature modulation. A historical proxy of an old task = current tokens x moved by
   lambda_g towards a draw of a K-component Gaussian mixture around one of its cluster prototypes p_c:
       proxy = x~ + lambda_g * (p_c + layout + sum_k pi_k * c_k * s_c * z_k - x~),   z_k ~ N(0, I)
   with x~ the current tokens resampled to the old modality's token count, s_c the cluster's spread,
   c = component_scales and pi = softmax(learned logits) the mixing coefficients.
3. Hybrid alignment through the previous-phase model (`auxiliary_losses`). Every training batch from the
   second phase on adds `proxy_num` rows: an old task's prompt (its instruction template and a stored
   instruction/answer of the drawn cluster) with a proxy as its media, fed as LLM-input tokens to the
   previous phase's model (the shared teacher, micl/methods/teacher.py) and to the current one. The loss
   pulls the current model to the previous one on them:
       lambda * (lambda_kl * T^2 KL(teacher || student) on the answer tokens
                 + MSE(h_s, h_t) + lambda_con * L_con(h_s, h_t) + lambda_dis * L_dis(h_s, h_t))
   h = the LLM's final hidden states mean-pooled over each row's tokens. Every term is zero when the
   student equals the teacher (`alignment_terms`).
4. Cumulative modal bridging. Token level (`FeatureModulator`, the model's media modulator): each
   modality's tokens attend, through a fusion module of that modality (cross-attention in a `fusion_dim`
   bottleneck, added through tanh(gate) starting at 0), to the pooled proxies of every cluster of the
   banks learned before that modality was first learned; its mixing coefficients learn through it.
   Parameter level: after each phase the gated LoRA is folded into the base weights
   (`MultimodalLM.merge_low_rank`, replayed by every phase folder) and a fresh adapter starts (A redrawn
   from a generator seeded by (seed, step), B = 0, gate at gate_init), so the teacher of the next phase,
   a copy of that fresh adapter over the merged base, is the previous phase's model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..data.prompts import render_instruction
from ..data.schema import STREAMS
from ..errors import ConfigError, MiclError
from .base import ContinualMethod, StepContext, TokenSum, batch_rng, draw_key, unwrap_model
from .distill import kd_loss_sum, target_prediction_mask
from .media_passes import projected_media
from .registry import register
from .teacher import PreviousModelTeacher

KEY = "method_args.harmony"
PROXY_ITEMS = "harmony.proxy"  # the proxies' answer tokens: what the KL is normalised by


@dataclass
class HarmonyArgs:
    num_components: int = field(default=3, metadata={"help": "K, Gaussian components of the perturbation (paper: 3)"})
    lambda_g: float = field(default=0.6, metadata={"help": "perturbation intensity (paper: 0.6)"})
    component_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0], metadata={
        "help": "std of component k = scale_k * the cluster's per-dimension spread (one per component)"})
    num_prototypes: int = field(default=8, metadata={
        "help": "clusters (prototypes) per finished task: k-means of its pooled media tokens"})
    prototype_texts: int = field(default=4, metadata={
        "help": "(instruction, answer) pairs kept per cluster, from the members nearest its centre"})
    prototype_samples: int | None = field(default=None, metadata={
        "help": "training samples per phase clustered into prototypes (null = all)"})
    proxy_num: int = field(default=4, metadata={"help": "proxy rows (old prompts with proxy media) per batch"})
    fusion_dim: int = field(default=64, metadata={"help": "cross-attention bottleneck width"})
    lambda_align: float = field(default=1.5, metadata={"help": "lambda, weight of the hybrid alignment (paper: 1.5)"})
    lambda_kl: float = field(default=1.0, metadata={"help": "weight of the output KL inside the alignment"})
    lambda_con: float = field(default=0.8, metadata={"help": "weight of the contrastive term (paper: 0.8)"})
    lambda_dis: float = field(default=0.6, metadata={"help": "weight of the distribution term (paper: 0.6)"})
    temperature: float = field(default=0.1, metadata={"help": "temperature of the contrastive/weighting softmax"})
    kl_temperature: float = field(default=2.0, metadata={"help": "T of the output KL"})
    merge_after_phase: bool = field(default=True, metadata={
        "help": "fold the gated LoRA into the base weights after each phase and start a fresh one"})


# ---- prototypes ----------------------------------------------------------------------------------------
def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 100) -> torch.Tensor:
    """Cluster index of every row of `points` [n, d]: k-means++ seeding from a generator seeded with `seed`,
    then Lloyd's iterations, in float64 on the CPU (deterministic). Empty clusters are dropped and the
    indices renumbered in order of first appearance, so they are 0..C-1 with C <= k."""
    points = points.detach().double().cpu()
    generator = torch.Generator().manual_seed(seed)
    centres = [points[int(torch.randint(len(points), (1,), generator=generator))]]
    for _ in range(1, min(k, len(points))):
        distance = torch.cdist(points, torch.stack(centres)).pow(2).min(1).values
        if distance.sum() <= 0:  # fewer distinct points than k
            break
        centres.append(points[int(torch.multinomial(distance / distance.sum(), 1, generator=generator))])
    centres = torch.stack(centres)
    assignment = None
    for _ in range(iterations):
        nearest = torch.cdist(points, centres).argmin(1)
        if assignment is not None and torch.equal(nearest, assignment):
            break
        assignment = nearest
        for c in range(len(centres)):
            members = points[assignment == c]
            if len(members):
                centres[c] = members.mean(0)
    order = {int(c): i for i, c in enumerate(dict.fromkeys(assignment.tolist()))}
    return torch.tensor([order[int(c)] for c in assignment], dtype=torch.long)


def resample_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """[n, T, d] -> [n, length, d], linear interpolation along the tokens (the identity when T == length)."""
    if x.shape[1] == length:
        return x
    return F.interpolate(x.transpose(1, 2), size=length, mode="linear", align_corners=True).transpose(1, 2)


def prototype_bank(tokens: dict[str, torch.Tensor], samples: list[dict], task, num_prototypes: int,
                   num_texts: int, seed: int) -> dict:
    """The prototypes of one finished task. `tokens`: {stream: [n, T, d]} its samples' media tokens as they
    enter the LLM; `samples`: the n samples (their `instruction` and `target`). Clusters come from k-means
    on the samples' pooled tokens (the streams' pools side by side); per stream and cluster the centre
    (mean pooled token) and spread (per-dimension std of the members' tokens around centre + layout), per
    stream the layout (mean offset of each token position from its sample's pool)."""
    streams = list(tokens)
    pooled = {s: tokens[s].double().mean(1) for s in streams}
    assignment = kmeans(torch.cat([pooled[s] for s in streams], dim=1), num_prototypes, seed)
    clusters = int(assignment.max()) + 1
    members = [(assignment == c).nonzero().flatten() for c in range(clusters)]
    centres, spread, layout = {}, {}, {}
    for s in streams:
        x = tokens[s].double()
        layout[s] = (x - pooled[s][:, None]).mean(0)
        centres[s] = torch.stack([pooled[s][m].mean(0) for m in members])
        residual = x - centres[s][assignment][:, None] - layout[s]
        spread[s] = torch.stack([residual[m].pow(2).mean((0, 1)).sqrt() for m in members])
    joint = torch.cat([pooled[s] for s in streams], dim=1)
    joint_centres = torch.cat([centres[s] for s in streams], dim=1)
    texts = []
    for c, m in enumerate(members):
        nearest = m[(joint[m] - joint_centres[c]).norm(dim=1).argsort(stable=True)][:num_texts]
        texts.append([[samples[i].get("instruction") or "", samples[i]["target"]] for i in nearest.tolist()])
    return {"task": task.name, "task_type": task.task_type, "modality": task.modality, "streams": streams,
            "centres": {s: v.float() for s, v in centres.items()}, "spread": {s: v.float() for s, v in spread.items()},
            "layout": {s: v.float() for s, v in layout.items()},
            "sizes": torch.tensor([len(m) for m in members], dtype=torch.long), "texts": texts}


def historical_proxy(base: torch.Tensor, centre: torch.Tensor, spread: torch.Tensor, lambda_g: float,
                     weights: torch.Tensor | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
    """base + lambda_g * (centre + sum_k weights_k * spread * z_k - base), the mixture draw around the
    prototype `centre` (broadcast against `base`); `weights` = pi_k * c_k [K], `z` [K, *base.shape]
    (None: no noise)."""
    target = centre
    if z is not None:
        target = target + spread * (weights.view(-1, *([1] * (z.dim() - 1))) * z).sum(0)
    return base + lambda_g * (target - base)


# ---- token-level bridging: the media modulator ----------------------------------------------------------
class Fusion(nn.Module):
    """x' = x + tanh(gate) * O(softmax(Q x (K P)^T / sqrt(d)) V P): one modality's tokens x [n, T, dim]
    attend to historical proxies P [n, S, dim]; gate 0 at start, so the module begins as the identity."""

    def __init__(self, dim: int, fusion_dim: int, seed: int):
        super().__init__()
        self.fusion_dim = fusion_dim
        self.query = nn.Linear(dim, fusion_dim, bias=False)
        self.key = nn.Linear(dim, fusion_dim, bias=False)
        self.value = nn.Linear(dim, fusion_dim, bias=False)
        self.out = nn.Linear(fusion_dim, dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))
        generator = torch.Generator().manual_seed(seed)  # independent of the global RNG
        with torch.no_grad():
            for linear in (self.query, self.key, self.value, self.out):
                bound = 1.0 / math.sqrt(linear.in_features)
                linear.weight.copy_(torch.empty(linear.weight.shape).uniform_(-bound, bound, generator=generator))

    def forward(self, x: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(proxies), self.value(proxies)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.fusion_dim), dim=-1)
        return x + torch.tanh(self.gate).to(x.dtype) * self.out(attention @ v)


class FeatureModulator(nn.Module):
    """The media modulator of a MultimodalLM (micl/modeling/multimodal.py calls it on the projected tokens
    {modality: [n, T, dim]}). Holds the prototype banks' centres and spreads as buffers (bank i, stream s:
    `bank{i}_{s}_centres` [C, dim], `bank{i}_{s}_spread` [C, dim]), saved with the module, and one `Fusion`
    per modulated modality. A modality without a fusion module, or without historical banks, passes through
    unchanged."""

    def __init__(self, dim: int, banks: list[dict] | tuple = (), fused: list[str] | tuple = (),
                 num_components: int = 3, lambda_g: float = 0.6, component_scales: list[float] | tuple = (0.5, 1.0, 2.0),
                 fusion_dim: int = 64, seed: int = 0, modalities=None):
        super().__init__()
        if modalities is not None:
            raise MiclError("this media modulator was saved by an earlier micl whose Harmony kept one prototype per "
                            "modality; it cannot be rebuilt: rerun the Harmony recipe into a new output_dir")
        if len(component_scales) != num_components:
            raise ConfigError(f"{KEY}.component_scales needs one value per component ({num_components}), "
                              f"got {list(component_scales)}")
        self.dim, self.fusion_dim, self.seed = int(dim), int(fusion_dim), int(seed)
        self.num_components, self.lambda_g = int(num_components), float(lambda_g)
        self.component_scales = [float(c) for c in component_scales]
        self.mix_logits = nn.Parameter(torch.zeros(num_components))
        self.fusions = nn.ModuleDict()
        self.banks: list[dict] = []  # {"task", "streams", "clusters"} in the order the tasks were learned
        for bank in banks:
            self._add_bank(bank["task"], list(bank["streams"]), int(bank["clusters"]))
        for modality in fused:
            self.add_fusion(modality)

    def modulator_config(self) -> dict:
        return {"dim": self.dim, "banks": [dict(b) for b in self.banks], "fused": list(self.fusions),
                "num_components": self.num_components, "lambda_g": self.lambda_g,
                "component_scales": self.component_scales, "fusion_dim": self.fusion_dim, "seed": self.seed}

    # ---- banks ---------------------------------------------------------------------------------------
    def _add_bank(self, task: str, streams: list[str], clusters: int) -> None:
        i, like = len(self.banks), self.mix_logits
        for s in streams:
            self.register_buffer(f"bank{i}_{s}_centres", torch.zeros(clusters, self.dim, device=like.device,
                                                                     dtype=like.dtype))
            self.register_buffer(f"bank{i}_{s}_spread", torch.zeros(clusters, self.dim, device=like.device,
                                                                    dtype=like.dtype))
        self.banks.append({"task": task, "streams": streams, "clusters": clusters})

    @torch.no_grad()
    def set_banks(self, banks: list[dict]) -> None:
        """Mirrors the method's prototype banks (prototype_bank's dicts, in order) into the buffers."""
        for i, bank in enumerate(banks):
            clusters = len(bank["sizes"])
            if i == len(self.banks):
                self._add_bank(bank["task"], list(bank["streams"]), clusters)
            elif self.banks[i] != {"task": bank["task"], "streams": list(bank["streams"]), "clusters": clusters}:
                raise MiclError(f"media modulator: bank {i} is {self.banks[i]}, the method's is {bank['task']!r}")
            for s in bank["streams"]:
                getattr(self, f"bank{i}_{s}_centres").copy_(bank["centres"][s])
                getattr(self, f"bank{i}_{s}_spread").copy_(bank["spread"][s])

    def historical(self, modality: str) -> list[int]:
        """The banks historical to `modality`: those stored before the first bank of `modality` (all of them
        while it has none). Training and evaluation use the same rule, and the first modality of an order is
        never modulated."""
        first = next((i for i, b in enumerate(self.banks) if modality in b["streams"]), len(self.banks))
        return list(range(first))

    def add_fusion(self, modality: str) -> None:
        if modality not in self.fusions:
            like = self.mix_logits
            seed = self.seed * 1_000_003 + sum(ord(ch) for ch in modality)
            self.fusions[modality] = Fusion(self.dim, self.fusion_dim, seed).to(like.device, like.dtype)

    # ---- proxies and fusion ---------------------------------------------------------------------------
    def mixing(self) -> torch.Tensor:
        """pi: the learned mixing coefficients (softmax, sum 1)."""
        return torch.softmax(self.mix_logits, dim=0)

    def component_weights(self) -> torch.Tensor:
        """pi_k * c_k, the weight of draw z_k in a proxy."""
        return self.mixing() * torch.tensor(self.component_scales, device=self.mix_logits.device)

    def pooled_proxies(self, x: torch.Tensor, modality: str, noise: bool | None = None) -> torch.Tensor | None:
        """[n, S, dim]: the pooled tokens of x [n, T, dim] moved towards every cluster prototype of every bank
        historical to `modality` (S = their clusters); with noise in training (learned mixture), without at
        evaluation. None without historical banks."""
        noise = self.training if noise is None else noise
        pooled = x.mean(1, keepdim=True)
        parts = []
        for i in self.historical(modality):
            for s in self.banks[i]["streams"]:
                centres = getattr(self, f"bank{i}_{s}_centres").to(x.dtype)[None]  # [1, C, dim]
                spread = getattr(self, f"bank{i}_{s}_spread").to(x.dtype)[None]
                z = None
                if noise:
                    z = torch.randn((self.num_components, x.shape[0], *centres.shape[1:]), device=x.device,
                                    dtype=x.dtype)
                parts.append(historical_proxy(pooled, centres, spread, self.lambda_g,
                                              self.component_weights().to(x.dtype), z))
        return torch.cat(parts, dim=1) if parts else None

    def forward(self, projected: dict[str, torch.Tensor], media_rows=None, media_tasks=None,
                aux: dict | None = None) -> dict[str, torch.Tensor]:
        result = {}
        for modality, x in projected.items():
            proxies = self.pooled_proxies(x, modality) if modality in self.fusions else None
            result[modality] = x if proxies is None else self.fusions[modality](x, proxies)
        return result


# ---- hybrid alignment --------------------------------------------------------------------------------
def alignment_terms(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1) -> dict:
    """Direct, contrastive and distribution-level terms between the current model's features [n, d] and the
    previous model's on the same inputs (`teacher`, detached). Each is zero when student == teacher:
    - mse: MSE(student, teacher);
    - contrastive: mean_i KL(P_i || Q_i), Q_i = softmax_j cos(s_i, t_j) / T (student i against every teacher
      feature of the batch), P_i = softmax_j cos(t_i, t_j) / T (the teacher's own similarities: soft
      positives, since proxies of one cluster are near-duplicates and a one-hot positive would push them
      apart beyond the teacher);
    - distribution: squared differences of the weighted batch mean and standard deviation, weights =
      softmax over the batch of cos(t_i, teacher mean) / T (the rows typical of the batch count more)."""
    s, t = student.float(), teacher.detach().float()
    mse = F.mse_loss(s, t)
    tn = F.normalize(t, dim=-1)
    target = torch.softmax(tn @ tn.T / temperature, dim=-1)
    log_q = torch.log_softmax(F.normalize(s, dim=-1) @ tn.T / temperature, dim=-1)
    contrastive = (target * (target.clamp_min(1e-30).log() - log_q)).sum(-1).mean()
    w = torch.softmax(F.cosine_similarity(t, t.mean(0, keepdim=True), dim=-1) / temperature, dim=0).unsqueeze(1)
    mean_s, mean_t = (w * s).sum(0), (w * t).sum(0)
    std_s = ((w * (s - mean_s) ** 2).sum(0) + 1e-8).sqrt()
    std_t = ((w * (t - mean_t) ** 2).sum(0) + 1e-8).sqrt()
    distribution = F.mse_loss(mean_s, mean_t) + F.mse_loss(std_s, std_t)
    return {"mse": mse, "contrastive": contrastive, "distribution": distribution}


def pooled_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, length, d] -> [batch, d], the mean over each row's real tokens."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


# ---- the method --------------------------------------------------------------------------------------

@register
class Harmony(ContinualMethod):
    name = "harmony"
    Args = HarmonyArgs
    requires_tuner = "gated_lora"
    supports_zero3 = False  # merges the adapter into partitioned base weights
    uses_media_modulator = True
    uses_teacher = True
    loss_items = (PROXY_ITEMS,)

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
        if min(a.lambda_align, a.lambda_kl, a.lambda_con, a.lambda_dis) < 0:
            raise ConfigError(f"{KEY}: lambda_align, lambda_kl, lambda_con and lambda_dis must be >= 0")
        if a.temperature <= 0 or a.kl_temperature <= 0 or a.fusion_dim < 1:
            raise ConfigError(f"{KEY}: temperature and kl_temperature must be > 0 and fusion_dim >= 1")
        if a.num_prototypes < 1 or a.prototype_texts < 1 or a.proxy_num < 0:
            raise ConfigError(f"{KEY}: num_prototypes and prototype_texts must be >= 1, proxy_num >= 0")
        if a.prototype_samples is not None and a.prototype_samples < 1:
            raise ConfigError(f"{KEY}.prototype_samples must be >= 1 or null, got {a.prototype_samples}")
        self.banks: list[dict] = []  # prototype_bank() of every finished task with media, in order
        self.merges = 0
        self.teacher: PreviousModelTeacher | None = None

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

    def _distils(self) -> bool:
        return bool(self.banks) and self.args.proxy_num > 0 and self.args.lambda_align > 0

    # ---- hooks -------------------------------------------------------------------------------------------
    def on_task_start(self, ctx: StepContext) -> None:
        model = unwrap_model(ctx.model)
        self._adapter(model)
        modulator = model.media_modulator
        if modulator is None:
            a = self.args
            modulator = FeatureModulator(model.llm.get_input_embeddings().embedding_dim, (), (), a.num_components,
                                         a.lambda_g, a.component_scales, a.fusion_dim, seed=ctx.seed)
            model.set_media_modulator(modulator)
        elif not isinstance(modulator, FeatureModulator):
            raise ConfigError(f"method 'harmony': the model already has a media modulator of another kind "
                              f"({type(modulator).__name__})")
        modulator.set_banks(self.banks)  # the method state is the source of the prototypes
        for modality in STREAMS[ctx.task.modality]:
            if modulator.historical(modality):
                modulator.add_fusion(modality)
        if self._distils():
            # the adapter at the start of the phase over the base weights holding every earlier merge: the
            # previous phase's model (with merge_after_phase, a fresh adapter: the merged base itself)
            self.teacher = PreviousModelTeacher.acquire(ctx.model)

    def augment_batch(self, batch: dict, ctx: StepContext) -> dict:
        """Adds `harmony`: `proxy_num` rows, each an old task's prompt with a stored instruction/answer of one
        of its clusters and placeholders for that task's media, plus the plan of their proxies (bank,
        cluster, the batch's media row they start from, a noise seed). Drawn from a generator seeded by the
        batch's sample indices: the same micro-batch gets the same rows after a resume and however the
        global batch is split. The banks take turns (balanced), clusters are drawn by their sizes."""
        if self.teacher is None:
            return batch
        rng = batch_rng("harmony", ctx, draw_key(batch, ""))
        dataset = ctx.train_dataset
        media = batch.get("media_features") or {}
        sources = [(m, k) for m in sorted(media) for k in range(len(media[m]))]
        turns = list(range(len(self.banks)))
        rng.shuffle(turns)
        items, plan = [], []
        for row in range(self.args.proxy_num):
            b = turns[row % len(turns)]
            bank = self.banks[b]
            cluster = rng.choices(range(len(bank["sizes"])), weights=bank["sizes"].tolist())[0]
            question, answer = rng.choice(bank["texts"][cluster])
            sample = {"task_type": bank["task_type"], "modality": bank["modality"], "instruction": question}
            instruction = render_instruction(sample, dataset.templates, train=True, rng=rng)
            counts = {s: bank["layout"][s].shape[0] for s in bank["streams"]}
            encoded = dataset.builder.encode(instruction, counts, answer)
            items.append({"input_ids": encoded.input_ids, "labels": encoded.labels, "media_mask": encoded.media_mask,
                          "media": {s: torch.zeros(n, 0) for s, n in counts.items()}})
            plan.append((b, cluster, *(rng.choice(sources) if sources else (None, -1)), rng.getrandbits(62)))
        extra = ctx.collate_fn(items)
        extra.pop("media_features")
        extra["kd_mask"] = target_prediction_mask(extra["labels"])
        extra["plan"] = plan
        extra["proxy_rows"] = {s: rows.tolist() for s, rows in extra["media_rows"].items()}  # host lists: no sync
        return {**batch, "harmony": extra}

    def count_loss_items(self, batch: dict) -> dict:
        extra = batch.get("harmony")
        return {} if extra is None else {PROXY_ITEMS: extra["kd_mask"].sum()}

    @torch.no_grad()
    def proxy_media(self, model, batch: dict, extra: dict) -> dict[str, torch.Tensor]:
        """{stream: [rows of that stream, T, d]} the proxies of the plan, in the layout of extra's media_rows:
        each starts from the current projected tokens of its media row (the projector alone, so no proxy
        depends on the fusion being trained), or from the prototype itself for a text-only batch."""
        modulator, a = model.media_modulator, self.args
        weights = modulator.component_weights()
        device, dtype = weights.device, next(model.projectors.parameters()).dtype
        features = batch.get("media_features") or {}
        bases = {m: model.projectors[m](f.to(device, dtype)) for m, f in features.items()}
        tokens = {}
        for stream, rows in extra["proxy_rows"].items():
            proxies = []
            for row in rows:
                b, cluster, source, k, seed = extra["plan"][row]
                bank = self.banks[b]
                layout = bank["layout"][stream].to(device, dtype)
                centre = bank["centres"][stream][cluster].to(device, dtype) + layout
                spread = bank["spread"][stream][cluster].to(device, dtype)
                base = centre[None] if source is None else resample_tokens(bases[source][k:k + 1], len(layout))
                z = torch.randn((a.num_components, *base.shape), generator=torch.Generator().manual_seed(seed))
                proxies.append(historical_proxy(base, centre, spread, a.lambda_g, weights.to(dtype),
                                                z.to(device, dtype))[0])
            tokens[stream] = torch.stack(proxies)
        return tokens

    def proxy_inputs(self, ctx: StepContext, batch: dict) -> dict:
        """The model inputs of the batch's proxy rows (no labels: neither model learns their answers)."""
        extra = batch["harmony"]
        inputs = {k: extra[k] for k in ("input_ids", "attention_mask", "media_mask", "media_rows", "media_masks",
                                        "logits_to_keep")}
        inputs["media_tokens"] = self.proxy_media(unwrap_model(ctx.model), batch, extra)
        return inputs

    def auxiliary_losses(self, model, batch: dict, ctx: StepContext):
        """The hybrid alignment of the current model to the previous phase's on the proxy rows: one teacher
        forward (no gradient) and one student forward over all of them, media given as LLM-input tokens."""
        extra = batch.get("harmony")
        if extra is None:
            return
        a = self.args
        inputs = self.proxy_inputs(ctx, batch)
        teacher = self.teacher.outputs(inputs, output_hidden_states=True)
        student = model(**inputs, output_hidden_states=True)
        kl = kd_loss_sum(student.logits, teacher.logits, extra["kd_mask"], a.kl_temperature)
        mask = extra["attention_mask"]
        terms = alignment_terms(pooled_hidden(student.hidden_states, mask), pooled_hidden(teacher.hidden_states, mask),
                                a.temperature)
        features = terms["mse"] + a.lambda_con * terms["contrastive"] + a.lambda_dis * terms["distribution"]
        yield [TokenSum(a.lambda_align * a.lambda_kl * kl, PROXY_ITEMS), a.lambda_align * features]

    def on_task_end(self, ctx: StepContext) -> None:
        if self.teacher is not None:
            self.teacher.remove()
        self.teacher = None
        model = unwrap_model(ctx.model)
        bank = self._bank_of(model, ctx)
        if bank is not None:
            self.banks.append(bank)
            model.media_modulator.set_banks(self.banks)
        if self.args.merge_after_phase:
            from ..adapters.gated_lora import low_rank_factors, reset_gated_lora

            adapter = self._adapter(model)
            model.merge_low_rank(low_rank_factors(model.llm, adapter))
            reset_gated_lora(model.llm, adapter, seed=ctx.seed * 1_000_003 + ctx.step)
            self.merges += 1

    @torch.no_grad()
    def _bank_of(self, model, ctx: StepContext) -> dict | None:
        """The finished task's prototypes, from its training samples' media tokens as the LLM gets them
        (projector + modulator in evaluation mode, i.e. without noise)."""
        dataset = ctx.train_dataset
        streams = [s for s in STREAMS[ctx.task.modality] if s in model.projectors]
        if not streams or not len(dataset):
            return None
        count = len(dataset) if self.args.prototype_samples is None else min(len(dataset), self.args.prototype_samples)
        tokens: dict[str, list[torch.Tensor]] = {s: [] for s in streams}
        was_training = model.training
        model.eval()
        try:
            for projected, _, _ in projected_media(model, dataset, count, ctx.task.name, modalities=streams):
                for s, values in projected.items():
                    tokens[s].extend(values.float().cpu())
        finally:
            model.train(was_training)
        stacked = {}
        for s, items in tokens.items():
            length = max(set(t.shape[0] for t in items), key=[t.shape[0] for t in items].count)
            stacked[s] = torch.cat([resample_tokens(t[None], length) for t in items])
        return prototype_bank(stacked, dataset.samples[:count], ctx.task, self.args.num_prototypes,
                              self.args.prototype_texts, seed=ctx.seed * 1_000_003 + ctx.step)

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"banks": [dict(b) for b in self.banks], "merges": self.merges}

    def load_state_dict(self, state: dict) -> None:
        state = state or {}
        if "prototypes" in state:
            raise MiclError("method_state.pt of harmony was saved by an earlier micl (one prototype per modality); "
                            "it cannot be resumed: rerun the Harmony recipe into a new output_dir")
        self.banks = [dict(b) for b in state.get("banks", [])]
        self.merges = int(state.get("merges", 0))
