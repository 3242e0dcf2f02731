"""Knowledge-distillation loss on masked positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling.prompting import IGNORE_INDEX


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * mean over positions where `mask` is true of KL(softmax(teacher/T) || softmax(student/T)).

    Logits are [batch, length, vocab]; mask is [batch, length]. Positions outside the mask (padding,
    prompt) contribute nothing, so rows of different lengths are aligned on their real tokens."""
    mask = mask.to(student_logits.dtype)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    return temperature**2 * (per_position * mask).sum() / mask.sum().clamp(min=1)


def target_prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a target token (the logit at i predicts token i + 1)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask
