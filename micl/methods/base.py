"""The continual-learning hook interface (Avalanche-plugin style).

The task-order loop and the Trainer call, for every method of a recipe, in this order:

    on_task_start(ctx)                       once, before the step's training
    augment_batch(batch, ctx) -> batch       every training batch, before the forward pass
    auxiliary_losses(model, batch, ctx)      every training batch, before the main forward: losses on
                                             other inputs; the Trainer backpropagates each as soon as it
                                             is yielded, so one graph is alive at a time
    extra_loss(model, batch, outputs, ctx)   every training batch, added to the cross-entropy
    before_optimizer_step(model, batches, ctx)
                                             once per optimizer step, on every process
    on_epoch_end(ctx)                        after every epoch
    on_task_end(ctx)                         once, after training, before evaluation
    step_metrics(ctx) -> dict                once, after on_task_end: numbers kept in the step's record

What hooks read comes through their arguments: `outputs` of `extra_loss` is the main forward's
MultimodalOutput (loss, logits, the projected `media_tokens`, the media modulator's `aux`, and the LLM's
final `hidden_states` when the class sets `uses_hidden_states`); a hook that runs forwards of its own reads
their outputs. Module attributes set by a forward are not a channel: the next forward (a teacher's, another
method's) overwrites them. `model` is the module the Trainer trains: under DDP / DeepSpeed the wrapper (call
it for forwards that belong to the training step); `ctx.model` (or `unwrap_model(model)`) is the
MultimodalLM itself, for attributes, and for forwards whose gradients must not go through the wrapper's
gradient reduction (e.g. `torch.autograd.grad` of a loss of one's own).

The optimizer-step hook. `before_optimizer_step` runs when the gradients of the whole global batch are
ready in the parameters' `.grad` (every micro-batch of the step backpropagated; under DDP all-reduced, so
equal on every process) and before gradient clipping and the optimizer step: a method may read and
change them there (gradient projection, e.g. A-GEM). `batches` are this process's micro-batches of the
step (after `augment_batch`), to key its random draws on. Every process calls it, so collectives (an
all-reduce of a gradient of one's own) are allowed. Under fp16 with a loss scaler the gradients are still
scaled there (scale-invariant operations, such as a projection, are unaffected). Under DeepSpeed the
gradients live in the engine's buffers, not in `.grad`, and the engine steps inside the backward: a
method that overrides this hook sets `supports_deepspeed = False`, and such a recipe is refused under
DeepSpeed before anything runs.

Losses and the global batch. `augment_batch` runs for all micro-batches of an optimizer step before the
first forward, so that every loss can be normalised by its items in the whole global batch (all
processes, all accumulation steps; see micl/training/loss_scale.py): a method that returns `TokenSum`s
names their item kinds in `loss_items` and counts them per batch in `count_loss_items` (a method whose rows
join the main cross-entropy, e.g. MoInCL's pseudo targets, counts their targets as "labels": they add to the
batch's, so that all are one mean). A plain tensor
from `extra_loss` / `auxiliary_losses` is a per-batch regulariser: it is averaged over the micro-batches.

`state_dict()` / `load_state_dict()` carry what a method keeps across steps (saved in each phase folder,
so that a resumed run continues with it). `step_state()` / `load_step_state()` carry what it gathers
within a step (e.g. expert activation counts), saved with every within-step checkpoint, one file per
rank, so that a step killed midway resumes with it. Hooks compose: a recipe may list several methods.
"""

from __future__ import annotations

import random

from dataclasses import dataclass, field
from typing import Any

import torch

SCHEDULES = ("sequential", "joint", "untrained")  # the values of ContinualMethod.schedule


@dataclass
class TokenSum:
    """A loss summed over items of one kind (target tokens, distilled positions): the trainer divides it by
    the number of such items in the whole global batch, so its gradient does not depend on how the global
    batch is split across processes and accumulation steps. `items` = "labels" (the main batch's target
    tokens) or a kind the method declares in `loss_items`."""

    value: torch.Tensor
    items: str = "labels"


def batch_indices(batch: dict) -> list[int] | None:
    """The dataset positions of a batch's samples (the collator's `indices`), or None."""
    indices = batch.get("indices")
    if indices is None and batch.get("sample_index") is not None:
        indices = batch["sample_index"].tolist()
    return indices


def draw_key(batch: dict, fallback: str) -> str:
    """What seeds a hook's per-batch draw: the batch's sample indices (the same micro-batch gets the same draw
    however the global batch is split, and after a resume), else `fallback` (e.g. a call counter)."""
    indices = batch_indices(batch)
    return ",".join(map(str, indices)) if indices is not None else fallback


