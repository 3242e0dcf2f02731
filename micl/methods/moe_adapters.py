"""Cross-modality MoE adapters with expert freezing, representation alignment and knowledge preservation
(arXiv 2511.06723), as hooks over the `moe_lora` tuner (micl/adapters/moe_lora; recipe `lora.type: moe_lora`).

Per training batch, the loss is CE plus
- balance_coef * mean over MoE layers of the Switch load-balancing loss of the main forward
  (E * sum_e f_e * P_e, 1 when balanced; `MoeLoraLayer.balance_loss`);
- align_weight * L_align. The paper pulls each modality's representation toward the fused joint one. Here,
  on the LLM's final hidden states of the main batch (the LM head's input at every position:
  `outputs.hidden_states` of the main forward, which the trainer asks for because the class declares
  `uses_hidden_states`): z_media = mean over the sample's media tokens, z_text = mean over its prompt text
  tokens (attention mask 1, label -100, not media), z_joint = mean over all its prompt tokens (media + text);
  L_align = mean over samples with media of [(1 - cos(z_media, sg(z_joint))) + (1 - cos(z_text, sg(z_joint)))] / 2,
  the joint representation being the anchor (stop-gradient), so each modality moves toward it and not the
  reverse. Samples without media tokens or without text tokens contribute only the terms they have.
- preserve_weight * sqrt(t - 1) * sum_i KL(P_old_i || P_new_i) from step t = 2 on (t counted from 1): for
  `preserve_batch_size` samples drawn from the memory, P = row-softmax(cos-similarity / preserve_temperature)
  of their joint representations, the diagonal (self-similarity, always 1) left out; P_old from the
  representations stored at the end of the previous task (no second model copy), P_new from the current model.
  The memory forward runs in eval mode (no dropout, not counted in the expert statistics) with gradients, as
  an auxiliary loss (own backward); the old representations were computed in eval mode too, so the loss is 0
  exactly when the model has not changed.

Memory: `memory_size` samples in total over the tasks learned so far, an equal share per task (reservoir
sampling of each task's training indices, `Random("moe_adapters:<seed>:<step>")`; older tasks are trimmed
to the share when a task is added). Only (task, index) pairs are kept; items are rendered through
`ctx.dataset_fn(task, "train")` with the epoch-0 template, so the prompt of a memory sample never changes.

Expert statistics and freezing: counts are reset at the start of every task and read at its end (training-
mode forwards of the student adapter only: one count per (non-padding token, chosen expert) with token
routing, per (sample, chosen expert) with sample routing; under several processes summed over ranks). In
each MoE layer the activation frequency of expert e is its share of that layer's activations
(count_e / sum of counts, so uniform routing gives 1/E = 10% with E = 10); experts above `freeze_threshold`
are frozen for all later tasks (requires_grad False on their own parameters: no gradient, not in the next
task's optimizer; the router stays trainable). Frozen experts are kept in the method state, re-applied at
every task start (also after a resume), and restored bit-exactly at every epoch and task end from a copy
taken at task start (MoInCL's LoRA interpolation with an identical teacher value could otherwise move them
by an ulp). Per task a JSON `<run_dir>/moe_adapters/step_<k>_<task>.json` holds counts, frequencies and the
frozen experts per layer; the same history is in `state_dict()` (`method_state.pt` of every phase).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..modeling.multimodal import model_inputs, move_to
from ..utils.io import atomic_write_json
from .base import ContinualMethod, StepContext, draw_key, unwrap_model
from .registry import register
from .replay import reservoir_sample


@dataclass
class MoeAdaptersArgs:
    balance_coef: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss"})
    freeze_threshold: float = field(default=0.10, metadata={
        "help": "after each task, freeze experts whose share of their layer's activations exceeds this"})
    align_weight: float = field(default=0.1, metadata={"help": "weight of the representation alignment loss"})
    preserve_weight: float = field(default=1.0, metadata={
        "help": "weight of sqrt(t - 1) * sum_i KL(P_old_i || P_new_i) on memory samples"})
    preserve_temperature: float = field(default=0.1, metadata={"help": "temperature of the row-softmax"})
    preserve_batch_size: int = field(default=8, metadata={"help": "memory samples per training batch"})
    memory_size: int = field(default=200, metadata={"help": "memory samples in total over past tasks"})
    memory_batch_size: int = field(default=8, metadata={"help": "batch size when storing old representations"})

    def __post_init__(self):
        prefix = "method_args.moe_adapters."

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for key in ("balance_coef", "align_weight", "preserve_weight"):
            value = getattr(self, key)
            if not number(value) or value < 0:
                raise ConfigError(f"'{prefix}{key}' must be a number >= 0, got {value!r}")
        if not number(self.freeze_threshold) or not 0 <= self.freeze_threshold <= 1:
            raise ConfigError(f"'{prefix}freeze_threshold' must be in [0, 1], got {self.freeze_threshold!r}")
        if not number(self.preserve_temperature) or self.preserve_temperature <= 0:
            raise ConfigError(f"'{prefix}preserve_temperature' must be > 0, got {self.preserve_temperature!r}")
        for key, low in (("preserve_batch_size", 2), ("memory_size", 0), ("memory_batch_size", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"'{prefix}{key}' must be an integer >= {low}, got {value!r}")


# ---- losses (pure functions, tested on their own) --------------------------------------------------------
def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of hidden [B, T, d] over mask [B, T] per row, and whether the row had any position."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    count = m.sum(1)
    return (hidden * m).sum(1) / count.clamp(min=1.0), count.squeeze(-1) > 0


def prompt_mask(attention_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    mask = attention_mask.bool()
    if labels is not None:
        mask = mask & (labels == -100)
    return mask


def alignment_loss(hidden: torch.Tensor, attention_mask, media_mask, labels) -> torch.Tensor | None:
    """Mean over samples of the (1 - cos) distances of z_media and z_text to the stop-gradient z_joint."""
    prompt = prompt_mask(attention_mask, labels)
    media = media_mask.bool() & prompt
    text = prompt & ~media
    joint, has_joint = masked_mean(hidden, prompt)
    joint = joint.detach()
    terms = []
    for mask in (media, text):
        z, has = masked_mean(hidden, mask)
        keep = has & has_joint
        if keep.any():
            terms.append((1 - F.cosine_similarity(z[keep].float(), joint[keep].float(), dim=-1)).sum()
                         / max(int(has_joint.sum()), 1))
    if not terms or not bool((media.any(-1)).any()):
        return None
    return sum(terms) / len(terms)


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

    def __init__(self, args: MoeAdaptersArgs | None = None):
        super().__init__(args or MoeAdaptersArgs())
        self.frozen: dict[str, list[int]] = {}  # MoE layer name -> frozen expert ids
        self.memory: list[tuple[str, int]] = []  # (task, training index)
        self.old_reps: torch.Tensor | None = None  # [len(memory), d] joint representations, CPU float32
        self.history: list[dict] = []  # per finished task: counts, frequencies, newly frozen experts
        self._snapshot: dict[int, torch.Tensor] = {}
        self._snapshot_params: list[torch.nn.Parameter] = []
        self._layers: list = []  # the MoE layers of the model, found at task start
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

    def _apply_frozen(self, model) -> None:
        layers, adapter = self.layers(model), self._adapter(model)
        unknown = sorted(set(self.frozen) - set(layers))
        if unknown:
            raise ConfigError(f"moe_adapters: saved state freezes experts of layers the model does not have "
                              f"({unknown[0]}, ...); was the run started with other lora settings?")
        for name, ids in self.frozen.items():
            layers[name].freeze_experts(ids, adapter)

    def _restore_frozen(self) -> None:
        """Writes back the frozen experts' values of the task start (bit-exact). Under ZeRO-3 on the full
        (gathered) tensors, on every rank (a collective)."""
        from ..utils.distributed import gathered

        if not self._snapshot:
            return
        with torch.no_grad(), gathered(self._snapshot_params, modifier_rank=0):
            for param, value in zip(self._snapshot_params, self._snapshot.values()):
                if not torch.equal(param, value):
                    param.copy_(value)

    # ---- hooks ---------------------------------------------------------------------------------------
    def on_task_start(self, ctx: StepContext) -> None:
        from ..utils.distributed import gathered

        layers = self._check(ctx.model)
        self._layers = list(layers.values())
        self._apply_frozen(ctx.model)
        for layer in layers.values():
            layer.reset_expert_counts()
        self._snapshot_params = self._frozen_params(ctx.model)
        with torch.no_grad(), gathered(self._snapshot_params):  # full values under ZeRO-3
            self._snapshot = {i: p.detach().clone() for i, p in enumerate(self._snapshot_params)}
        self._calls = 0

    def on_epoch_end(self, ctx: StepContext) -> None:
        self._restore_frozen()

    def on_task_end(self, ctx: StepContext) -> None:
        self._restore_frozen()
        model = unwrap_model(ctx.model)
        layers, adapter = self.layers(model), self._adapter(model)
        counts = {name: layer.expert_counts(adapter) for name, layer in layers.items()}
        units = {name: layer.routed_units(adapter) for name, layer in layers.items()}
        counts, units = self._reduce_over_ranks(counts, units)
        record = {"step": ctx.step, "task": getattr(ctx.task, "name", str(ctx.task)),
                  "freeze_threshold": self.args.freeze_threshold, "layers": {}}
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
        self._store_old_reps(ctx)
        self._snapshot, self._snapshot_params = {}, []

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
        name = ctx.task.name
        tasks = [t for t, _ in self.memory if t != name]
        order = list(dict.fromkeys(tasks)) + [name]
        share = max(self.args.memory_size // len(order), 1)
        rng = random.Random(f"moe_adapters:{ctx.seed}:{ctx.step}")
        new = [(name, i) for i in reservoir_sample(len(ctx.train_dataset), share, rng)]
        kept = []
        for task in order[:-1]:
            kept += [pair for pair in self.memory if pair[0] == task][:share]
        self.memory = kept + new

    def _memory_batch(self, ctx: StepContext, pairs: list[tuple[str, int]]) -> dict:
        from ..data.tasks import get_task

        specs = {t.name: t for t in ctx.seen_tasks}
        specs.setdefault(ctx.task.name, ctx.task)
        items = []
        for task, index in pairs:
            dataset = ctx.dataset_fn(specs.get(task) or get_task(task), "train")
            previous = getattr(dataset, "epoch", None)
            if previous is not None:
                dataset.set_epoch(0)  # fixed template: a memory sample's prompt never changes
            try:
                items.append(dataset[index])
            finally:
                if previous is not None:
                    dataset.set_epoch(previous)
        return ctx.collate_fn(items)

    def _joint_reps(self, model, batch: dict, device) -> torch.Tensor:
        """Joint representations (mean final hidden state over the prompt tokens) of a memory batch."""
        inputs = move_to({k: v for k, v in model_inputs(batch).items() if k != "labels"}, device)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        mask = prompt_mask(inputs["attention_mask"], batch["labels"].to(device))
        return masked_mean(hidden, mask)[0]

    @torch.no_grad()
    def _store_old_reps(self, ctx: StepContext) -> None:
        if not self.memory:
            self.old_reps = None
            return
        model = unwrap_model(ctx.model)
        was_training = model.training
        model.eval()
        reps = []
        try:
            for start in range(0, len(self.memory), self.args.memory_batch_size):
                batch = self._memory_batch(ctx, self.memory[start:start + self.args.memory_batch_size])
                reps.append(self._joint_reps(model, batch, model.device).float().cpu())
        finally:
            model.train(was_training)
        self.old_reps = torch.cat(reps)

    # ---- per batch -----------------------------------------------------------------------------------
    def auxiliary_losses(self, model, batch: dict, ctx: StepContext):
        loss = self.preservation_loss(model, batch, ctx)
        if loss is not None:
            yield loss

    def preservation_loss(self, model, batch: dict, ctx: StepContext):
        if (ctx.step == 0 or self.old_reps is None or len(self.memory) < 2 or self.args.preserve_weight == 0
                or not model.training):
            return None
        self._calls += 1
        key = draw_key(batch, f"call{self._calls}")
        rng = random.Random(f"moe_adapters:{ctx.seed}:{ctx.step}:{ctx.epoch}:{key}")
        chosen = sorted(rng.sample(range(len(self.memory)), min(self.args.preserve_batch_size, len(self.memory))))
        device = batch["input_ids"].device
        memory = self._memory_batch(ctx, [self.memory[i] for i in chosen])
        model.eval()  # no dropout (old reps were computed in eval mode) and not counted in the statistics
        try:
            new = self._joint_reps(model, memory, device)
        finally:
            model.train()
        old = self.old_reps[chosen].to(device)
        kl = preservation_kl(old, new, self.args.preserve_temperature)
        return self.args.preserve_weight * math.sqrt(ctx.step) * kl

    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        if not model.training:
            return None
        total = None
        if self.args.balance_coef:
            adapter = self._adapter(model)
            losses = [layer.balance_loss(adapter) for layer in (self._layers or self.layers(model).values())]
            losses = [x for x in losses if x is not None]
            if losses:
                total = self.args.balance_coef * torch.stack(losses).mean()
        hidden = outputs.hidden_states
        if self.args.align_weight and hidden is not None:
            align = alignment_loss(hidden, batch["attention_mask"], batch["media_mask"], batch.get("labels"))
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
                "old_reps": None if self.old_reps is None else self.old_reps.clone(),
                "history": json.loads(json.dumps(self.history))}

    def load_state_dict(self, state: dict) -> None:
        state = state or {}
        self.frozen = {k: sorted(int(i) for i in v) for k, v in state.get("frozen", {}).items()}
        self.memory = [(t, int(i)) for t, i in state.get("memory", [])]
        reps = state.get("old_reps")
        self.old_reps = None if reps is None else reps.detach().float().cpu().clone()
        self.history = list(state.get("history", []))
