"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), over the trainable parameters only
(LoRA + projectors; the frozen LLM never moves, so it needs no anchor).

After each task the diagonal of the (empirical) Fisher information is estimated on that task's training
samples as the mean over mini-batches of the squared gradient of the training loss; every later training
batch then pays

    lambda_ewc / 2 * sum_i F_i * (theta_i - theta*_i)^2

Two ways to combine the tasks, as in Avalanche's `EWCPlugin`:
  * "online" (default; Schwarz et al. 2018, "online EWC"): one Fisher, accumulated as
    F <- decay * F + F_task, and one anchor theta* = the parameters after the last task. Memory stays
    constant in the number of tasks; decay = 1 sums the Fishers of all tasks.
  * "separate" (the original paper): one (Fisher, anchor) pair per finished task and one penalty term
    per task; memory grows with the number of tasks.

The Fisher is computed with the plain cross-entropy of the task (not with other methods' extra losses),
in eval mode (no LoRA dropout, so it is deterministic), with `torch.autograd.grad`: the parameters' `.grad`
fields are not touched. Samples: `fisher_samples` training samples drawn without replacement from
`Random("ewc:<seed>:<step>")` (null = all of them), in batches of `FISHER_BATCH_SIZE`. A parameter that gets
no gradient from the task (the projector of a modality the task does not use) has Fisher 0 and is not
constrained by that task. Fisher and anchors are kept on the CPU in float32 and copied to the model's device
once per task.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..modeling.multimodal import model_inputs, move_to
from .base import ContinualMethod, StepContext, unwrap_model
from .registry import register

FISHER_BATCH_SIZE = 4
MODES = ("online", "separate")


@dataclass
class EWCArgs:
    lambda_ewc: float = field(default=100.0, metadata={"help": "weight of the quadratic penalty"})
    fisher_samples: int | None = field(
        default=64, metadata={"help": "training samples of a finished task to estimate its Fisher on; null = all"}
    )
    mode: str = field(default="online", metadata={"choices": list(MODES),
                                                  "help": "online: one decayed, accumulated Fisher; "
                                                          "separate: one Fisher + anchor per task"})
    decay: float = field(default=1.0, metadata={"help": "online mode: F <- decay * F + F_task, in (0, 1]"})

    def __post_init__(self):
        prefix = "method_args.ewc."
        if isinstance(self.lambda_ewc, bool) or not isinstance(self.lambda_ewc, (int, float)) or self.lambda_ewc < 0:
            raise ConfigError(f"'{prefix}lambda_ewc' must be a number >= 0, got {self.lambda_ewc!r}")
        if self.fisher_samples is not None and (
                isinstance(self.fisher_samples, bool) or not isinstance(self.fisher_samples, int)
                or self.fisher_samples < 1):
            raise ConfigError(f"'{prefix}fisher_samples' must be null or an integer >= 1, got {self.fisher_samples!r}")
        if self.mode not in MODES:
            raise ConfigError(f"'{prefix}mode' must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 < self.decay <= 1:
            raise ConfigError(f"'{prefix}decay' must be in (0, 1], got {self.decay!r}")


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unwrap_model(model).named_parameters() if p.requires_grad}


def fisher_sample_indices(n: int, limit: int | None, seed: int, step: int) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(f"ewc:{seed}:{step}").sample(range(n), limit))


def estimate_fisher(model, dataset, collate_fn, indices: list[int],
                    batch_size: int = FISHER_BATCH_SIZE) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over mini-batches of the squared gradient of the mean token CE.

    Keys are the names of the trainable parameters; values are float32 CPU tensors (zero where the loss
    does not depend on the parameter). The model is put in eval mode and its training mode restored."""
    model = unwrap_model(model)
    params = trainable_parameters(model)
    names = list(params)
    fisher = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    if not indices or not names:
        return {name: f.cpu() for name, f in fisher.items()}
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for start in range(0, len(indices), batch_size):
            batch = collate_fn([dataset[i] for i in indices[start:start + batch_size]])
            inputs = move_to(model_inputs(batch), device)
            with torch.enable_grad():
                loss = model(**inputs).loss
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    fisher[name] += grad.detach().float() ** 2
            batches += 1
    finally:
        model.train(was_training)
    return {name: (f / batches).cpu() for name, f in fisher.items()}


def ewc_penalty(params: dict[str, torch.Tensor], terms: list[tuple[dict, dict]]) -> torch.Tensor | None:
    """sum over terms and names of sum(F * (theta - theta*)^2), without the lambda / 2 factor.

    `terms` holds (fisher, anchor) dicts keyed by parameter name, on the parameters' device."""
    total = None
    for fisher, anchor in terms:
        for name, f in fisher.items():
            p = params[name]
            value = (f * (p.float() - anchor[name]) ** 2).sum()
            total = value if total is None else total + value
    return total


