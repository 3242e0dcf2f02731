"""Adaptive audio-visual fusion (arXiv 2506.09999) as a method hook: installs the `AdaptiveFusion` media
modulator (micl/modeling/fusion.py) on the model, gives every task with two media (modality
`audio_video`) its own router when the task starts, and freezes that router when the task ends, so a
later task cannot change how an earlier one fuses. Tasks with one medium are left alone (no router, the
modulator passes their tokens through), so the method composes with any other hook except another media
modulator (harmony).

The paper trains with 0.7 L_CW + 0.3 L_MI. L_CW is a classifier's loss over class prototypes; micl's tasks
are generative, so the LM cross-entropy takes its place. L_MI (mutual information between the modalities)
becomes `mi_weight` x a paired InfoNCE between each sample's pooled video and audio tokens, whose similarity
is the Pearson r of the gate: it teaches the projectors to correlate a video with its own sound.
After each task, `<run>/adaptive_fusion/step_<k>_<task>.json` records the fusion decisions over the task's
training samples (share fused, mean r, mean router weights, which modality was kept alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..modeling.fusion import POOLED, AdaptiveFusion, paired_infonce
from ..utils.io import atomic_write_json
from .base import ContinualMethod, StepContext, unwrap_model
from .registry import register

@dataclass
class AdaptiveFusionArgs:
    threshold: float = field(default=0.8, metadata={"help": "Pearson r at or above which the two media are "
                                                            "fused; below it the stronger one is used alone"})
    mi_weight: float = field(default=0.3, metadata={
        "help": "weight of the paired InfoNCE between a sample's pooled video and audio (the paper's L_MI)"})
    mi_temperature: float = field(default=0.3, metadata={
        "help": "temperature of that InfoNCE (0.3 pulls matched pairs past r = 0.8; 0.1 stalls near it)"})
    statistics_samples: int | None = field(default=None, metadata={
        "help": "training samples per task over which the fusion decisions are recorded (None = all)"})

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"method_args.adaptive_fusion.threshold: a correlation threshold in [-1, 1], "
                              f"got {self.threshold}")
        if self.mi_weight < 0 or self.mi_temperature <= 0:
            raise ConfigError("method_args.adaptive_fusion: mi_weight must be >= 0 and mi_temperature > 0")
        if self.statistics_samples is not None and self.statistics_samples < 0:
            raise ConfigError("method_args.adaptive_fusion.statistics_samples: must be >= 0 or null")


@register
class AdaptiveFusionMethod(ContinualMethod):
    name = "adaptive_fusion"
    Args = AdaptiveFusionArgs
    uses_media_modulator = True

    def __init__(self, args: AdaptiveFusionArgs | None = None):
        super().__init__(args or AdaptiveFusionArgs())

    def _fusion(self, model) -> AdaptiveFusion:
        modulator = model.media_modulator
        if modulator is None:
            modulator = AdaptiveFusion(model.llm.get_input_embeddings().embedding_dim, self.args.threshold)
            model.set_media_modulator(modulator)
        elif not isinstance(modulator, AdaptiveFusion):
            raise ConfigError(f"method 'adaptive_fusion': the model already has a media modulator of another "
                              f"kind ({type(modulator).__name__})")
        return modulator

    def on_task_start(self, ctx: StepContext) -> None:
        fusion = self._fusion(unwrap_model(ctx.model))
        if ctx.task.modality == "audio_video":
            fusion.add_task(ctx.task.name)
        for task in fusion.tasks:  # only the current task's router learns
            fusion.router(task).requires_grad_(task == ctx.task.name)

    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        """mi_weight x paired InfoNCE of the main forward's video/sound pairs (needs two of them)."""
        pooled = (outputs.aux or {}).get(POOLED)
        if pooled is None or self.args.mi_weight == 0 or pooled[0].shape[0] < 2:
            return None
        return self.args.mi_weight * paired_infonce(*pooled, self.args.mi_temperature)

    def on_task_end(self, ctx: StepContext) -> None:
        model = unwrap_model(ctx.model)
        fusion = self._fusion(model)
        if ctx.task.name in fusion.tasks:
            fusion.router(ctx.task.name).requires_grad_(False)
            self._write_statistics(model, fusion, ctx)

    @torch.no_grad()
    def _write_statistics(self, model, fusion: AdaptiveFusion, ctx: StepContext) -> None:
        """Every rank computes (under ZeRO-3 the projectors and routers are gathered, a collective); the main
        process writes."""
        from ..utils.distributed import gathered, is_main_process

        dataset = ctx.train_dataset
        count = len(dataset) if self.args.statistics_samples is None else min(len(dataset),
                                                                              self.args.statistics_samples)
        if not count:
            return
        first, second = fusion.modalities
        params = [*model.projectors[first].parameters(), *model.projectors[second].parameters(),
                  *fusion.parameters()]
        with gathered(params):
            def pooled(modality: str) -> torch.Tensor:  # a task's samples have equal token counts: batches
                projector = model.projectors[modality]
                param = next(projector.parameters())
                chunks = []
                for start in range(0, count, 64):
                    features = torch.stack([dataset.features[i][modality] for i in range(start, min(start + 64, count))])
                    chunks.append(projector(features.to(param.device, param.dtype)).mean(1))
                return torch.cat(chunks)

            decision = fusion.decide(pooled(first), pooled(second), [ctx.task.name] * count)
        if not is_main_process():
            return
        fused = decision["fuse"]
        alone = decision["stronger"][~fused]
        stats = {
            "task": ctx.task.name, "step": ctx.step, "samples": count, "threshold": fusion.threshold,
            "fused_share": float(fused.float().mean()),
            "mean_r": float(decision["r"].mean()), "min_r": float(decision["r"].min()),
            "max_r": float(decision["r"].max()),
            "mean_weights": {first: float(decision["weights"][:, 0].mean()),
                             second: float(decision["weights"][:, 1].mean())},
            "alone": {first: int((alone == 0).sum()), second: int((alone == 1).sum())},
        }
        atomic_write_json(Path(ctx.run_dir) / "adaptive_fusion" / f"step_{ctx.step}_{ctx.task.name}.json", stats)
