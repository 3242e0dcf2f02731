"""MoInCL (Modality-Inconsistent Continual Learning, arXiv 2412.13050), as hooks.

From step 1 on, with the previous step's model as a frozen teacher (`PreviousModelTeacher`: a second
PEFT adapter, no second LLM):
- pseudo targets (`pseudo_targets.py`): at a task type shift within an already-seen modality (the current
  task's modality was learned before with the other task type; `pseudo` per step overrides the rule),
  `pseudo_num` samples of each batch are duplicated with the other task type's instruction and a pseudo
  target. The duplicates join the batch's cross-entropy (one mean over all target tokens, so their weight is
  their share of the target tokens, as in the reference), plus lambda_kl * T^2 * KL(teacher || student) on
  their target tokens (a mean over them);
- instruction-based knowledge distillation: every batch, `instruction_k` text-only instructions from
  `prompts/instructions.jsonl` go through teacher and student; T^2 * KL at every real token;
- LoRA interpolation after every epoch: theta = (1 - alpha) * theta_old + alpha * theta_new.
Total loss: CE(batch + pseudo rows) + lambda_kl * KL(pseudo) + instruction_weight * KL(instructions).
`alpha`, `lambda_kl`, `pseudo_num` and `pseudo` take one value or one per step from step 1 on (the last
repeats), as the reference's run scripts set them per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.instructions import load_instructions
from ..data.prompts import render_instruction
from ..errors import ConfigError
from ..modeling.multimodal import model_inputs
from .base import ContinualMethod, StepContext, TokenSum, batch_indices, batch_rng, draw_key, step_rng
from .registry import register
from .distill import kd_per_position, target_prediction_mask
from .pseudo_targets import (caption_pseudo_targets, external_pairs, load_external_pseudo_qa, load_pseudo_qa_rules,
                             qa_from_caption)
from .teacher import PreviousModelTeacher

OTHER_TYPE = {"caption": "qa", "qa": "caption"}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def per_step(values, step: int):
    """The value of a per-step setting at `step` (>= 1): a scalar, or a list from step 1 on whose last
    value repeats."""
    if not isinstance(values, list):
        return values
    return values[min(step - 1, len(values) - 1)]


def pseudo_targets_apply(task, seen_tasks) -> bool:
    """The paper's rule: pseudo targets at a task type shift within an already-seen modality, i.e. the
    current modality was learned before with the other task type (the teacher can produce that type's
    outputs for these inputs). A new modality gets none: the teacher's projector for it is untrained."""
    return (task.modality, OTHER_TYPE[task.task_type]) in {(t.modality, t.task_type) for t in seen_tasks}


