"""What a step costs, recorded in its metrics.json (the efficiency columns of `micl compare`,
micl/evaluation/efficiency.py): trainable parameters, the bytes a method keeps in its phase beyond the
adapter and projectors, and the process's peak resident memory."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from ..run_folder import ADAPTER_DIR, METRICS_FILE, MODEL_CONFIG_FILE, PREDICTIONS_FILE, PROJECTORS_FILE

#: a phase's files that every method has (the model the loop saves, and the loop's own records)
_BASE_PHASE_FILES = {ADAPTER_DIR, PROJECTORS_FILE, MODEL_CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE}


def trainable_parameters(model) -> int:
    """Elements of the parameters the optimizer updates (under ZeRO-3 their full size, not this rank's shard)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def extra_storage_bytes(phase: Path) -> int:
    """Bytes of a phase folder beyond the adapter, the projectors and the loop's records: the methods' states
    (memory buffers, Fisher matrices, prototypes, ...), folded-in base updates, a media modulator."""
    total = 0
    for entry in Path(phase).iterdir():
        if entry.name in _BASE_PHASE_FILES:
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return total


def reset_peak_rss() -> bool:
    """Starts a new peak-RSS window (Linux: /proc/self/clear_refs resets the high-water mark that
    getrusage reports). False where it cannot: the peak then covers the whole process."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """`getrusage(RUSAGE_SELF).ru_maxrss` in bytes (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
