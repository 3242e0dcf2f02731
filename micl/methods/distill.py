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
    mask = mask.bool()
    return kd_loss_rows(student_logits[mask], teacher_logits[mask], temperature)


def kd_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) at every position (over the last dimension)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * (teacher.exp() * (teacher - student)).sum(-1)


def masked_sum(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `per_position` ([batch, kept], the last positions of the batch) where the full-length mask
    ([batch, length]) is true. The mask weights the positions instead of selecting them, so nothing is read
    back from the device."""
    mask = mask[:, mask.shape[1] - per_position.shape[1]:]
    return (per_position * mask.to(per_position.dtype)).sum()


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """T^2 * sum over the positions where `mask` is true of KL(softmax(teacher/T) || softmax(student/T)).

    The logits may cover only the last positions of the batch (MultimodalLM keeps the logits from
    `logits_offset` on): `mask` is [batch, length] and is aligned to their end."""
    return masked_sum(kd_per_position(student_logits, teacher_logits, temperature), mask)


def kd_loss_rows(student_rows: torch.Tensor, teacher_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """The same on logits already gathered at the distilled positions ([n, vocab]); the softmaxes are
    taken over those rows only, which keeps memory at n x vocab instead of batch x length x vocab."""
    if student_rows.shape[0] == 0:
        return student_rows.sum() * 0.0
    student = F.log_softmax(student_rows.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_rows.float() / temperature, dim=-1)
    return temperature**2 * (teacher.exp() * (teacher - student)).sum(-1).mean()


def target_prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a target token (the logit at i predicts token i + 1)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask
