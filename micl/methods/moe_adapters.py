"""Cross-modality MoE adapters with expert freezing, representation alignment and knowledge preservation
(arXiv 2511.06723), as hooks over the `moe_lora` tuner (micl/adapters/moe_lora; recipe `lora.type: moe_lora`).
docs/moe_lora.md says where micl follows the paper and where it fills what the paper leaves open.

Per training batch, the loss is CE plus
- balance_coef * the mean, over the MoE layers that have no frozen expert yet, of the Switch load-balancing
  loss of the main forward (`MoeLoraLayer.balance_loss`). Once a layer freezes experts its balancing stops:
  pushing the new task's tokens toward the least used (trainable) experts would, through the shared router,
  pull the old tasks' tokens there too.
- align_weight * L_align on the main forward's final hidden states (`uses_hidden_states`): each modality's
  representation (the mean over the sample's tokens of that medium: image, audio or video, each on its own)
  is pulled toward the sample's joint representation, the hidden state at its last prompt position (the one
  position that has attended to every medium and the instruction: the LLM's fused summary, from which the
  answer starts), which is the anchor (stop-gradient): mean over (sample, modality) of 1 - cos(z_k, sg(z_joint)).
- From step 1 on, knowledge preservation on `memory_batch_size` samples of the memory, drawn per batch
  stratified over the past tasks (replay.stratified_draw), keyed by the batch's samples (draw_key), rendered
  with the epoch's template, in one student forward (eval mode: no dropout, and not counted in the expert
  statistics that decide this task's freezing) and one forward of the previous model (the shared
  `PreviousModelTeacher`):
  rehearsal_weight * CE + distill_weight * T^2 * KL(teacher || student) on the memory's target tokens,
  normalised by the memory target tokens of the global batch (TokenSum "moe_adapters.memory"), and
  preserve_weight * sqrt(t - 1) * sum_i KL(P_old_i || P_new_i), t the task number from 1, P = row-softmax of
  the cosine similarities of the memory samples' joint representations / preserve_temperature (diagonal left
  out), P_old from the teacher, P_new from the student. The KL and the preservation term are exactly 0 on
  the first batch of a task (student = teacher); the rehearsal CE is not.

Memory: `memory_size` samples in total over the tasks learned so far, an equal share per task (reservoir
sampling of each task's training indices, `Random("moe_adapters:<seed>:<step>")`; older tasks are trimmed to
the share when a task is added). Only (task, index) pairs are kept.

Expert statistics and freezing: counts are reset at the start of every task and read at its end (training-mode
forwards of the student adapter only; under several processes summed over ranks). In each MoE layer the
activation frequency of expert e is its share of that layer's activations; experts above `freeze_threshold`
are frozen for all later tasks: their A and B leave the optimizer (requires_grad False) and their router rows
enter the logits detached (no gradient). Frozen experts are kept in the method state, re-applied at every task
start (also after a resume), and their weights and router rows are written back bit-exactly at every epoch
and task end from a copy taken at task start (MoInCL's interpolation with an identical teacher value, or
weight decay on a router row, could otherwise move them). Per task a JSON
`<run_dir>/moe_adapters/step_<k>_<task>.json` holds counts, frequencies and the frozen experts per layer; the
same history is in `state_dict()`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..modeling.multimodal import model_inputs, move_to
from ..modeling.prompting import IGNORE_INDEX, target_tokens
from ..utils.io import atomic_write_json
from .base import ContinualMethod, StepContext, TokenSum, batch_rng, draw_key, step_rng, unwrap_model
from .distill import target_kd_loss_sum
from .registry import register
from .replay import as_buffers, remember_task, stratified_draw, training_items
from .teacher import PreviousModelTeacher

MEMORY_ITEMS = "moe_adapters.memory"


@dataclass
class MoeAdaptersArgs:
    balance_coef: float = field(default=0.01, metadata={
        "help": "weight of the load-balancing loss, in the MoE layers without frozen experts"})
    freeze_threshold: float = field(default=0.10, metadata={
        "help": "after each task, freeze experts whose share of their layer's activations exceeds this"})
    align_weight: float = field(default=0.1, metadata={"help": "weight of the representation alignment loss"})
    rehearsal_weight: float = field(default=1.0, metadata={"help": "weight of the CE on memory samples"})
    distill_weight: float = field(default=1.0, metadata={
        "help": "weight of T^2 * KL(previous model || model) on the memory samples' target tokens"})
    distill_temperature: float = field(default=2.0, metadata={"help": "T of the distillation"})
    preserve_weight: float = field(default=1.0, metadata={
        "help": "weight of sqrt(t - 1) * sum_i KL(P_old_i || P_new_i) on memory samples"})
    preserve_temperature: float = field(default=0.1, metadata={"help": "temperature of the row-softmax"})
    memory_batch_size: int = field(default=8, metadata={
        "help": "memory samples per training batch (rehearsal, distillation, preservation)"})
    memory_size: int = field(default=200, metadata={"help": "memory samples in total over past tasks"})

    def __post_init__(self):
        prefix = "method_args.moe_adapters."

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for key in ("balance_coef", "align_weight", "rehearsal_weight", "distill_weight", "preserve_weight"):
            value = getattr(self, key)
            if not number(value) or value < 0:
                raise ConfigError(f"'{prefix}{key}' must be a number >= 0, got {value!r}")
        if not number(self.freeze_threshold) or not 0 <= self.freeze_threshold <= 1:
            raise ConfigError(f"'{prefix}freeze_threshold' must be in [0, 1], got {self.freeze_threshold!r}")
        for key in ("distill_temperature", "preserve_temperature"):
            value = getattr(self, key)
            if not number(value) or value <= 0:
                raise ConfigError(f"'{prefix}{key}' must be a number > 0, got {value!r}")
        for key, low in (("memory_batch_size", 2), ("memory_size", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"'{prefix}{key}' must be an integer >= {low}, got {value!r}")


# ---- representations and losses (pure functions, tested on their own) -----------------------------------
def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of hidden [B, T, d] over mask [B, T] per row, and whether the row had any position."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    count = m.sum(1)
    return (hidden * m).sum(1) / count.clamp(min=1.0), count.squeeze(-1) > 0


def prompt_mask(attention_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    mask = attention_mask.bool()
    if labels is not None:
        mask = mask & (labels == IGNORE_INDEX)
    return mask


def joint_representation(hidden: torch.Tensor, attention_mask, labels) -> torch.Tensor:
    """[B, d]: the final hidden state at each row's last prompt position (targets end a left-padded row, so
    it is the position that predicts the first target token; the last real token of a row without targets)."""
    prompt = prompt_mask(attention_mask, labels)
    positions = torch.arange(prompt.shape[1], device=prompt.device).expand_as(prompt)
    last = torch.where(prompt, positions, -1).amax(-1).clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def alignment_loss(hidden: torch.Tensor, attention_mask, labels, modality_masks: dict | None):
    """Mean over the (sample, modality) pairs present of 1 - cos(z_k, sg(z_joint)): z_k = mean final hidden state
    over the sample's tokens of modality k (`media_masks` of the batch), z_joint = `joint_representation`.
    None without media."""
    if not modality_masks:
        return None
    joint = joint_representation(hidden, attention_mask, labels).detach().float()
    total, pairs = hidden.new_zeros((), dtype=torch.float32), 0
    for mask in modality_masks.values():
        z, has = masked_mean(hidden, mask.to(hidden.device) & attention_mask.bool())
        distance = 1 - F.cosine_similarity(z.float(), joint, dim=-1)
        total = total + (distance * has).sum()
        pairs = pairs + has.sum()
    return total / pairs.clamp(min=1)


def similarity_distribution(reps: torch.Tensor, temperature: float) -> torch.Tensor:
    """log row-softmax of the cosine-similarity matrix / temperature, diagonal left out ([m, m], -inf there)."""
    z = F.normalize(reps.float(), dim=-1)
    sim = z @ z.t() / temperature
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    return torch.log_softmax(sim.masked_fill(eye, float("-inf")), dim=-1)


def preservation_kl(old_reps: torch.Tensor, new_reps: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over rows i of KL(P_old_i || P_new_i) (the diagonal has probability 0 in both)."""
    log_old = similarity_distribution(old_reps, temperature)
    log_new = similarity_distribution(new_reps, temperature)
    eye = torch.eye(log_old.shape[0], dtype=torch.bool, device=log_old.device)
    terms = log_old.exp() * (log_old - log_new)
    return terms.masked_fill(eye, 0.0).sum()


