"""The one definition of a run folder and of a phase folder, used by the training loop, `micl push` and
`MultimodalLM.from_pretrained` alike (imports nothing heavy).

Run folder:
    run_config.json                  the recipe as resolved (a rerun must match it: micl/training/run_identity.py),
                                     with the task `order` and, where a step is not one task, the `phases`
    initial_scores.json              scores of the untrained model (baseline of FWT), if enabled
    step_<k>_<task>/                 one phase folder per finished step, moved into place atomically
    .checkpoints/step_<k>/checkpoint-N/   within-step Trainer checkpoints (deleted once the step is saved)
    logs/step_<k>/                   TensorBoard logs
    results.json report.md matrix.png forgetting.png
    hub_push.json                    what `push_to_hub` / `micl push` published (micl/hub.py)
A finished step is a phase folder with metrics.json; results.json is rebuilt from them.

Phase folder:
    adapter/                  PEFT adapter (PeftModel.from_pretrained(base_llm, folder/"adapter"))
    projectors.safetensors    projector weights, keys "<modality>.<param>"
    micl_model.json           model settings needed to rebuild the wrapper (LLM id, dims, token counts)
    base_updates.safetensors  only if a method folded low-rank updates into the frozen base weights
    media_modulator.safetensors  only with a media modulator (its class and settings are in micl_model.json)
    metrics.json predictions.jsonl method_state.pt   (the loop's: evaluation, predictions, method states)
A phase pushed to the Hub has the adapter files at the repo root instead of adapter/.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import MiclError

RUN_CONFIG_FILE = "run_config.json"
INITIAL_SCORES_FILE = "initial_scores.json"
RESULTS_FILE = "results.json"
CHECKPOINTS_DIR = ".checkpoints"
LOGS_DIR = "logs"

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PROJECTORS_FILE = "projectors.safetensors"
MODEL_CONFIG_FILE = "micl_model.json"
UPDATES_FILE = "base_updates.safetensors"
MODULATOR_FILE = "media_modulator.safetensors"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
METHOD_STATE_FILE = "method_state.pt"
#: every phase has them (besides the adapter's files); the optional ones only when a method writes them
PHASE_FILES = (PROJECTORS_FILE, MODEL_CONFIG_FILE, METRICS_FILE)
OPTIONAL_PHASE_FILES = (UPDATES_FILE, MODULATOR_FILE)


def step_dir_name(step: int, task: str) -> str:
    return f"step_{step}_{task}"


@dataclass(frozen=True)
class Phase:
    step: int
    task: str
    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name


def adapter_folder(phase_folder: Path) -> Path:
    """Where a phase keeps its PEFT adapter: adapter/ in a run, the root in a revision pushed to the Hub."""
    return phase_folder / ADAPTER_DIR if (phase_folder / ADAPTER_DIR).is_dir() else phase_folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MiclError(f"{path}: cannot read ({err})") from None


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / RUN_CONFIG_FILE

    @property
    def initial_scores_file(self) -> Path:
        return self.path / INITIAL_SCORES_FILE

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    def phase_folder(self, step: int, task: str) -> Path:
        return self.path / step_dir_name(step, task)

    def checkpoints(self, step: int) -> Path:
        return self.path / CHECKPOINTS_DIR / f"step_{step}"

    def logs(self, step: int) -> Path:
        return self.path / LOGS_DIR / f"step_{step}"

    def order(self) -> list[str]:
        """The task order recorded in run_config.json."""
        if not self.config_file.is_file():
            raise MiclError(f"{self.config_file}: not found; is {self.path} a micl run folder?")
        order = _read_json(self.config_file).get("order")
        if not isinstance(order, list) or not all(isinstance(t, str) for t in order):
            raise MiclError(f"{self.config_file}: 'order' must be the list of tasks")
        return order

    def phase_names(self) -> list[str]:
        """The name of each step's phase: its task, or run_config.json's `phases` where a step trains on several
        tasks or none (micl/training/schedule.py; absent in runs of one task per step)."""
        phases = _read_json(self.config_file).get("phases") if self.config_file.is_file() else None
        if isinstance(phases, list) and phases and all(isinstance(p, str) for p in phases):
            return phases
        return self.order()

    def finished_phases(self, order: list[str] | None = None, complete: bool = False) -> list[Phase]:
        """The finished phases in step order (`order`: the phase names, default `phase_names()`), up to the first
        unfinished step. `complete`: a finished phase missing one of its files is an error (a folder copied in
        part)."""
        phases = []
        for step, task in enumerate(self.phase_names() if order is None else order):
            folder = self.phase_folder(step, task)
            if not (folder / METRICS_FILE).is_file():
                break
            if complete:
                needed = [f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}", *PHASE_FILES]
                missing = [name for name in needed if not (folder / name).is_file()]
                if missing:
                    raise MiclError(f"{folder}: finished phase without {', '.join(missing)}")
            phases.append(Phase(step, task, folder))
        return phases

    def finished_records(self, order: list[str]) -> list[dict]:
        """metrics.json of every finished phase."""
        return [_read_json(phase.folder / METRICS_FILE) for phase in self.finished_phases(order)]

    def last_phase(self) -> Phase:
        phases = self.finished_phases()
        if not phases:
            raise MiclError(f"{self.path}: no finished step yet")
        return phases[-1]

    def write_phase(self, step: int, task: str, write: Callable[[Path], None]) -> Path:
        """`write(folder)` fills a temporary folder, which then replaces the phase folder in one rename:
        a process killed meanwhile leaves no half-written phase (it has no metrics.json, so it is not
        finished, and the next attempt replaces it)."""
        final = self.phase_folder(step, task)
        tmp = self.path / f".{final.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def remove_checkpoints(self, step: int) -> None:
        shutil.rmtree(self.checkpoints(step), ignore_errors=True)


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / RUN_CONFIG_FILE).is_file() and not (Path(path) / MODEL_CONFIG_FILE).is_file()
