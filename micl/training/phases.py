"""Saving a finished step as a phase folder (micl/run_folder.py) and restoring a run from its last phase."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..run_folder import METHOD_STATE_FILE, METRICS_FILE, PREDICTIONS_FILE, RunFolder
from ..utils.distributed import barrier, gathered, is_main_process
from ..utils.io import safe_torch_load
from .usage import extra_storage_bytes

logger = logging.getLogger(__name__)


def save_phase(folder: RunFolder, step: int, task: str, model, methods, record: dict, predictions: dict) -> None:
    """Every rank enters (gathering ZeRO-3 shards is collective); the main process writes. The record (metrics.json)
    gets the bytes the phase holds beyond the adapter and projectors (`extra_storage_bytes`)."""
    def write(phase: Path) -> None:
        model.save_pretrained(phase)
        torch.save([m.state_dict() for m in methods], phase / METHOD_STATE_FILE)
        record["extra_storage_bytes"] = extra_storage_bytes(phase)  # before the loop's own files are written
        with open(phase / PREDICTIONS_FILE, "w") as handle:
            for task_name, rows in predictions.items():
                for row in rows:
                    handle.write(json.dumps({"task": task_name, **row}) + "\n")
        (phase / METRICS_FILE).write_text(json.dumps(record, indent=2))

    with gathered(model.saved_parameters()):
        if is_main_process():
            folder.write_phase(step, task, write)
    barrier()


def restore_phase(phase: Path, model, methods) -> None:
    """The model's adapter, projectors and extras and the methods' states as the phase saved them."""
    model.load_phase(phase)
    states = safe_torch_load(phase / METHOD_STATE_FILE)
    for method, state in zip(methods, states):
        method.load_state_dict(state)
    logger.info("restored %s", phase)
