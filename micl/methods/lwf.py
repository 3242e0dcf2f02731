"""Learning without Forgetting (Li & Hoiem 2016) for generative models: from step 1 on, the previous
step's model (frozen teacher adapter, `teacher.py`) reads the current batch and the student is pulled
toward its next-token distributions on the target tokens: alpha * T^2 * KL(teacher || student)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..training.trainer import model_inputs
from .base import ContinualMethod, StepContext
from .distill import kd_loss_rows, target_prediction_mask
from .teacher import PreviousModelTeacher


@dataclass
class LwFArgs:
    alpha: float = 1.0
    temperature: float = 2.0


class LwF(ContinualMethod):
    name = "lwf"
    Args = LwFArgs

    def __init__(self, args: LwFArgs | None = None):
        super().__init__(args or LwFArgs())
        if self.args.alpha < 0 or self.args.temperature <= 0:
            raise ConfigError("method_args.lwf: alpha must be >= 0 and temperature > 0")
        self.teacher: PreviousModelTeacher | None = None

    def on_task_start(self, ctx: StepContext) -> None:
        if ctx.step > 0:
            self.teacher = PreviousModelTeacher(ctx.model)

    def on_task_end(self, ctx: StepContext) -> None:
        if self.teacher is not None:
            self.teacher.remove()
        self.teacher = None

    def augment_batch(self, batch: dict, ctx: StepContext) -> dict:
        if self.teacher is None:
            return batch
        mask = target_prediction_mask(batch["labels"])
        return {**batch, "lwf_mask": mask, "lwf_teacher_rows": self.teacher.logits(model_inputs(batch), mask)}

    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        if "lwf_teacher_rows" not in batch:
            return None
        student_rows = outputs.logits[batch["lwf_mask"]]
        return self.args.alpha * kd_loss_rows(student_rows, batch["lwf_teacher_rows"], self.args.temperature)
