"""Adaptive audio-visual fusion (arXiv 2506.09999) as a method hook. It installs the `AdaptiveFusion` media
modulator (micl/modeling/fusion.py) and, when a task starts, gives it that task's expert and expert router
(every task with media) and, for a task with a video and its sound (modality `audio_video`), an
audio-visual gate; only the current task's parts learn, so an earlier task's feature adapter and fusion
stay as they were after its step. It composes with any other hook except another media modulator (harmony).

Training loss, as the paper's 0.7 L_CW + 0.3 L_MI (docs/adaptive_fusion.md):
- L_CW, the similarity-weighted cross-entropy, takes the place of the LM cross-entropy: row j's token
  cross-entropy is weighted by omega_j = sum_i w_ij / sum_k w_ik, with w_ij = (cos(z_i, z_j) + 1) / 2 over
  the pooled media representations z of the micro-batch's rows (detached; the omegas average 1);
- L_MI = InfoNCE(fused, video) + InfoNCE(fused, audio) over the micro-batch's audio-visual rows: maximises the
  InfoNCE lower bound on the mutual information between the fused and each unimodal representation;
- micl's addition, `align_weight` x mean(1 - r): trains each audio-visual gate's shared space (the heads that
  r is computed in) to correlate a video with its own sound; it reaches the heads only.

After each step, `<run>/adaptive_fusion/step_<k>_<task>.json` records the gate's decisions over an
audio-visual task's training samples, and `step_metrics` reports what the paper's M1 / M2 need: the
similarity of the task to the previous one and, once an audio-visual task was learned, the normalised
mutual information between its fused and unimodal representations (micl/evaluation/continual.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..modeling.fusion import (FIXED_GATES, GATE_SPACE, POOLED, AdaptiveFusion, infonce, normalized_infonce_mi,
                               pearson)
from ..modeling.prompting import IGNORE_INDEX
from ..utils.io import atomic_write_json
from .base import ContinualMethod, StepContext, TokenSum, unwrap_model
from .media_passes import projected_media
from .registry import register

AUDIO_VIDEO = "audio_video"


@dataclass
class AdaptiveFusionArgs:
    threshold: float = field(default=0.8, metadata={"help": "Pearson r at or above which the two media are "
                                                            "fused (hard gate); the soft gate's initial centre"})
    gate: str = field(default="hard", metadata={
        "help": "hard (the paper: fuse iff r >= threshold), soft (learned sigmoid of r per task), or an "
                "ablation: fuse (always), video / audio (that medium alone)"})
    cw_weight: float = field(default=0.7, metadata={"help": "weight of the similarity-weighted cross-entropy "
                                                            "(the paper's 0.7 L_CW), in place of the LM loss's 1"})
    similarity_weighting: bool = field(default=True, metadata={
        "help": "weight each row's cross-entropy by its similarity to the batch (false: a plain cross-entropy)"})
    mi_weight: float = field(default=0.3, metadata={
        "help": "weight of the InfoNCE between the fused and each unimodal representation (the paper's 0.3 L_MI)"})
    mi_temperature: float = field(default=0.3, metadata={"help": "temperature of that InfoNCE"})
    align_weight: float = field(default=1.0, metadata={
        "help": "weight of 1 - r in the gate's shared space (trains the heads that r is computed in)"})
    gate_dim: int = field(default=64, metadata={"help": "size of the gate's shared space"})
    top_k: int = field(default=2, metadata={"help": "experts a media item is routed to"})
    bottleneck: int = field(default=64, metadata={"help": "hidden size of a task's adapter (expert)"})
    adapter_scale: float = field(default=0.1, metadata={"help": "scale of an adapter's output"})
    statistics_samples: int | None = field(default=None, metadata={
        "help": "training samples per task for the fusion statistics and the M1/M2 inputs (None = all)"})

    def __post_init__(self):
        key = "method_args.adaptive_fusion"
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{key}.threshold: a correlation threshold in [-1, 1], got {self.threshold}")
        gates = (*FIXED_GATES, "video", "audio")
        if self.gate not in gates:
            raise ConfigError(f"{key}.gate: one of {', '.join(gates)}, got {self.gate!r}")
        for name in ("cw_weight", "mi_weight", "align_weight", "adapter_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.mi_temperature <= 0:
            raise ConfigError(f"{key}.mi_temperature: must be > 0, got {self.mi_temperature}")
        for name in ("gate_dim", "top_k", "bottleneck"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.statistics_samples is not None and self.statistics_samples < 0:
            raise ConfigError(f"{key}.statistics_samples: must be >= 0 or null")


def row_representations(media_tokens: dict, media_rows: dict, num_rows: int):
    """[num_rows, d] mean over all media tokens of each row (a video and its sound together) and [num_rows]
    whether the row has media."""
    total, count = None, None
    for modality, tokens in media_tokens.items():
        rows = media_rows[modality].to(tokens.device)
        if total is None:
            total = tokens.new_zeros(num_rows, tokens.shape[-1], dtype=torch.float32)
            count = tokens.new_zeros(num_rows, dtype=torch.float32)
        total = total.index_add(0, rows, tokens.float().sum(1))
        count = count.index_add(0, rows, count.new_full((rows.shape[0],), float(tokens.shape[1])))
    return total / count.clamp(min=1)[:, None], count > 0


def similarity_weights(z: torch.Tensor) -> torch.Tensor:
    """omega_j = sum_i w_ij / sum_k w_ik, w_ij = (cos(z_i, z_j) + 1) / 2, for z [m, d]: mean 1."""
    z = F.normalize(z.float(), dim=-1)
    w = (z @ z.T + 1) / 2
    return (w / w.sum(1, keepdim=True).clamp(min=1e-12)).sum(0)


def per_row_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, logits_offset: int) -> torch.Tensor:
    """[batch] summed token cross-entropy of each row, as MultimodalLM.forward's loss_sum is over the batch."""
    targets = labels[:, logits_offset + 1:]
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.view(targets.shape).sum(1)


