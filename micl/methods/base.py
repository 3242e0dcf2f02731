"""The continual-learning hook interface (Avalanche-plugin style).

The task-order loop and the Trainer call, for every method of a recipe, in this order:

    on_task_start(ctx)                       once, before the step's training
    augment_batch(batch, ctx) -> batch       every training batch, before the forward pass
    auxiliary_losses(model, batch, ctx)      every training batch, before the main forward: losses on
                                             other inputs; the Trainer backpropagates each as soon as it
                                             is yielded, so one graph is alive at a time
    extra_loss(model, batch, outputs, ctx)   every training batch, added to the cross-entropy
    on_epoch_end(ctx)                        after every epoch
    on_task_end(ctx)                         once, after training, before evaluation

`state_dict()` / `load_state_dict()` carry what a method keeps across steps (saved in each phase folder,
so that a resumed run continues with it). `step_state()` / `load_step_state()` carry what it gathers
within a step (e.g. expert activation counts), saved with every within-step checkpoint, one file per
rank, so that a step killed midway resumes with it. Hooks compose: a recipe may list several methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def unwrap_model(model):
    """The MultimodalLM inside a DataParallel / DDP wrapper (parameter names without 'module.')."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


@dataclass
class StepContext:
    step: int
    task: Any  # TaskSpec
    seen_tasks: list  # TaskSpecs learned before this step
    model: Any  # MultimodalLM
    train_dataset: Any
    run_dir: str
    seed: int = 0
    batch_size: int = 1  # train.batch_size (per device)
    epoch: int = 0
    dataset_fn: Any = None  # dataset_fn(task_spec, split) -> EncodedTaskDataset (features cached)
    collate_fn: Any = None  # list of dataset items -> model batch
    extra: dict = field(default_factory=dict)


class ContinualMethod:
    name = "base"
    Args = None  # a dataclass of the method's settings (recipe: method_args.<name>.*), or None

    def __init__(self, args=None):
        self.args = args

    def check_recipe(self, config, source: str) -> None:
        """Called when the recipe is loaded, before anything runs: raise ConfigError (naming `source` and
        the key) for settings this method cannot work with, e.g. another method's required adapter type."""

    def on_task_start(self, ctx: StepContext) -> None:
        """Called once before the step's training."""

    def augment_batch(self, batch: dict, ctx: StepContext) -> dict:
        return batch

    def auxiliary_losses(self, model, batch: dict, ctx: StepContext):
        """Yields loss tensors that need their own forward passes (not the main batch's outputs)."""
        return ()

    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        """A loss tensor added to the cross-entropy, or None."""
        return None

    def on_epoch_end(self, ctx: StepContext) -> None:
        """Called after every training epoch."""

    def on_task_end(self, ctx: StepContext) -> None:
        """Called once after the step's training, before evaluation."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what `state_dict` returned."""

    def step_state(self) -> dict:
        """What this process gathered since `on_task_start` and needs again after a mid-step resume."""
        return {}

    def load_step_state(self, state: dict) -> None:
        """Restores what `step_state` returned (called after `on_task_start`, before training resumes)."""