@dataclass
class MoInCLArgs:
    pseudo_num: list[int] | int = field(default=2, metadata={
        "help": "pseudo-target duplicates per batch, one value or one per step from step 1 (reference: 1, 2, 4)"})
    lambda_kl: list[float] | float = field(default=1.0, metadata={
        "help": "weight of the KL on pseudo targets, one value or one per step from step 1"})
    pseudo: list[bool] | bool | None = field(default=None, metadata={
        "help": "pseudo targets on/off, one value or one per step from step 1; null: the paper's rule (a task "
                "type shift within an already-seen modality)"})
    pseudo_qa: dict = field(default_factory=dict, metadata={
        "help": "{task name: JSON file of externally written pseudo QA pairs} for captioning steps, in the "
                "reference's format {sample or media id: {\"Q\": question, \"A\": answer}}; tasks not "
                "named get the rule-based pairs of pseudo_qa_rules"})
    temperature: float = 5.0
    instruction_k: int = field(default=4, metadata={"help": "text-only instructions distilled per batch"})
    instruction_weight: float = 1.0
    instructions: str | None = field(default=None, metadata={"help": "JSONL file; null = prompts/instructions.jsonl"})
    pseudo_qa_rules: str | None = field(default=None, metadata={"help": "YAML; null = prompts/pseudo_qa.yaml"})
    alpha: list[float] | float = field(default=0.8, metadata={
        "help": "interpolation weight of the new LoRA, one value or one per step from step 1"})
    caption_max_new_tokens: int | None = field(default=None, metadata={
        "help": "new tokens of a pseudo caption (reference: 30); null: eval.max_new_tokens. Beams and "
                "repetition penalty are the evaluation's (eval.num_beams, eval.repetition_penalty)"})


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
        if any(not 0.0 <= x <= 1.0 for x in as_list(a.alpha)):
            raise ConfigError(f"{key}.alpha must be a number in [0, 1] or a list of them, got {a.alpha}")
        for name in ("alpha", "pseudo_num", "lambda_kl", "pseudo"):
            if getattr(a, name) == []:
                raise ConfigError(f"{key}.{name} must be a value or a non-empty list (one per step from step 1)")
        if any(n < 0 for n in as_list(a.pseudo_num)) or a.instruction_k < 0:
            raise ConfigError(f"{key}.pseudo_num and {key}.instruction_k must be >= 0")
        if a.temperature <= 0 or any(w < 0 for w in as_list(a.lambda_kl)) or a.instruction_weight < 0:
            raise ConfigError(f"{key}: temperature must be > 0, lambda_kl and instruction_weight >= 0")
        if a.caption_max_new_tokens is not None and a.caption_max_new_tokens < 1:
            raise ConfigError(f"{key}.caption_max_new_tokens must be >= 1 or null")
        self.instructions = load_instructions(a.instructions) if a.instruction_k else []
        self.rules = load_pseudo_qa_rules(a.pseudo_qa_rules)
        self.external_qa = {task: load_external_pseudo_qa(path, f"{key}.pseudo_qa.{task}")
                            for task, path in a.pseudo_qa.items()}
        # this step's values (set in on_task_start; step 1's until then)
        self.pseudo_num, self.lambda_kl = per_step(a.pseudo_num, 1), per_step(a.lambda_kl, 1)
        self.teacher: PreviousModelTeacher | None = None
        self.pseudo: list[tuple[str, str] | None] = []  # per training sample: (instruction, target)

    # ---- step lifecycle ------------------------------------------------------------------------------
    def check_recipe(self, config, source: str) -> None:
        too_many = [n for n in as_list(self.args.pseudo_num) if n > config.train.batch_size]
        if too_many:
            raise ConfigError(f"{source}: method_args.moincl.pseudo_num ({too_many[0]}) is larger than "
                              f"train.batch_size ({config.train.batch_size})")

    def pseudo_this_step(self, ctx: StepContext) -> bool:
        other = OTHER_TYPE[ctx.task.task_type]
        if other not in {t.task_type for t in ctx.seen_tasks}:
            return False  # the teacher never produced the other type: nothing to distil
        wanted = per_step(self.args.pseudo, ctx.step)
        return pseudo_targets_apply(ctx.task, ctx.seen_tasks) if wanted is None else wanted

    def on_task_start(self, ctx: StepContext) -> None:
        self.pseudo = []
        if ctx.step == 0:
            return
        self.pseudo_num = per_step(self.args.pseudo_num, ctx.step)  # <= batch size: check_recipe
        self.lambda_kl = per_step(self.args.lambda_kl, ctx.step)
        self.teacher = PreviousModelTeacher.acquire(ctx.model)
        if self.pseudo_num and self.pseudo_this_step(ctx):
            self.pseudo = self._make_pseudo(ctx, OTHER_TYPE[ctx.task.task_type])

    def _make_pseudo(self, ctx: StepContext, other: str) -> list[tuple[str, str] | None]:
        dataset = ctx.train_dataset
        rng = step_rng("moincl", ctx)
        if other == "caption":
            cache = Path(ctx.run_dir) / "pseudo_targets" / f"step_{ctx.step}_{ctx.task.name}.json"
            decoding = dict(ctx.decoding)
            if self.args.caption_max_new_tokens is not None:
                decoding["max_new_tokens"] = self.args.caption_max_new_tokens
            captions = caption_pseudo_targets(self.teacher, dataset, ctx.collate_fn, ctx.batch_size, decoding, cache)
            pairs = [(None, c) if c else None for c in captions]
        elif ctx.task.name in self.external_qa:
            pairs = external_pairs(self.external_qa[ctx.task.name], dataset.samples,
                                   f"method_args.moincl.pseudo_qa.{ctx.task.name}")
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
            self.teacher.interpolate(per_step(self.args.alpha, ctx.step))

    def on_task_end(self, ctx: StepContext) -> None:
        if self.teacher is not None:
            self.teacher.remove()
        self.teacher, self.pseudo = None, []

    # ---- per batch -----------------------------------------------------------------------------------
    def augment_batch(self, batch: dict, ctx: StepContext) -> dict:
        """Adds `moincl`: {"pseudo": a batch of the pseudo-target duplicates, "instructions": a batch of the
        text-only instructions} (either may be absent). Each goes through the teacher and the student in one
        forward of its own: padded apart, the short instructions do not take the long media rows' length. The
        draws are seeded by the batch's samples (not a call counter): the same micro-batch gets the same rows
        however the global batch is split over processes and accumulation steps, and after a resume."""
        if self.teacher is None:
            return batch
        indices = batch_indices(batch) or []
        rng = batch_rng("moincl", ctx, draw_key(batch, ""))
        dataset = ctx.train_dataset
        pseudo = []
        candidates = [i for i in indices if self.pseudo and self.pseudo[i] is not None]
        for index in rng.sample(candidates, min(self.pseudo_num, len(candidates))):
            instruction, target = self.pseudo[index]
            pseudo.append(dataset.encode_item(index, instruction, target))
        if not candidates and self.pseudo and indices and ctx.uniform_forwards:
            # another rank may have pseudo rows: the same forwards here, with a row that carries no target
            pseudo.append(dataset.encode_item(indices[0], "", None))
        instructions = []
        if self.instructions and self.args.instruction_k:
            for text in rng.sample(self.instructions, min(self.args.instruction_k, len(self.instructions))):
                encoded = dataset.builder.encode(text, {})
                instructions.append({"input_ids": encoded.input_ids, "labels": encoded.labels,
                                     "media_mask": encoded.media_mask, "media": {}})
        extra = {}
        if pseudo:
            extra["pseudo"] = self._distilled(ctx.collate_fn(pseudo), pseudo, targets_only=True)
        if instructions:
            extra["instructions"] = self._distilled(ctx.collate_fn(instructions), instructions, targets_only=False)
        return {**batch, "moincl": extra} if extra else batch

    @staticmethod
    def _distilled(rows: dict, items: list[dict], targets_only: bool) -> dict:
        """The distilled positions of a collated batch as (row, column) indices, worked out here on the host
        (the loss gathers their logits without reading a mask back from the device): the positions that
        predict a target token, or (instructions) every real token; the logits kept are those positions'
        (the collator's target window, or the longest row: they are the last ones of left-padded rows)."""
        length, positions = rows["input_ids"].shape[1], []
        for row, item in enumerate(items):
            start = length - len(item["input_ids"])  # left padding
            if targets_only:  # the logit at j predicts token j + 1
                positions += [(row, start + j) for j, label in enumerate(item["labels"][1:]) if label != -100]
            else:
                positions += [(row, start + j) for j in range(len(item["input_ids"]))]
        if not targets_only:
            rows["logits_to_keep"] = max(len(item["input_ids"]) for item in items)
        elif not positions:  # only the row that keeps the forwards uniform across ranks: one logit
            rows["logits_to_keep"] = 1
        rows["kd_rows"] = torch.tensor([r for r, _ in positions], dtype=torch.long)
        rows["kd_columns"] = torch.tensor([c for _, c in positions], dtype=torch.long)
        return rows

    def count_loss_items(self, batch: dict) -> dict:
        extra = batch.get("moincl") or {}
        counts = {}
        if "pseudo" in extra:
            pseudo_targets = target_prediction_mask(extra["pseudo"]["labels"]).sum()
            # the pseudo rows' targets count with the batch's (one cross-entropy over all of them)
            counts.update({"labels": pseudo_targets, "moincl.pseudo": pseudo_targets})
        if "instructions" in extra:
            counts["moincl.instructions"] = extra["instructions"]["attention_mask"].sum()
        return counts

    def auxiliary_losses(self, model, batch: dict, ctx: StepContext):
        """The pseudo-target duplicates' CE (a share of the batch's cross-entropy) and lambda_kl * KD on them,
        then KD on the instructions: each from one teacher and one student forward (the teacher's logits are
        computed just before the student's)."""
        extra = batch.get("moincl") or {}
        if "pseudo" in extra:
            student, kd = self._distillation(model, extra["pseudo"])
            yield [TokenSum(student.loss_sum, "labels"), TokenSum(self.lambda_kl * kd.sum(), "moincl.pseudo")]
        if "instructions" in extra:
            _, kd = self._distillation(model, extra["instructions"])
            yield TokenSum(self.args.instruction_weight * kd.sum(), "moincl.instructions")

    def _distillation(self, model, rows: dict):
        """The student's forward on `rows` and T^2 * KL(teacher || student) at their distilled positions."""
        inputs = model_inputs(rows)
        teacher = self.teacher.logits(inputs)
        student = model(**inputs)
        index, columns = rows["kd_rows"], rows["kd_columns"] - student.logits_offset
        return student, kd_per_position(student.logits[index, columns], teacher[index, columns],
                                        self.args.temperature)