@register
class AdaptiveFusionMethod(ContinualMethod):
    name = "adaptive_fusion"
    Args = AdaptiveFusionArgs
    uses_media_modulator = True

    def __init__(self, args: AdaptiveFusionArgs | None = None):
        super().__init__(args or AdaptiveFusionArgs())
        self.previous_embeddings: dict | None = None  # the last step's task embeddings (M1's similarity)
        self._step_metrics: dict = {}

    def _fusion(self, model) -> AdaptiveFusion:
        modulator = model.media_modulator
        if modulator is None:
            a = self.args
            modulator = AdaptiveFusion(model.llm.get_input_embeddings().embedding_dim, a.threshold, gate=a.gate,
                                       top_k=a.top_k, bottleneck=a.bottleneck, adapter_scale=a.adapter_scale,
                                       gate_dim=a.gate_dim)
            model.set_media_modulator(modulator)
        elif not isinstance(modulator, AdaptiveFusion):
            raise ConfigError(f"method 'adaptive_fusion': the model already has a media modulator of another "
                              f"kind ({type(modulator).__name__})")
        return modulator

    def on_task_start(self, ctx: StepContext) -> None:
        fusion = self._fusion(unwrap_model(ctx.model))
        fusion.add_task(ctx.task.name)
        if ctx.task.modality == AUDIO_VIDEO:
            fusion.add_fusion_task(ctx.task.name)
        fusion.requires_grad_(False)  # earlier tasks' experts, routers and gates stay as they were
        for param in fusion.task_parameters(ctx.task.name):
            param.requires_grad_(True)

    # ---- losses -----------------------------------------------------------------------------------------
    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        losses = [self._weighted_cross_entropy(batch, outputs)]
        aux = outputs.aux or {}
        pooled = aux.get(POOLED)
        if pooled is not None and self.args.mi_weight and pooled["fused"].shape[0] >= 2:
            first, second = (k for k in pooled if k != "fused")
            losses.append(self.args.mi_weight * (infonce(pooled["fused"], pooled[first], self.args.mi_temperature)
                                                 + infonce(pooled["fused"], pooled[second], self.args.mi_temperature)))
        space = aux.get(GATE_SPACE)
        if space is not None and self.args.align_weight:
            losses.append(self.args.align_weight * (1 - pearson(space[0], space[1])).mean())
        return losses

    def _weighted_cross_entropy(self, batch: dict, outputs) -> TokenSum:
        """cw_weight x sum_j omega_j CE_j, returned as the difference to the LM loss the trainer already adds
        (sum_j CE_j), both over the global batch's target tokens."""
        per_row = per_row_cross_entropy(outputs.logits, batch["labels"], outputs.logits_offset)
        omega = torch.ones_like(per_row)
        if self.args.similarity_weighting and outputs.media_tokens:
            z, has_media = row_representations(outputs.media_tokens, batch["media_rows"], per_row.shape[0])
            if int(has_media.sum()) >= 2:
                omega = omega.masked_scatter(has_media, similarity_weights(z[has_media].detach()))
        return TokenSum(((self.args.cw_weight * omega - 1) * per_row).sum())

    # ---- end of a task: freeze, record, measure -------------------------------------------------------------
    def on_task_end(self, ctx: StepContext) -> None:
        model = unwrap_model(ctx.model)
        fusion = self._fusion(model)
        for param in fusion.task_parameters(ctx.task.name):
            param.requires_grad_(False)
        fusion.finish_task(ctx.task.name)
        from ..utils.distributed import gathered, is_main_process

        embedding = model.llm.get_input_embeddings()
        params = [*model.projectors.parameters(), *fusion.parameters(), *embedding.parameters()]
        with gathered(params), torch.no_grad():  # every rank computes (ZeRO-3: a collective); the main one writes
            current = self._task_embeddings(model, ctx.train_dataset, ctx.task.name)
            metrics = {"task_similarity": self._similarity(current)}
            self.previous_embeddings = current
            av_tasks = [t for t in [*ctx.seen_tasks, ctx.task] if t.modality == AUDIO_VIDEO]
            if av_tasks:
                metrics["nmi"] = self._nmi(model, fusion, ctx, av_tasks)
            stats = self._statistics(model, fusion, ctx) if ctx.task.name in fusion.fusion_tasks else None
        self._step_metrics = metrics
        if stats is not None and is_main_process():
            atomic_write_json(Path(ctx.run_dir) / "adaptive_fusion" / f"step_{ctx.step}_{ctx.task.name}.json", stats)

    def step_metrics(self, ctx: StepContext) -> dict:
        return dict(self._step_metrics)

    def _count(self, dataset) -> int:
        n = self.args.statistics_samples
        return len(dataset) if n is None else min(len(dataset), n)

    def _media_pass(self, model, dataset, task: str):
        """Yields (representations [n, d], aux) of the dataset's first samples through the projectors and the
        modulator as in a forward."""
        for tokens, rows, aux in projected_media(model, dataset, self._count(dataset), task):
            yield row_representations(tokens, rows, len(next(iter(rows.values()))))[0], aux

    def _task_embeddings(self, model, dataset, task: str) -> dict:
        """The task's text embedding (mean input embedding of its targets' tokens: the reference's class-name
        text embedding) and media prototype (mean pooled media representation: its image prototype)."""
        tokenizer = model.tokenizer
        targets = [s["target"] for s in dataset.samples[: self._count(dataset)] if s.get("target")]
        ids = [i for text in targets for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        embedding = model.llm.get_input_embeddings()
        text = (embedding(torch.tensor(ids, device=embedding.weight.device)).float().mean(0) if ids else None)
        media = [rep for rep, _ in self._media_pass(model, dataset, task)]
        prototype = torch.cat(media).mean(0) if media else None
        return {"text": None if text is None else text.cpu(), "media": None if prototype is None else prototype.cpu()}

    def _similarity(self, current: dict) -> float:
        """sim_t = mean of (cos + 1) / 2 of the text embeddings and of the media prototypes of this task and the
        previous step's (1.0 for the first step, as the reference; a missing part counts as 1)."""
        previous = self.previous_embeddings
        if previous is None:
            return 1.0
        parts = []
        for key in ("text", "media"):
            a, b = current.get(key), previous.get(key)
            parts.append(1.0 if a is None or b is None else float(F.cosine_similarity(a, b, dim=0)) / 2 + 0.5)
        return sum(parts) / len(parts)

    def _nmi(self, model, fusion: AdaptiveFusion, ctx: StepContext, tasks) -> dict:
        """InfoNCE-normalised MI (micl/modeling/fusion.py: normalized_infonce_mi) between the fused and each
        unimodal pooled representation over the audio-visual tasks' training samples, with this model."""
        pooled = {}
        for task in tasks:
            dataset = ctx.train_dataset if task.name == ctx.task.name else ctx.dataset_fn(task, "train")
            for _, aux in self._media_pass(model, dataset, task.name):
                for key, value in aux.get(POOLED, {}).items():
                    pooled.setdefault(key, []).append(value.float())
        if not pooled:
            return {}
        pooled = {k: torch.cat(v) for k, v in pooled.items()}
        return {m: normalized_infonce_mi(pooled["fused"], pooled[m], self.args.mi_temperature)
                for m in fusion.modalities}

    def _statistics(self, model, fusion: AdaptiveFusion, ctx: StepContext) -> dict | None:
        first, second = fusion.modalities
        decisions = [aux["fusion_decisions"] for _, aux in self._media_pass(model, ctx.train_dataset, ctx.task.name)
                     if "fusion_decisions" in aux]
        if not decisions:
            return None
        r = torch.cat([d["r"] for d in decisions])
        share = torch.cat([d["share"] for d in decisions])
        fused = torch.cat([d["fuse"] for d in decisions])
        weights = torch.cat([d["weights"] for d in decisions])
        alone = torch.cat([d["stronger"] for d in decisions])[~fused]
        return {
            "task": ctx.task.name, "step": ctx.step, "samples": int(r.shape[0]), "threshold": fusion.threshold,
            "gate": fusion.gate, "fused_share": float(fused.float().mean()), "mean_gate": float(share.mean()),
            "mean_r": float(r.mean()), "min_r": float(r.min()), "max_r": float(r.max()),
            "mean_weights": {first: float(weights[:, 0].mean()), second: float(weights[:, 1].mean())},
            "alone": {first: int((alone == 0).sum()), second: int((alone == 1).sum())},
        }

    # ---- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"previous_embeddings": self.previous_embeddings}

    def load_state_dict(self, state: dict) -> None:
        self.previous_embeddings = (state or {}).get("previous_embeddings")
