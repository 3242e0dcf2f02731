"""MoInCL (Modality-Inconsistent Continual Learning, arXiv 2412.13050), as hooks.

From step 1 on, with the previous step's model as a frozen teacher (`PreviousModelTeacher`: a second
PEFT adapter, no second LLM):
- pseudo targets (`pseudo_targets.py`): when the other task type was learned before, `pseudo_num` samples
  of each batch are duplicated with the other task type's instruction and a pseudo target; they get the
  cross-entropy plus lambda_kl * T^2 * KL(teacher || student) on the target tokens;
- instruction-based knowledge distillation: every batch, `instruction_k` text-only instructions from
  `prompts/instructions.jsonl` go through teacher and student; T^2 * KL at every real token;
- LoRA interpolation after every epoch: theta = (1 - alpha) * theta_old + alpha * theta_new.
Total loss: CE + CE(pseudo) + lambda_kl * KL(pseudo) + instruction_weight * KL(instructions).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.instructions import load_instructions
from ..data.prompts import render_instruction
from ..errors import ConfigError
from ..training.trainer import model_inputs
from .base import ContinualMethod, StepContext
from .distill import kd_loss_rows, target_prediction_mask
from .pseudo_targets import caption_pseudo_targets, load_pseudo_qa_rules, qa_from_caption
from .teacher import PreviousModelTeacher

OTHER_TYPE = {"caption": "qa", "qa": "caption"}


@dataclass
class MoInCLArgs:
    pseudo_num: int = field(default=2, metadata={"help": "pseudo-target duplicates per batch (reference: 1, 2, 4)"})
    lambda_kl: float = field(default=1.0, metadata={"help": "weight of the KL on pseudo targets"})
    temperature: float = 5.0
    instruction_k: int = field(default=4, metadata={"help": "text-only instructions distilled per batch"})
    instruction_weight: float = 1.0
    instructions: str | None = field(default=None, metadata={"help": "JSONL file; null = prompts/instructions.jsonl"})
    pseudo_qa_rules: str | None = field(default=None, metadata={"help": "YAML; null = prompts/pseudo_qa.yaml"})
    alpha: list[float] = field(default_factory=lambda: [0.8],
                               metadata={"help": "interpolation weight of the new LoRA per step (last repeats)"})
    caption_max_new_tokens: int = 20


class MoInCL(ContinualMethod):
    name = "moincl"
    Args = MoInCLArgs

    def __init__(self, args: MoInCLArgs | None = None):
        super().__init__(args or MoInCLArgs())
        a = self.args
        key = "method_args.moincl"
        if any(not 0.0 <= x <= 1.0 for x in a.alpha) or not a.alpha:
            raise ConfigError(f"{key}.alpha must be a non-empty list of numbers in [0, 1], got {a.alpha}")
        if a.pseudo_num < 0 or a.instruction_k < 0:
            raise ConfigError(f"{key}.pseudo_num and {key}.instruction_k must be >= 0")
        if a.temperature <= 0 or a.lambda_kl < 0 or a.instruction_weight < 0:
            raise ConfigError(f"{key}: temperature must be > 0, lambda_kl and instruction_weight >= 0")
        self.instructions = load_instructions(a.instructions) if a.instruction_k else []
        self.rules = load_pseudo_qa_rules(a.pseudo_qa_rules)
        self.teacher: PreviousModelTeacher | None = None
        self.pseudo: list[tuple[str, str] | None] = []  # per training sample: (instruction, target)
        self._calls = 0

    # ---- step lifecycle ------------------------------------------------------------------------------
    def on_task_start(self, ctx: StepContext) -> None:
        if self.args.pseudo_num > ctx.batch_size:
            raise ConfigError(f"method_args.moincl.pseudo_num ({self.args.pseudo_num}) is larger than "
                              f"train.batch_size ({ctx.batch_size})")
        self.pseudo, self._calls = [], 0
        if ctx.step == 0:
            return
        self.teacher = PreviousModelTeacher(ctx.model)
        learned = {t.task_type for t in ctx.seen_tasks}
        other = OTHER_TYPE[ctx.task.task_type]
        if other in learned and self.args.pseudo_num:
            self.pseudo = self._make_pseudo(ctx, other)

    def _make_pseudo(self, ctx: StepContext, other: str) -> list[tuple[str, str] | None]:
        dataset = ctx.train_dataset
        rng = random.Random(f"{ctx.seed}:{ctx.step}:pseudo")
        if other == "caption":
            cache = Path(ctx.run_dir) / "pseudo_targets" / f"step_{ctx.step}_{ctx.task.name}.json"
            captions = caption_pseudo_targets(self.teacher, dataset, ctx.collate_fn, ctx.batch_size,
                                              self.args.caption_max_new_tokens, cache)
            pairs = [(None, c) if c.strip() else None for c in captions]
        else:
            pairs = [qa_from_caption(s["target"], self.rules, rng) for s in dataset.samples]
        pseudo = []
        for sample, pair in zip(dataset.samples, pairs):
            if pair is None:
                pseudo.append(None)
                continue
            question, target = pair
            as_other = {**sample, "task_type": other, "instruction": question or ""}
            pseudo.append((render_instruction(as_other, dataset.templates, train=True, rng=rng), target))
        return pseudo

    def on_epoch_end(self, ctx: StepContext) -> None:
        if self.teacher is not None:
            alphas = self.args.alpha
            self.teacher.interpolate(alphas[min(ctx.step - 1, len(alphas) - 1)])

    def on_task_end(self, ctx: StepContext) -> None:
        if self.teacher is not None:
            self.teacher.remove()
        self.teacher, self.pseudo = None, []

    # ---- per batch -----------------------------------------------------------------------------------
    def augment_batch(self, batch: dict, ctx: StepContext) -> dict:
        if self.teacher is None:
            return batch
        self._calls += 1
        rng = random.Random(f"{ctx.seed}:{ctx.step}:{ctx.epoch}:{self._calls}")
        dataset = ctx.train_dataset
        batch = dict(batch)
        candidates = [int(i) for i in batch["sample_index"] if self.pseudo and self.pseudo[int(i)] is not None]
        if candidates:
            chosen = rng.sample(candidates, min(self.args.pseudo_num, len(candidates)))
            items = []
            for index in chosen:
                instruction, target = self.pseudo[index]
                items.append(dataset.encode_item(index, instruction, target))
            pseudo = ctx.collate_fn(items)
            pseudo["kd_mask"] = target_prediction_mask(pseudo["labels"])
            batch["pseudo"] = pseudo
        if self.instructions and self.args.instruction_k:
            texts = rng.sample(self.instructions, min(self.args.instruction_k, len(self.instructions)))
            items = []
            for text in texts:
                encoded = dataset.builder.encode(text, {})
                items.append({"input_ids": encoded.input_ids, "labels": encoded.labels,
                              "media_mask": encoded.media_mask, "media": {}})
            instructions = ctx.collate_fn(items)
            instructions["kd_mask"] = instructions["attention_mask"].bool()
            batch["instructions"] = instructions
        return batch

    def auxiliary_losses(self, model, batch: dict, ctx: StepContext):
        """CE + lambda_kl * KD on the pseudo-target duplicates, then KD on the instructions; the teacher's
        logits are computed just before each student forward, so neither outlives its own loss."""
        T = self.args.temperature
        if "pseudo" in batch:
            pseudo = batch["pseudo"]
            teacher_rows = self.teacher.logits(pseudo, pseudo["kd_mask"])
            student = model(**model_inputs(pseudo))
            kd = kd_loss_rows(student.logits[pseudo["kd_mask"]], teacher_rows, T)
            yield student.loss + self.args.lambda_kl * kd
        if "instructions" in batch:
            instructions = batch["instructions"]
            teacher_rows = self.teacher.logits(instructions, instructions["kd_mask"])
            student = model(**model_inputs(instructions))
            kd = kd_loss_rows(student.logits[instructions["kd_mask"]], teacher_rows, T)
            yield self.args.instruction_weight * kd
