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
from ..modeling.multimodal import model_inputs
from .base import ContinualMethod, StepContext, TokenSum, batch_indices, draw_key
from .registry import register
from .distill import kd_per_position, target_prediction_mask
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


@register
class MoInCL(ContinualMethod):
    name = "moincl"
    Args = MoInCLArgs
    uses_teacher = True
    loss_items = ("moincl.pseudo", "moincl.instructions")

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

    # ---- step lifecycle ------------------------------------------------------------------------------
    def on_task_start(self, ctx: StepContext) -> None:
        if self.args.pseudo_num > ctx.batch_size:
            raise ConfigError(f"method_args.moincl.pseudo_num ({self.args.pseudo_num}) is larger than "
                              f"train.batch_size ({ctx.batch_size})")
        self.pseudo = []
        if ctx.step == 0:
            return
        self.teacher = PreviousModelTeacher.acquire(ctx.model)
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
        """Adds `moincl`: one batch of the pseudo-target duplicates and the text-only instructions, so that
        the student and the teacher each see all of them in one forward. The draws are seeded by the batch's
        samples (not a call counter): the same micro-batch gets the same rows however the global batch is
        split over processes and accumulation steps, and after a resume."""
        if self.teacher is None:
            return batch
        indices = batch_indices(batch) or []
        rng = random.Random(f"{ctx.seed}:{ctx.step}:{ctx.epoch}:{draw_key(batch, '')}")
        dataset = ctx.train_dataset
        items = []
        candidates = [i for i in indices if self.pseudo and self.pseudo[i] is not None]
        for index in rng.sample(candidates, min(self.args.pseudo_num, len(candidates))):
            instruction, target = self.pseudo[index]
            items.append(dataset.encode_item(index, instruction, target))
        if not candidates and self.pseudo and indices and ctx.uniform_forwards:
            # another rank may have pseudo rows: the same forwards here, with a row that carries no target
            items.append(dataset.encode_item(indices[0], "", None))
        pseudo_rows = len(items)
        if self.instructions and self.args.instruction_k:
            for text in rng.sample(self.instructions, min(self.args.instruction_k, len(self.instructions))):
                encoded = dataset.builder.encode(text, {})
                items.append({"input_ids": encoded.input_ids, "labels": encoded.labels,
                              "media_mask": encoded.media_mask, "media": {}})
        if not items:
            return batch
        extra = ctx.collate_fn(items)
        instruction_mask = extra["attention_mask"].bool()
        instruction_mask[:pseudo_rows] = False
        extra["pseudo_mask"] = target_prediction_mask(extra["labels"])
        extra["instruction_mask"] = instruction_mask
        # logits where something is learned: the pseudo targets (the collator's window) and the instructions'
        # tokens, which are the last positions of their left-padded rows
        instruction_tokens = max((len(item["input_ids"]) for item in items[pseudo_rows:]), default=0)
        if instruction_tokens:
            extra["logits_to_keep"] = max(extra["logits_to_keep"], instruction_tokens)
        # the distilled positions as (row, column) indices, worked out here on the host: the loss gathers
        # their logits without reading a mask back from the device
        length, positions = extra["input_ids"].shape[1], []
        for row, item in enumerate(items):
            start = length - len(item["input_ids"])  # left padding
            if row < pseudo_rows:  # the logit at j predicts token j + 1
                positions += [(row, start + j, True) for j, label in enumerate(item["labels"][1:]) if label != -100]
            else:
                positions += [(row, start + j, False) for j in range(len(item["input_ids"]))]
        extra["kd_rows"] = torch.tensor([p[0] for p in positions], dtype=torch.long)
        extra["kd_columns"] = torch.tensor([p[1] for p in positions], dtype=torch.long)
        extra["kd_is_pseudo"] = torch.tensor([p[2] for p in positions], dtype=torch.bool)
        return {**batch, "moincl": extra}

    def count_loss_items(self, batch: dict) -> dict:
        extra = batch.get("moincl")
        if extra is None:
            return {}
        return {"moincl.pseudo": extra["pseudo_mask"].sum(), "moincl.instructions": extra["instruction_mask"].sum()}

    def auxiliary_losses(self, model, batch: dict, ctx: StepContext):
        """CE + lambda_kl * KD on the pseudo-target duplicates and KD on the instructions, from one teacher and
        one student forward over all of them (the teacher's logits are computed just before the student's)."""
        extra = batch.get("moincl")
        if extra is None:
            return
        T = self.args.temperature
        inputs = model_inputs(extra)
        teacher = self.teacher.logits(inputs)
        student = model(**inputs)
        rows, columns = extra["kd_rows"], extra["kd_columns"] - student.logits_offset
        kd = kd_per_position(student.logits[rows, columns], teacher[rows, columns], T)  # [distilled positions]
        is_pseudo = extra["kd_is_pseudo"].to(kd.dtype)
        pseudo = student.loss_sum + self.args.lambda_kl * (kd * is_pseudo).sum()
        instructions = self.args.instruction_weight * (kd * (1 - is_pseudo)).sum()
        yield [TokenSum(pseudo, "moincl.pseudo"), TokenSum(instructions, "moincl.instructions")]
