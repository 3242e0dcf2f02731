"""The previous step's model as a frozen teacher, without a second copy of the LLM.

The teacher is a second PEFT adapter ("teacher") on the same base model, holding a copy of the current
adapter's weights at the start of a step, plus a frozen copy of the projectors. A teacher forward switches
the active adapter and the projectors under no_grad and switches back; the reference implementation keeps
a deep copy of the whole model instead (~2x memory).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from ..training.trainer import model_inputs

TEACHER_ADAPTER = "teacher"


class PreviousModelTeacher:
    def __init__(self, model):
        self.model = model
        peft_model = model.llm
        self.student_adapter = peft_model.active_adapter
        peft_model.add_adapter(TEACHER_ADAPTER, copy.deepcopy(peft_model.peft_config[self.student_adapter]))
        params = dict(peft_model.named_parameters())
        marker, student_marker = f".{TEACHER_ADAPTER}.", f".{self.student_adapter}."
        with torch.no_grad():
            for name, param in params.items():
                if marker in name:
                    param.copy_(params[name.replace(marker, student_marker)])
                    param.requires_grad_(False)
        peft_model.set_adapter(self.student_adapter)  # keeps the student trainable, the teacher frozen
        self.projectors = copy.deepcopy(model.projectors).requires_grad_(False)

    def teacher_parameters(self) -> dict[str, torch.Tensor]:
        marker = f".{TEACHER_ADAPTER}."
        return {n: p for n, p in self.model.llm.named_parameters() if marker in n}

    def student_parameters(self) -> dict[str, torch.Tensor]:
        marker = f".{self.student_adapter}."
        return {n: p for n, p in self.model.llm.named_parameters() if marker in n and "lora_" in n}

    @contextmanager
    def active(self):
        model, peft_model = self.model, self.model.llm
        student_projectors, was_training = model.projectors, model.training
        peft_model.set_adapter(TEACHER_ADAPTER, inference_mode=True)
        model.projectors = self.projectors
        model.eval()
        try:
            yield model
        finally:
            model.projectors = student_projectors
            peft_model.set_adapter(self.student_adapter)
            model.train(was_training)

    @torch.no_grad()
    def logits(self, batch: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits [batch, length, vocab], or only the rows where `mask` is true ([n, vocab])."""
        with self.active() as model:
            logits = model(**model_inputs(batch)).logits.detach()
        return logits if mask is None else logits[mask.bool()]

    @torch.no_grad()
    def generate(self, batch: dict, **kwargs) -> list[str]:
        with self.active() as model:
            return model.generate(batch, **kwargs)

    @torch.no_grad()
    def interpolate(self, alpha: float) -> None:
        """student LoRA = (1 - alpha) * teacher + alpha * student, parameter by parameter."""
        params = dict(self.model.llm.named_parameters())
        marker, student_marker = f".{TEACHER_ADAPTER}.", f".{self.student_adapter}."
        for name, old in self.teacher_parameters().items():
            params[name.replace(marker, student_marker)].mul_(alpha).add_(old, alpha=1 - alpha)

    def remove(self) -> None:
        self.model.llm.delete_adapter(TEACHER_ADAPTER)
        self.model.llm.set_adapter(self.student_adapter)
