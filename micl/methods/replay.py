"""Experience replay: a small memory of each past task's training samples, rehearsed alongside new tasks.

At the end of each task, `buffer_size` of its training samples are chosen by reservoir sampling
(algorithm R over the sample indices, `Random("replay:<seed>:<step>")`), so every sample is kept with the
same probability and the choice only depends on the seed and the step. Each past task has its own buffer
of at most `buffer_size` samples, so old tasks are not crowded out by newer ones. Only (task name, sample
index) pairs are kept; the items are rendered again through `ctx.dataset_fn(task, "train")[index]` (the
media features are cached), with the training template of the current epoch.

Every training batch then adds `weight * CE` of the model on a replay mini-batch of `replay_batch_size`
samples, stratified over the past tasks: each task gets floor(B / T) samples, the B mod T remaining slots go
to distinct tasks chosen at random, so within a batch every past task contributes within one sample of
B / T. Samples are drawn without replacement within a task while its buffer lasts.

The draw is seeded by (seed, step, epoch, the indices of the current batch's samples), not by a call
counter: a step resumed from a within-step checkpoint sees the same batches (the Trainer restores its RNG
and sampler state) and therefore rehearses the same replay samples, like an uninterrupted run. Without
sample indices in the batch, a per-step call counter is used instead (then a resumed step re-draws).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..modeling.multimodal import model_inputs
from ..modeling.prompting import target_tokens
from .base import ContinualMethod, StepContext, TokenSum, batch_rng, draw_key, step_rng
from .registry import register


@dataclass
class ReplayArgs:
    buffer_size: int = field(default=64, metadata={"help": "samples kept per past task"})
    replay_batch_size: int = field(default=4, metadata={"help": "replayed samples added to every training batch"})
    weight: float = field(default=1.0, metadata={"help": "weight of the replay cross-entropy"})

    def __post_init__(self):
        prefix = "method_args.replay."
        for key in ("buffer_size", "replay_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"'{prefix}{key}' must be an integer >= 1, got {value!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or self.weight < 0:
            raise ConfigError(f"'{prefix}weight' must be a number >= 0, got {self.weight!r}")


def reservoir_sample(n: int, k: int, rng: random.Random) -> list[int]:
    """Algorithm R: k of the indices 0..n-1, each kept with probability k / n, in one pass."""
    reservoir = list(range(min(n, k)))
    for i in range(k, n):
        j = rng.randint(0, i)
        if j < k:
            reservoir[j] = i
    return reservoir


def remember_task(buffers: dict[str, list[int]], task: str, size: int, share: int,
                  rng: random.Random) -> dict[str, list[int]]:
    """The memory after `task` (`size` training samples) is learned: a reservoir of `share` of its indices,
    last (a task learned again moves to the end with a fresh one), and every earlier task cut to `share`."""
    kept = {name: indices[:share] for name, indices in buffers.items() if name != task}
    return {**kept, task: reservoir_sample(size, share, rng)}


def as_buffers(pairs: list[tuple[str, int]]) -> dict[str, list[int]]:
    """(task, index) pairs as {task: indices}, in the order of the pairs."""
    buffers: dict[str, list[int]] = {}
    for task, index in pairs:
        buffers.setdefault(task, []).append(index)
    return buffers


def stratified_draw(buffers: dict[str, list[int]], batch_size: int, rng: random.Random) -> list[tuple[str, int]]:
    """(task, index) pairs: floor(B / T) per task, the B mod T extra slots to distinct random tasks."""
    tasks = [t for t, indices in buffers.items() if indices]
    if not tasks:
        return []
    base, extra = divmod(batch_size, len(tasks))
    lucky = set(rng.sample(range(len(tasks)), extra))
    draw = []
    for position, task in enumerate(tasks):
        count = base + (position in lucky)
        pool = buffers[task]
        picked = rng.sample(pool, min(count, len(pool)))
        picked += [rng.choice(pool) for _ in range(count - len(picked))]  # a buffer smaller than its share
        draw.extend((task, index) for index in picked)
    return draw


def training_items(ctx: StepContext, pairs: list[tuple[str, int]], epoch: int) -> list[dict]:
    """The training items of (task name, sample index) pairs of the tasks learned so far, rendered through
    `ctx.dataset_fn(task, "train")` with `epoch`'s template (the shared dataset's own epoch left as it was)."""
    specs = {t.name: t for t in ctx.seen_tasks}
    specs.setdefault(ctx.task.name, ctx.task)
    items = []
    for task, index in pairs:
        spec = specs.get(task)
        if spec is None:
            from ..data.tasks import get_task

            spec = specs[task] = get_task(task)
        dataset = ctx.dataset_fn(spec, "train")
        previous = getattr(dataset, "epoch", None)
        if previous is not None:
            dataset.set_epoch(epoch)
        try:
            items.append(dataset[index])
        finally:
            if previous is not None:
                dataset.set_epoch(previous)
    return items


@register
class Replay(ContinualMethod):
    name = "replay"
    Args = ReplayArgs
    supports_zero3 = False  # per-rank draws can touch another modality's projector on one rank only
    loss_items = ("replay",)

    def __init__(self, args: ReplayArgs | None = None):
        super().__init__(args or ReplayArgs())
        self.buffers: dict[str, list[int]] = {}  # task name -> sample indices, in the order tasks were learned
        self._calls = 0

    # ---- buffer -------------------------------------------------------------------------------------
    def on_task_start(self, ctx: StepContext) -> None:
        self._calls = 0

    def on_task_end(self, ctx: StepContext) -> None:
        self.buffers = remember_task(self.buffers, ctx.task.name, len(ctx.train_dataset), self.args.buffer_size,
                                     step_rng("replay", ctx))

    def draw(self, ctx: StepContext, key: str) -> list[tuple[str, int]]:
        return stratified_draw(self.buffers, self.args.replay_batch_size, batch_rng("replay", ctx, key))

    def replay_items(self, ctx: StepContext, draw: list[tuple[str, int]]) -> list[dict]:
        return training_items(ctx, draw, ctx.epoch)

    # ---- loss ---------------------------------------------------------------------------------------
    def augment_batch(self, batch: dict, ctx: StepContext) -> dict:
        """Adds `replay`: the replay mini-batch drawn for this training batch (none while the buffers are empty)."""
        if not any(self.buffers.values()) or self.args.weight == 0:
            return batch
        self._calls += 1
        key = draw_key(batch, f"call{self._calls}")
        return {**batch, "replay": ctx.collate_fn(self.replay_items(ctx, self.draw(ctx, key)))}

    def count_loss_items(self, batch: dict) -> dict:
        return {"replay": target_tokens(batch["replay"]["labels"])} if "replay" in batch else {}

    def auxiliary_losses(self, model, batch: dict, ctx: StepContext):
        """weight * CE summed over the replay mini-batch's target tokens."""
        if "replay" in batch:
            outputs = model(**model_inputs(batch["replay"]))
            yield TokenSum(self.args.weight * outputs.loss_sum, "replay")

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"buffers": [[task, list(indices)] for task, indices in self.buffers.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {task: [int(i) for i in indices] for task, indices in (state or {}).get("buffers", [])}
