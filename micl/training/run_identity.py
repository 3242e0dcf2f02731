"""What a run's results depend on. A rerun into the same output_dir must match the recipe the run was
started with (run_config.json), or one results matrix would mix two settings; what only changes how a run
is computed may differ, so that a killed run resumes on another machine or with other resources."""

from __future__ import annotations

import dataclasses
import json

from ..config import LoraArgs, RecipeConfig
from ..errors import ConfigError
from ..run_folder import RunFolder
from ..utils.io import atomic_write_json

# decoding settings included: one matrix must not mix them
RUN_IDENTITY_KEYS = ("order", "seed", "method", "method_args", "model", "lora", "data", "train", "eval", "tasks")
# how a run is computed, not what: may change when a run is resumed (e.g. checkpointing after an OOM, another
# machine). `train.num_threads` changes only the float summation order of CPU kernels (results agree to
# rounding, not bitwise), and pinning a run to its first machine's core count would block resuming it elsewhere;
# `eval.batch_size` only regroups the same prompts (left padding, positions from the attention mask)
RUNTIME_KEYS = {"model": ("attn_implementation",),
                "train": ("gradient_checkpointing", "dataloader_num_workers", "dataloader_pin_memory", "num_threads",
                          "ddp_timeout", "tensorboard", "save_steps"),
                "eval": ("batch_size",)}


def _other_tuners_keys(lora: dict) -> set[str]:
    """The `lora` keys that belong to another tuner than `lora.type` (they do not change the run, and their
    defaults may change: gated LoRA's gate_init did)."""
    return {f.name for f in dataclasses.fields(LoraArgs)
            if f.metadata.get("tuner") not in (None, lora.get("type", "lora"))}


def identity(config: dict, key: str):
    """`config[key]` without its RUNTIME_KEYS (and, for `lora`, without another tuner's keys)."""
    value = config.get(key)
    if isinstance(value, dict) and key in RUNTIME_KEYS:
        value = {k: v for k, v in value.items() if k not in RUNTIME_KEYS[key]}
    if isinstance(value, dict) and key == "lora":
        value = {k: v for k, v in value.items() if k not in _other_tuners_keys(value)}
    return value


def with_defaults(stored: dict) -> dict:
    """A stored run_config with the settings added to micl after it was written filled in at their defaults:
    a run made before a new setting existed (e.g. `lora.type`) still resumes."""
    defaults = RecipeConfig().to_dict()
    filled = dict(stored)
    for key, value in defaults.items():
        if key not in stored:
            filled[key] = value
        elif isinstance(value, dict) and isinstance(stored[key], dict) and key != "method_args":
            filled[key] = {**value, **stored[key]}
    return filled


def changed_keys(stored: dict, resolved: dict) -> list[str]:
    """The RUN_IDENTITY_KEYS in which a stored run_config (of any release) and `resolved` differ."""
    previous = with_defaults(stored)
    return [k for k in RUN_IDENTITY_KEYS if identity(previous, k) != identity(resolved, k)]


def check_or_write(folder: RunFolder, resolved: dict, write: bool) -> None:
    """Refuses a run folder that holds a run with other settings; else records `resolved` (when `write`:
    the main process) if the folder has no run yet."""
    path = folder.config_file
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"{path}: not a readable run_config.json ({err}); choose another output_dir") from None
        changed = changed_keys(stored, resolved)
        if changed:
            raise ConfigError(f"{path}: output_dir already holds a run with different settings ({', '.join(changed)}); "
                              f"resume it with the same recipe or choose another output_dir")
        return
    if write:
        folder.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, resolved)
