"""Which launch wrote a within-step checkpoint: a step resumes in the middle only under the same one.

DeepSpeed's optimizer state is one shard per rank and per ZeRO stage, and the Trainer's position in an epoch
counts global batches, so another process count or strategy cannot continue a step. (Between steps any
launch continues a run: the phase folders hold full tensors.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback

from ..errors import ConfigError
from ..utils.distributed import deepspeed_zero_stage, world_size
from ..utils.io import atomic_write_json

LAYOUT_FILE = "launch_layout.json"


def current_layout() -> dict:
    return {"world_size": world_size(), "deepspeed_zero_stage": deepspeed_zero_stage()}


def describe(layout: dict) -> str:
    stage = layout.get("deepspeed_zero_stage")
    strategy = f"DeepSpeed ZeRO-{stage}" if stage is not None else "no DeepSpeed"
    return f"{layout.get('world_size')} process(es), {strategy}"


class LayoutCallback(TrainerCallback):
    """Writes the launch layout into every within-step checkpoint (main process)."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            atomic_write_json(folder / LAYOUT_FILE, current_layout())


def check_resumable(checkpoint: str | os.PathLike, step: int) -> None:
    """A ConfigError when `checkpoint` was written by another launch (checkpoints without the file, e.g.
    from an older micl, are not checked)."""
    path = Path(checkpoint) / LAYOUT_FILE
    if not path.is_file():
        return
    saved, now = json.loads(path.read_text()), current_layout()
    if saved != now:
        raise ConfigError(
            f"{checkpoint}: step {step} was interrupted under another launch ({describe(saved)}; now "
            f"{describe(now)}); a step resumes in the middle only under the launch that wrote its checkpoint: "
            f"relaunch with that, or delete {Path(checkpoint).parent} to restart the step (finished steps are kept)")