def step_rng(method: str, ctx: "StepContext") -> random.Random:
    """The generator of a method's once-per-step draw (a memory's reservoir, pseudo targets)."""
    return random.Random(f"{method}:{ctx.seed}:{ctx.step}")


def batch_rng(method: str, ctx: "StepContext", key: str) -> random.Random:
    """The generator of a method's per-batch draw, seeded by the step, the epoch and the batch's `draw_key`:
    the same micro-batch draws the same after a resume and however the global batch is split."""
    return random.Random(f"{method}:{ctx.seed}:{ctx.step}:{ctx.epoch}:{key}")


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
    # DeepSpeed with several processes: every rank must run the same forward passes (ZeRO-3 gathers weights
    # in each, ZeRO-1/2 reduce the gradients bucket by bucket in graph order), so a hook that adds a forward
    # on some batches only must add it on every batch (with rows that carry no items, if need be)
    uniform_forwards: bool = False
    epoch: int = 0
    dataset_fn: Any = None  # dataset_fn(task_spec, split) -> EncodedTaskDataset (features cached)
    collate_fn: Any = None  # list of dataset items -> model batch
    # the evaluation's decoding settings (MultimodalLM.generate keywords), for a hook that generates targets
    decoding: dict = field(default_factory=dict)


class ContinualMethod:
    name = "base"
    Args = None  # a dataclass of the method's settings (recipe: method_args.<name>.*), or None
    loss_items: tuple[str, ...] = ()  # item kinds its TokenSums are normalised by (besides "labels")
    # capabilities, read by the core and the preflight (which never name a method):
    supports_zero3 = True  # False: refused under DeepSpeed ZeRO-3 before anything runs
    supports_deepspeed = True  # False: refused under DeepSpeed (any stage), e.g. it needs the gradients in .grad
    requires_tuner: str | None = None  # the `lora.type` the method needs (None: any)
    uses_teacher = False  # shares the step's previous-model teacher (micl/methods/teacher.py)
    uses_media_modulator = False  # installs a media modulator on the model (at most one method may)
    uses_hidden_states = False  # the main forward returns the LLM's final hidden states (outputs.hidden_states)
    # which tasks each step trains on (micl/training/schedule.py): "sequential" (one task per step), "joint" (one
    # step over all tasks of the order) or "untrained" (one step, no training: zero-shot); not "sequential": the
    # recipe's only method
    schedule = "sequential"

    def __init__(self, args=None):
        self.args = args

    def check_recipe(self, config, source: str) -> None:
        """Called when the recipe is loaded, before anything runs: raise ConfigError (naming `source` and
        the key) for settings this method cannot work with, e.g. another method's required adapter type."""

    def on_task_start(self, ctx: StepContext) -> None:
        """Called once before the step's training."""

    def augment_batch(self, batch: dict, ctx: StepContext) -> dict:
        return batch

    def count_loss_items(self, batch: dict) -> dict:
        """{kind: number of items (a tensor or int) in this batch} for the kinds of `loss_items`."""
        return {}

    def auxiliary_losses(self, model, batch: dict, ctx: StepContext):
        """Yields losses (TokenSum or tensor) that need their own forward passes (not the main batch's)."""
        return ()

    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        """What is added to the main cross-entropy: None, a loss tensor (a per-batch regulariser, averaged over
        the micro-batches), a TokenSum (normalised by its items in the global batch), or a list of these."""
        return None

    def before_optimizer_step(self, model, batches: list[dict], ctx: StepContext) -> None:
        """Called once per optimizer step, with the global batch's gradients in `.grad`, before clipping and the
        step (see the module docstring); `batches`: this process's micro-batches of the step."""

    def on_epoch_end(self, ctx: StepContext) -> None:
        """Called after every training epoch."""

    def on_task_end(self, ctx: StepContext) -> None:
        """Called once after the step's training, before evaluation."""

    def step_metrics(self, ctx: StepContext) -> dict:
        """JSON numbers the method measured in this step, kept in the step's record (metrics.json, and the
        `steps` of results.json) under `method_metrics.<name>`; {} adds nothing."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what `state_dict` returned."""

    def step_state(self) -> dict:
        """What this process gathered since `on_task_start` and needs again after a mid-step resume."""
        return {}

    def load_step_state(self, state: dict) -> None:
        """Restores what `step_state` returned (called after `on_task_start`, before training resumes)."""
