"""Learning without Forgetting (Li & Hoiem 2016) for generative models: from step 1 on, the previous
step's model (frozen teacher adapter, `teacher.py`) reads the current batch and the student is pulled
toward its next-token distributions on the target tokens: alpha * T^2 * KL(teacher || student)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import ContinualMethod, StepContext, TokenSum
from .registry import register
from .distill import target_kd_loss_sum
from .teacher import PreviousModelTeacher


@dataclass
class LwFArgs:
    alpha: float = 1.0
    temperature: float = 2.0


@register
class LwF(ContinualMethod):
    name = "lwf"
    Args = LwFArgs
    uses_teacher = True

    def __init__(self, args: LwFArgs | None = None):
        super().__init__(args or LwFArgs())
        if self.args.alpha < 0 or self.args.temperature <= 0:
            raise ConfigError("method_args.lwf: alpha must be >= 0 and temperature > 0")
        self.teacher: PreviousModelTeacher | None = None

    def on_task_start(self, ctx: StepContext) -> None:
        if ctx.step > 0:
            self.teacher = PreviousModelTeacher.acquire(ctx.model)

    def on_task_end(self, ctx: StepContext) -> None:
        if self.teacher is not None:
            self.teacher.remove()
        self.teacher = None

    def extra_loss(self, model, batch: dict, outputs, ctx: StepContext):
        """alpha * T^2 * KL(teacher || student) summed over the main batch's target positions; the teacher
        reads the same inputs (and keeps the same logits) as the student's main forward."""
        if self.teacher is None:
            return None
        teacher = self.teacher.logits(batch)
        kd = target_kd_loss_sum(outputs.logits, teacher, batch["labels"], self.args.temperature)
        return TokenSum(self.args.alpha * kd, "labels")