@register
class EWC(ContinualMethod):
    name = "ewc"
    Args = EWCArgs
    supports_zero3 = False  # Fisher from autograd.grad of partitioned weights

    def __init__(self, args: EWCArgs | None = None):
        super().__init__(args or EWCArgs())
        # online: at most one entry; separate: one per finished task. Each: {"task", "fisher", "anchor"}
        self.terms: list[dict] = []
        self._device_terms: tuple[torch.device, list[tuple[dict, dict]]] | None = None

    # ---- hooks --------------------------------------------------------------------------------------
    def on_task_end(self, ctx: StepContext) -> None:
        model = unwrap_model(ctx.model)
        dataset = ctx.train_dataset
        indices = fisher_sample_indices(len(dataset), self.args.fisher_samples, ctx.seed, ctx.step)
        fisher = estimate_fisher(model, dataset, ctx.collate_fn, indices)
        anchor = {name: p.detach().float().cpu().clone() for name, p in trainable_parameters(model).items()}
        task = getattr(ctx.task, "name", str(ctx.task))
        if self.args.mode == "online" and self.terms:
            previous = self.terms[0]["fisher"]
            for name, value in fisher.items():
                if name in previous:
                    value += self.args.decay * previous[name]
            self.terms = [{"task": task, "fisher": fisher, "anchor": anchor}]
        else:
            self.terms.append({"task": task, "fisher": fisher, "anchor": anchor})
        self._device_terms = None

    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        if not self.terms or self.args.lambda_ewc == 0:
            return None
        current = ctx.model if ctx is not None and ctx.model is not None else model
        params = trainable_parameters(current)
        # a parameter frozen since its Fisher was estimated (e.g. an expert frozen by moe_adapters) cannot
        # move: its penalty is a constant and is left out; one that is gone from the model is an error
        existing = {name for name, _ in current.named_parameters()}
        missing = sorted({n for t in self.terms for n in t["fisher"] if n not in existing})
        if missing:
            raise RuntimeError(f"ewc: the model has no trainable parameter {missing[0]!r} "
                               f"(and {len(missing) - 1} more) that the Fisher was estimated on")
        device = next(iter(params.values())).device
        if self._device_terms is None or self._device_terms[0] != device:
            # names with an all-zero Fisher (e.g. the projector of a modality not seen yet) add nothing
            self._device_terms = (device, [
                ({n: f.to(device) for n, f in t["fisher"].items() if f.any() and n in params},
                 {n: t["anchor"][n].to(device) for n, f in t["fisher"].items() if f.any() and n in params})
                for t in self.terms
            ])
        penalty = ewc_penalty(params, self._device_terms[1])
        if penalty is None:
            return None
        return 0.5 * self.args.lambda_ewc * penalty

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "mode": self.args.mode,
            "terms": [{"task": t["task"], "fisher": dict(t["fisher"]), "anchor": dict(t["anchor"])}
                      for t in self.terms],
        }

    def load_state_dict(self, state: dict) -> None:
        terms = state.get("terms", []) if state else []
        if terms and state.get("mode", self.args.mode) != self.args.mode:
            raise ConfigError(f"ewc: saved state is for mode {state.get('mode')!r}, "
                              f"but 'method_args.ewc.mode' is {self.args.mode!r}")
        self.terms = [{"task": t["task"],
                       "fisher": {n: v.detach().float().cpu().clone() for n, v in t["fisher"].items()},
                       "anchor": {n: v.detach().float().cpu().clone() for n, v in t["anchor"].items()}}
                      for t in terms]
        self._device_terms = None
