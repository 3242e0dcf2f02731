"""Knowledge-distillation loss on masked positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modeling.prompting import IGNORE_INDEX


def kd_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) at every position (over the last dimension)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * (teacher.exp() * (teacher - student)).sum(-1)


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """T^2 * sum over the positions where `mask` is true of KL(softmax(teacher/T) || softmax(student/T)).

    The logits may cover only the last positions of the batch (MultimodalLM keeps the logits from
    `logits_offset` on): `mask` is [batch, length] and is aligned to their end. The mask weights the positions
    instead of selecting them, so nothing is read back from the device; positions outside it (padding, prompt)
    contribute nothing, so rows of different lengths are aligned on their real tokens."""
    per_position = kd_per_position(student_logits, teacher_logits, temperature)
    mask = mask[:, mask.shape[1] - per_position.shape[1]:]
    return (per_position * mask.to(per_position.dtype)).sum()


def target_kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """kd_loss_sum over the positions that predict a target token of `labels` (LwF, the MoE adapters' memory)."""
    return kd_loss_sum(student_logits, teacher_logits, target_prediction_mask(labels), temperature)


def target_prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a target token (the logit at i predicts token i + 1)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask
