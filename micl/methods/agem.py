"""A-GEM (Chaudhry et al., ICLR 2019, "Efficient Lifelong Learning with A-GEM"), as an optimizer-step hook.

An episodic memory keeps `memory_size` training samples of every learned task (reservoir sampling at the end
of the task, kept and rendered as replay does: `micl/methods/replay.py`). From the second step on, at every
optimizer step, once the gradient g of the global batch is ready (`before_optimizer_step`,
micl/methods/base.py), the reference gradient g_ref of the mean token cross-entropy on a memory batch of
`memory_batch_size` samples is computed, and where the two conflict, g is projected:

    g . g_ref < 0:   g <- g - (g . g_ref / g_ref . g_ref) g_ref      (then g . g_ref = 0)
    otherwise:       g unchanged

over all trainable parameters as one vector (adapter, projectors, media modulator), so that to first order
the step does not increase the loss on the memory. Clipping and the optimizer step then use the projected g.

Choices the paper leaves open, or that micl's setting adds:
- The memory batch is stratified over the past tasks (replay's `stratified_draw`), the paper's uniform draw
  over the whole memory with less variance: every past task is in every reference gradient.
- g_ref is the gradient of the model as it is, in eval mode: no dropout, and no training-mode side effect of
  the extra forward (MoE expert counts, Harmony's random perturbation, the global RNG); taken with
  `torch.autograd.grad` on the unwrapped model, so `.grad` and DDP's gradient reduction are not touched.
- The draw is seeded by (seed, step, epoch, the sample indices of this process's micro-batches of the optimizer
  step): a step resumed from a within-step checkpoint (the Trainer restores its sampler) draws the same
  memory batches as an uninterrupted run, and nothing needs saving within a step.
- Several processes (DDP): g is already all-reduced; every process draws its own memory batch (its own
  micro-batches seed it), computes its g_ref, and the g_ref are averaged (one all-reduce): the reference
  gradient of N x `memory_batch_size` samples, as g is that of the global batch. Every process then takes
  the same decision and applies the same projection, so the replicas stay equal.
- A parameter with no gradient from the global batch (e.g. the projector of a modality only the memory has)
  gets the projection's component -(g . g_ref / g_ref . g_ref) g_ref, as the projection of the whole
  vector prescribes.
- Under fp16 with a loss scaler, g is still scaled at the hook; the projection is linear in g and the
  decision depends on the sign of g . g_ref only, so it commutes with the scale.
- DeepSpeed keeps gradients in its own buffers, not `.grad`: refused (`supports_deepspeed = False`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..modeling.multimodal import model_inputs, move_to
from .base import ContinualMethod, StepContext, draw_key, unwrap_model
from .registry import register
from .replay import Replay, ReplayArgs


@dataclass
class AGEMArgs:
    memory_size: int = field(default=64, metadata={"help": "training samples kept per learned task"})
    memory_batch_size: int = field(default=8, metadata={
        "help": "memory samples per optimizer step and process (the batch of the reference gradient)"})

    def __post_init__(self):
        for key in ("memory_size", "memory_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"'method_args.agem.{key}' must be an integer >= 1, got {value!r}")


def project(grads: list[torch.Tensor | None], reference: list[torch.Tensor], has_reference: list[bool]) -> bool:
    """A-GEM's projection of the gradient `grads` (None = zero) against `reference`, in place over all
    parameters as one vector; returns whether they conflicted. A None gradient whose parameter has a
    reference gradient is replaced by a tensor when the projection gives it a component."""
    dot = sum((g.double() * r.double()).sum() for g, r in zip(grads, reference) if g is not None)
    norm = sum((r.double() ** 2).sum() for r in reference)
    if not isinstance(dot, torch.Tensor) or not bool(dot < 0) or not bool(norm > 0):
        return False
    scale = dot / norm
    for i, (g, r) in enumerate(zip(grads, reference)):
        if g is not None:
            g.sub_((scale * r.double()).to(g.dtype))
        elif has_reference[i]:
            grads[i] = (-scale * r.double()).to(r.dtype)
    return True


@register
class AGEM(ContinualMethod):
    name = "agem"
    Args = AGEMArgs
    supports_deepspeed = False  # reads and changes .grad

    def __init__(self, args: AGEMArgs | None = None):
        super().__init__(args or AGEMArgs())
        self.memory = Replay(ReplayArgs(buffer_size=self.args.memory_size,
                                        replay_batch_size=self.args.memory_batch_size))
        self._calls = 0

    # ---- memory --------------------------------------------------------------------------------------
    def on_task_start(self, ctx: StepContext) -> None:
        self._calls = 0

    def on_task_end(self, ctx: StepContext) -> None:
        self.memory.on_task_end(ctx)

    def memory_batch(self, batches: list[dict], ctx: StepContext) -> dict | None:
        """The memory batch of this process for the optimizer step of `batches`, or None (empty memory)."""
        if not any(self.memory.buffers.values()):
            return None
        self._calls += 1  # only for batches without sample indices (not made by MultimodalCollator)
        key = "|".join(draw_key(batch, f"call{self._calls}.{i}") for i, batch in enumerate(batches))
        return ctx.collate_fn(self.memory.replay_items(ctx, self.memory.draw(ctx, key)))

    # ---- the projection ------------------------------------------------------------------------------
    def reference_gradient(self, model, params: list[torch.nn.Parameter], batch: dict):
        """(g_ref per parameter, whether the parameter got one) on a memory batch, in eval mode, averaged
        over the processes of a launch."""
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                loss = model(**move_to(model_inputs(batch), params[0].device)).loss
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            model.train(was_training)
        reference = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        used = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=params[0].device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            flat = torch.cat([r.flatten().float() for r in reference] + [used])
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
            offset = 0
            for i, r in enumerate(reference):
                reference[i] = flat[offset:offset + r.numel()].view_as(r).to(r.dtype)
                offset += r.numel()
            used = flat[offset:]
        return reference, (used > 0).tolist()

    def before_optimizer_step(self, model, batches: list[dict], ctx: StepContext) -> None:
        batch = self.memory_batch(batches, ctx)
        if batch is None:
            return
        module = unwrap_model(ctx.model if ctx.model is not None else model)
        params = [p for p in module.parameters() if p.requires_grad]
        reference, has_reference = self.reference_gradient(module, params, batch)
        grads = [p.grad for p in params]
        if project(grads, reference, has_reference):
            for p, g in zip(params, grads):
                if p.grad is None and g is not None:
                    p.grad = g

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)
