"""What each step of a run trains on. The methods declare it (`ContinualMethod.schedule`, micl/methods/base.py);
the loop reads it and never names a method:

* `sequential` (the default): one step per task of the order, continual learning;
* `joint`: one step that trains on the union of all the order's tasks (shuffled together), the multi-task
  upper bound of a continual method;
* `untrained`: one step that trains nothing: the model as built, evaluated on every task (zero-shot).

A step of several tasks (or none) is saved as the phase `step_0_<schedule>`; run_config.json records the
phase names (`phases`), so that the run folder's readers find it (micl/run_folder.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from torch.utils.data import ConcatDataset


@dataclass(frozen=True)
class StepPlan:
    name: str  # the phase folder is step_<k>_<name>
    tasks: tuple  # TaskSpecs learned (covered, for `untrained`) by the end of the step
    trains: bool = True


def run_schedule(methods) -> str:
    """The methods' schedule (check_capabilities has made sure they agree)."""
    return next((m.schedule for m in methods if m.schedule != "sequential"), "sequential")


def plan_steps(tasks, schedule: str) -> list[StepPlan]:
    if schedule == "sequential":
        return [StepPlan(task.name, (task,)) for task in tasks]
    return [StepPlan(schedule, tuple(tasks), trains=schedule != "untrained")]


class JointDataset(ConcatDataset):
    """The training splits of several tasks as one dataset (the Trainer's sampler shuffles across them). Items
    keep `index` unique: a sample's position in the concatenation, so draws keyed on it stay distinct."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)

    def _locate(self, index: int) -> tuple[int, int]:
        part = bisect.bisect_right(self.cumulative_sizes, index)
        return part, index - (self.cumulative_sizes[part - 1] if part else 0)

    def __getitem__(self, index: int) -> dict:
        part, local = self._locate(index)
        return {**self.datasets[part][local], "index": index}

    def input_length(self, index: int) -> int:
        part, local = self._locate(index)
        return self.datasets[part].input_length(local)

    @property
    def samples(self) -> list[dict]:
        return [sample for part in self.datasets for sample in part.samples]
