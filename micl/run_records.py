"""A finished run's record: the small files that hold its results, without its weights (run_config.json,
initial_scores.json, results.json and each phase's metrics.json and predictions.jsonl; a few hundred KB).

`micl compare --records DIR` keeps one per run under DIR/<run folder name> and, before training a run, restores
it into an absent or empty run folder: the training loop then finds every step finished and only rebuilds
results.json and the report. DIR can live in git, so a comparison that takes several days of CPU resumes on a
fresh machine from the runs finished elsewhere. Only complete runs have a record (a partial run cannot resume
without its adapters), and a record made with other settings is refused, never overwritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import ConfigError, MiclError
from .run_folder import INITIAL_SCORES_FILE, METRICS_FILE, PREDICTIONS_FILE, RESULTS_FILE, RUN_CONFIG_FILE

__all__ = ["RECORD_PATTERNS", "is_complete", "restore_record", "save_record"]

RECORD_PATTERNS = (RUN_CONFIG_FILE, INITIAL_SCORES_FILE, RESULTS_FILE, f"step_*/{METRICS_FILE}",
                   f"step_*/{PREDICTIONS_FILE}")


def is_complete(folder: str | Path) -> bool:
    """results.json says every step of the run's order is finished."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("complete"))
    except ValueError as err:
        raise MiclError(f"{path}: not readable JSON ({err})") from None


def _copy_record_files(source: Path, target: Path) -> None:
    found = {p.relative_to(source) for pattern in RECORD_PATTERNS for p in source.glob(pattern) if p.is_file()}
    for relative in sorted(found):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, target / relative)


def save_record(run_dir: str | Path, record_dir: str | Path) -> bool:
    """Copies a complete run's record files to `record_dir` (replacing what was there in one rename).
    False (nothing written) for a run that is not complete."""
    run_dir, record_dir = Path(run_dir), Path(record_dir)
    if not is_complete(run_dir):
        return False
    tmp = record_dir.with_name(f".{record_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    _copy_record_files(run_dir, tmp)
    old = record_dir.with_name(f".{record_dir.name}.old")
    if record_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        record_dir.rename(old)
    tmp.rename(record_dir)
    if old.exists():
        shutil.rmtree(old)
    return True


def restore_record(record_dir: str | Path, run_dir: str | Path, resolved: dict) -> bool:
    """Copies a complete record into `run_dir` when that folder is absent or empty (a run there, finished or
    not, is left to the training loop). `resolved`: the run's settings as run_config.json records them; a
    record with other settings raises ConfigError naming them. True when the record was restored."""
    from .training.run_identity import changed_keys  # the training package imports torch

    record_dir, run_dir = Path(record_dir), Path(run_dir)
    if not is_complete(record_dir):
        return False
    config_path = record_dir / RUN_CONFIG_FILE
    try:
        stored = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config_path}: the record has no readable run_config.json ({err})") from None
    changed = changed_keys(stored, resolved)
    if changed:
        raise ConfigError(f"{record_dir}: a finished run's record with different settings ({', '.join(changed)}); "
                          f"a comparison must not mix them: delete the record to train the run again, or give "
                          f"another --records folder")
    if run_dir.exists() and any(run_dir.iterdir()):
        return False
    _copy_record_files(record_dir, run_dir)
    return True
