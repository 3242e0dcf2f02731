"""The previous step's model as a frozen teacher, without a second copy of the LLM.

The teacher is a second PEFT adapter ("teacher") on the same base model, holding a copy of the current
adapter's weights at the start of a step, plus frozen copies of the projectors and of the media modulator.
A teacher forward switches the active adapter, the projectors and the modulator under no_grad and switches
back; the reference implementation keeps a deep copy of the whole model instead (~2x memory).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from ..modeling.projectors import Projector
from ..modeling.multimodal import model_inputs
from ..utils.distributed import gathered, has_master_copy, is_partitioned, set_trained_value, trained_value

TEACHER_ADAPTER = "teacher"


def adapter_of(name: str) -> set[str]:
    """The dotted components of a parameter name: a tuner keys its weights by adapter name either in the
    middle (`lora_A.default.weight`) or at the end (`gated_lora_gate.default`, a ParameterDict)."""
    return set(name.split("."))


def renamed(name: str, old: str, new: str) -> str:
    return ".".join(new if part == old else part for part in name.split("."))


def _frozen_copy(projectors: torch.nn.ModuleDict) -> torch.nn.ModuleDict:
    """A frozen copy of the projectors. Under ZeRO-3 a deep copy would copy empty shards and DeepSpeed's
    module hooks, so the copy is rebuilt as plain modules from the gathered weights; it stays outside the
    model, unpartitioned (projectors are small)."""
    params = list(projectors.parameters())
    if not any(is_partitioned(p) for p in params):
        return copy.deepcopy(projectors).requires_grad_(False)
    with torch.no_grad(), gathered(params):
        clone = torch.nn.ModuleDict({
            name: Projector(p.fc1.in_features, p.fc2.out_features, p.fc1.out_features)
            for name, p in projectors.items()
        })
        clone.load_state_dict({k: v.detach().clone() for k, v in projectors.state_dict().items()})
    like = next(iter(params))
    return clone.to(device=like.device, dtype=like.dtype).requires_grad_(False)


def _frozen_modulator(modulator: torch.nn.Module | None) -> torch.nn.Module | None:
    """A frozen copy of the media modulator (adaptive fusion, Harmony's) as the previous model had it: rebuilt
    from its settings (`previous_model_config` where it has one: without the parts of a task trained for the
    first time) and its weights, gathered under ZeRO-3 as the projectors are."""
    if modulator is None:
        return None
    config = getattr(modulator, "previous_model_config", modulator.modulator_config)()
    params = list(modulator.parameters())
    with torch.no_grad(), gathered(params):
        clone = type(modulator)(**config)
        state = modulator.state_dict()
        clone.load_state_dict({key: state[key].detach().clone() for key in clone.state_dict()})
    like = next(iter(params), None)
    if like is not None:
        clone.to(device=like.device, dtype=like.dtype)
    return clone.requires_grad_(False)


class PreviousModelTeacher:
    """Methods of one recipe that need the previous model (MoInCL, LwF, Harmony, the MoE adapters) share one teacher: `acquire` makes
    it for the first and hands it to the others; it is removed when the last one calls `remove`."""

    @classmethod
    def acquire(cls, model) -> "PreviousModelTeacher":
        teacher = getattr(model, "_previous_model_teacher", None)
        if teacher is None:
            teacher = cls(model)
            model._previous_model_teacher = teacher
        teacher.users += 1
        return teacher

    def __init__(self, model):
        self.users = 0
        self.model = model
        peft_model = model.llm
        self.student_adapter = peft_model.active_adapter
        peft_model.add_adapter(TEACHER_ADAPTER, copy.deepcopy(peft_model.peft_config[self.student_adapter]))
        params = dict(peft_model.named_parameters())
        pairs = [(param, params[renamed(name, TEACHER_ADAPTER, self.student_adapter)])
                 for name, param in params.items() if TEACHER_ADAPTER in adapter_of(name)]
        # under DeepSpeed ZeRO-3 the student's parameters are shards: gathered on every rank to be read
        with torch.no_grad(), gathered([student for _, student in pairs]):
            for param, student in pairs:
                param.copy_(student)
                param.requires_grad_(False)
        peft_model.set_adapter(self.student_adapter)  # keeps the student trainable, the teacher frozen
        self.projectors = _frozen_copy(model.projectors)
        self.media_modulator = _frozen_modulator(model.media_modulator)

    def teacher_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.llm.named_parameters() if TEACHER_ADAPTER in adapter_of(n)}

    def student_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.llm.named_parameters()
                if self.student_adapter in adapter_of(n) and "lora_" in n}

    @contextmanager
    def active(self):
        model, peft_model = self.model, self.model.llm
        student_parts, was_training = (model.projectors, model.media_modulator), model.training
        peft_model.set_adapter(TEACHER_ADAPTER, inference_mode=True)
        model.projectors, model.media_modulator = self.projectors, self.media_modulator
        model.eval()
        try:
            yield model
        finally:
            model.projectors, model.media_modulator = student_parts
            peft_model.set_adapter(self.student_adapter)
            model.train(was_training)

    @torch.no_grad()
    def outputs(self, batch: dict, **kwargs):
        """The teacher's forward (MultimodalOutput) on the batch's model inputs, as the student's forward on
        them: the labels go in too (a tuner may read them: moe_lora's sample routing pools the prompt; they
        choose the kept logits), the small loss that comes with them is unused."""
        with self.active() as model:
            return model(**model_inputs(batch), **kwargs)

    def logits(self, batch: dict) -> torch.Tensor:
        """Teacher logits at the positions the student's forward on the same batch keeps ([batch, kept, vocab])."""
        return self.outputs(batch).logits

    @torch.no_grad()
    def generate(self, batch: dict, **kwargs) -> list[str]:
        with self.active() as model:
            return model.generate(batch, **kwargs)

    @torch.no_grad()
    def interpolate(self, alpha: float) -> None:
        """student LoRA = (1 - alpha) * teacher + alpha * student, parameter by parameter."""
        params = dict(self.model.llm.named_parameters())
        pairs = [(params[renamed(name, TEACHER_ADAPTER, self.student_adapter)], old)
                 for name, old in self.teacher_parameters().items()]
        if not any(is_partitioned(p) or has_master_copy(p) for pair in pairs for p in pair):
            for new, old in pairs:
                new.mul_(alpha).add_(old, alpha=1 - alpha)
            return
        # DeepSpeed: ZeRO-3 parameters are shards (gathered on every rank, the same arithmetic on the full
        # tensors everywhere, rank 0's result re-partitioned), and ZeRO-1/2/3 keep an fp32 master copy of
        # the student in the optimizer: it is the student's value here and gets the result, or the next
        # optimizer step would undo the interpolation.
        for new, old in pairs:
            with gathered([new, old], modifier_rank=0):
                set_trained_value(new, trained_value(new) * alpha + old.detach().float() * (1 - alpha))

    def remove(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        self.model.llm.delete_adapter(TEACHER_ADAPTER)
        self.model.llm.set_adapter(self.student_adapter)
        if getattr(self.model, "_previous_model_teacher", None) is self:
            del self.model._previous_model_teacher