# ---- the method ------------------------------------------------------------------------------------------

def _llm(model):
    """The PEFT model inside a MultimodalLM (or the model itself)."""
    model = unwrap_model(model)
    return model.llm if hasattr(model, "llm") else model


@register
class MoeAdapters(ContinualMethod):
    name = "moe_adapters"
    Args = MoeAdaptersArgs
    requires_tuner = "moe_lora"
    uses_hidden_states = True
    uses_teacher = True
    loss_items = (MEMORY_ITEMS,)

    def __init__(self, args: MoeAdaptersArgs | None = None):
        super().__init__(args or MoeAdaptersArgs())
        self.frozen: dict[str, list[int]] = {}  # MoE layer name -> frozen expert ids
        self.memory: list[tuple[str, int]] = []  # (task, training index)
        self.history: list[dict] = []  # per finished task: counts, frequencies, newly frozen experts
        self.teacher: PreviousModelTeacher | None = None
        self._guarded: list[tuple[torch.nn.Parameter, torch.Tensor | None]] = []  # (param, frozen rows or all)
        self._snapshot: list[torch.Tensor] = []
        self._layers: list = []  # the MoE layers of the model, found at task start
        self._balanced: list = []  # those without frozen experts: the load-balancing loss applies to them
        self._calls = 0

    # ---- model access --------------------------------------------------------------------------------
    @staticmethod
    def layers(model) -> dict:
        from ..adapters.moe_lora import moe_layers

        return moe_layers(_llm(model))

    @staticmethod
    def _adapter(model) -> str:
        active = _llm(model).active_adapter
        return active if isinstance(active, str) else active[0]

    def _check(self, model) -> dict:
        layers = self.layers(model)
        if not layers:
            raise ConfigError("method 'moe_adapters' needs the moe_lora tuner: set 'lora.type: moe_lora' in the "
                              "recipe (with lora.num_experts, lora.top_k, lora.routing)")
        return layers

    def _frozen_params(self, model) -> list[torch.nn.Parameter]:
        adapter = self._adapter(model)
        params = []
        for name, layer in self.layers(model).items():
            for e in self.frozen.get(name, []):
                params += [layer.moe_lora_A[adapter][e], layer.moe_lora_B[adapter][e]]
        return params

    def _guarded_values(self, model) -> list[tuple[torch.nn.Parameter, torch.Tensor | None]]:
        """What must not move during a task: the frozen experts' A and B (whole) and, of every router, the rows
        of its frozen experts."""
        adapter, guarded = self._adapter(model), []
        layers = self.layers(model)
        guarded += [(param, None) for param in self._frozen_params(model)]
        for name, ids in self.frozen.items():
            if ids:
                guarded.append((layers[name].moe_lora_router[adapter].weight, torch.tensor(sorted(ids))))
        return guarded

    def _apply_frozen(self, model) -> None:
        layers, adapter = self.layers(model), self._adapter(model)
        unknown = sorted(set(self.frozen) - set(layers))
        if unknown:
            raise ConfigError(f"moe_adapters: saved state freezes experts of layers the model does not have "
                              f"({unknown[0]}, ...); was the run started with other lora settings?")
        for name, ids in self.frozen.items():
            layers[name].freeze_experts(ids, adapter)

    def _take_snapshot(self, model) -> None:
        """The guarded values at task start (full values under ZeRO-3; a router's trained fp32 value under
        DeepSpeed, whose master copy would otherwise overwrite a restored row at the next step)."""
        from ..utils.distributed import gathered, trained_value

        self._guarded = self._guarded_values(model)
        params = [param for param, _ in self._guarded]
        with torch.no_grad(), gathered(params):
            self._snapshot = [param.detach().clone() if rows is None else trained_value(param)[rows].clone()
                              for param, rows in self._guarded]

    def _restore_frozen(self) -> None:
        """Writes back the guarded values of the task start (bit-exact). Under ZeRO-3 on the full (gathered)
        tensors, on every rank (a collective): every rank holds the same values, so takes the same branch."""
        from ..utils.distributed import gathered, set_trained_value, trained_value

        if not self._guarded:
            return
        with torch.no_grad(), gathered([param for param, _ in self._guarded], modifier_rank=0):
            for (param, rows), value in zip(self._guarded, self._snapshot):
                if rows is None:
                    if not torch.equal(param, value):
                        param.copy_(value)
                    continue
                current = trained_value(param)
                if not torch.equal(current[rows], value):
                    current = current.clone()
                    current[rows] = value
                    set_trained_value(param, current)

    def _memory_losses_on(self, ctx: StepContext) -> bool:
        a = self.args
        return ctx.step > 0 and bool(self.memory) and bool(a.rehearsal_weight or a.distill_weight or a.preserve_weight)

    # ---- hooks ---------------------------------------------------------------------------------------
    def on_task_start(self, ctx: StepContext) -> None:
        layers = self._check(ctx.model)
        self._layers = list(layers.values())
        self._apply_frozen(ctx.model)
        for layer in layers.values():
            layer.reset_expert_counts()
        self._balanced = [layers[name] for name in layers if not self.frozen.get(name)]
        self._take_snapshot(ctx.model)
        self._calls = 0
        if not self._memory_losses_on(ctx):
            return
        tasks = len({task for task, _ in self.memory})
        if ctx.uniform_forwards and tasks > self.args.memory_batch_size:
            raise ConfigError(f"method_args.moe_adapters.memory_batch_size ({self.args.memory_batch_size}) must be "
                              f">= the number of past tasks ({tasks}) under DeepSpeed with several processes: every "
                              f"rank's memory draw must hold every past task, so that all ranks run the same "
                              f"projectors")
        if self.args.distill_weight or self.args.preserve_weight:
            self.teacher = PreviousModelTeacher.acquire(ctx.model)

    def on_epoch_end(self, ctx: StepContext) -> None:
        self._restore_frozen()

    def on_task_end(self, ctx: StepContext) -> None:
        self._restore_frozen()
        if self.teacher is not None:
            self.teacher.remove()
        self.teacher = None
        model = unwrap_model(ctx.model)
        layers, adapter = self.layers(model), self._adapter(model)
        counts = {name: layer.expert_counts(adapter) for name, layer in layers.items()}
        units = {name: layer.routed_units(adapter) for name, layer in layers.items()}
        counts, units = self._reduce_over_ranks(counts, units)
        record = {"step": ctx.step, "task": getattr(ctx.task, "name", str(ctx.task)),
                  "freeze_threshold": self.args.freeze_threshold, "balanced_layers": len(self._balanced),
                  "layers": {}}
        for name, layer in layers.items():
            total = int(counts[name].sum())
            freq = (counts[name].double() / total).tolist() if total else [0.0] * len(counts[name])
            before = set(self.frozen.get(name, []))
            new = [e for e, f in enumerate(freq) if f > self.args.freeze_threshold and e not in before]
            if new:
                self.frozen[name] = sorted(before | set(new))
                layer.freeze_experts(new, adapter)
            record["layers"][name] = {"counts": [int(c) for c in counts[name]], "units": int(units[name]),
                                      "frequency": [round(f, 6) for f in freq], "newly_frozen": new,
                                      "frozen": sorted(before | set(new))}
        record["frozen_experts"] = sum(len(v) for v in self.frozen.values())
        record["experts"] = sum(layer.num_experts[adapter] for layer in layers.values())
        self.history.append(record)
        self._write_record(ctx, record)
        self._update_memory(ctx)
        self._guarded, self._snapshot = [], []

    @staticmethod
    def _reduce_over_ranks(counts: dict, units: dict):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return counts, units
        names = list(counts)
        flat = torch.cat([counts[n].double() for n in names] + [torch.tensor([float(units[n]) for n in names])])
        if torch.distributed.get_backend() == "nccl":
            flat = flat.cuda()
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        out, offset = {}, 0
        for n in names:
            size = counts[n].numel()
            out[n] = flat[offset:offset + size].round().long()
            offset += size
        return out, {n: int(flat[offset + i]) for i, n in enumerate(names)}

    @staticmethod
    def _write_record(ctx: StepContext, record: dict) -> None:
        from ..utils.distributed import is_main_process

        if not ctx.run_dir or not is_main_process():
            return
        atomic_write_json(Path(ctx.run_dir) / "moe_adapters" / f"step_{record['step']}_{record['task']}.json", record)

    # ---- memory --------------------------------------------------------------------------------------
    def _update_memory(self, ctx: StepContext) -> None:
        if self.args.memory_size == 0:
            return
        buffers = as_buffers(self.memory)
        share = max(self.args.memory_size // len({*buffers, ctx.task.name}), 1)  # equal shares of the total
        buffers = remember_task(buffers, ctx.task.name, len(ctx.train_dataset), share, step_rng("moe_adapters", ctx))
        self.memory = [(task, index) for task, indices in buffers.items() for index in indices]

    def draw_memory(self, ctx: StepContext, key: str) -> list[tuple[str, int]]:
        """`memory_batch_size` memory samples, floor(B / T) per past task and the rest to distinct random ones."""
        return stratified_draw(as_buffers(self.memory), self.args.memory_batch_size, batch_rng("moe_adapters", ctx, key))

    # ---- per batch -----------------------------------------------------------------------------------
    def augment_batch(self, batch: dict, ctx: StepContext) -> dict:
        """Adds `moe_adapters`: the memory mini-batch drawn for this training batch (from step 1 on)."""
        if not self._memory_losses_on(ctx):
            return batch
        self._calls += 1
        draw = self.draw_memory(ctx, draw_key(batch, f"call{self._calls}"))
        return {**batch, "moe_adapters": ctx.collate_fn(training_items(ctx, draw, ctx.epoch))}

    def count_loss_items(self, batch: dict) -> dict:
        memory = batch.get("moe_adapters")
        return {MEMORY_ITEMS: target_tokens(memory["labels"])} if memory is not None else {}

    def auxiliary_losses(self, model, batch: dict, ctx: StepContext):
        """Rehearsal + distillation (TokenSum over the memory's target tokens) and the preservation KL (a
        per-batch regulariser), from one teacher and one student forward over the memory mini-batch."""
        memory = batch.get("moe_adapters")
        if memory is None:
            return
        a = self.args
        inputs = move_to(model_inputs(memory), batch["input_ids"].device)
        old = None
        if self.teacher is not None:
            old = self.teacher.outputs(inputs, output_hidden_states=True)
        was_training = model.training
        model.eval()  # no dropout (the teacher has none), and not counted in this task's expert statistics
        try:
            new = model(**inputs, output_hidden_states=True)
        finally:
            model.train(was_training)
        labels = inputs["labels"]
        memory_sum = a.rehearsal_weight * new.loss_sum
        if old is not None and a.distill_weight:
            kd = target_kd_loss_sum(new.logits, old.logits, labels, a.distill_temperature)
            memory_sum = memory_sum + a.distill_weight * kd
        losses = [TokenSum(memory_sum, MEMORY_ITEMS)]
        if old is not None and a.preserve_weight and labels.shape[0] >= 2:
            mask = inputs["attention_mask"]
            kl = preservation_kl(joint_representation(old.hidden_states, mask, labels),
                                 joint_representation(new.hidden_states, mask, labels), a.preserve_temperature)
            losses.append(a.preserve_weight * math.sqrt(ctx.step) * kl)
        yield losses

    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        if not model.training:
            return None
        total = None
        if self.args.balance_coef and self._balanced:
            adapter = self._adapter(model)
            losses = [layer.balance_loss(adapter) for layer in self._balanced]
            losses = [x for x in losses if x is not None]
            if losses:
                total = self.args.balance_coef * torch.stack(losses).mean()
        hidden = outputs.hidden_states
        if self.args.align_weight and hidden is not None:
            align = alignment_loss(hidden, batch["attention_mask"], batch.get("labels"), batch.get("media_masks"))
            if align is not None:
                align = self.args.align_weight * align
                total = align if total is None else total + align
        return total

    # ---- state ---------------------------------------------------------------------------------------
    def step_state(self) -> dict:
        """This process's expert activation counts so far in the task (the end-of-task freezing reads them)."""
        if not self._layers:
            return {}
        return {"experts": [layer.expert_statistics() for layer in self._layers]}

    def load_step_state(self, state: dict) -> None:
        statistics = (state or {}).get("experts", [])
        if len(statistics) != len(self._layers or []):
            raise RuntimeError(f"moe_adapters: checkpoint has expert statistics of {len(statistics)} layers, the model "
                               f"{len(self._layers or [])}")
        for layer, values in zip(self._layers, statistics):
            layer.load_expert_statistics(values)

    def state_dict(self) -> dict:
        return {"frozen": {k: list(v) for k, v in self.frozen.items()},
                "memory": [[t, int(i)] for t, i in self.memory],
                "history": json.loads(json.dumps(self.history))}

    def load_state_dict(self, state: dict) -> None:
        state = state or {}
        self.frozen = {k: sorted(int(i) for i in v) for k, v in state.get("frozen", {}).items()}
        self.memory = [(t, int(i)) for t, i in state.get("memory", [])]
        self.history = list(state.get("history", []))
