"""What a run cost, from its steps' records (metrics.json, recorded by micl/training/usage.py and the loop):

* trainable_params     the most parameters trained at one step (a method that freezes parts trains fewer later)
* extra_storage_bytes  the most bytes a phase kept beyond the adapter and projectors (memory buffers, teachers'
                       statistics, Fisher matrices, prototypes, folded-in updates: what grows with the steps)
* peak_rss_bytes       the highest peak resident memory of a step (getrusage maxrss, reset at each step on Linux)
* wall_time_s          sum over the steps of training and evaluation seconds (train_s + eval_s; model loading,
                       encoding media into the feature store and saving phases left out: they depend on caches)

A value is None when a step does not record it (a run from a micl that did not measure it).
"""

from __future__ import annotations

from numbers import Real

__all__ = ["EFFICIENCY_COLUMNS", "efficiency_summary", "scaled"]

#: key -> (column title, unit it is shown in)
EFFICIENCY_COLUMNS = {
    "trainable_params": ("trainable params (M)", 1e6),
    "extra_storage_bytes": ("extra storage (MiB)", 2**20),
    "peak_rss_bytes": ("peak RSS (GiB)", 2**30),
    "wall_time_s": ("wall time (min)", 60.0),
}


def scaled(efficiency: dict, key: str) -> float | None:
    """`efficiency[key]` in the unit of its column."""
    value = efficiency.get(key) if isinstance(efficiency, dict) else None
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    return float(value) / EFFICIENCY_COLUMNS[key][1]


def _values(steps: list[dict], key: str) -> list[float] | None:
    values = [step.get(key) if isinstance(step, dict) else None for step in steps]
    if not values or any(isinstance(v, bool) or not isinstance(v, Real) for v in values):
        return None
    return [float(v) for v in values]


def efficiency_summary(steps: list[dict]) -> dict:
    """The efficiency of a run from its steps' records (see the module docstring)."""
    summary = {}
    for key in ("trainable_params", "extra_storage_bytes", "peak_rss_bytes"):
        values = _values(steps, key)
        summary[key] = None if values is None else max(values)
    train, evaluation = _values(steps, "train_runtime_s"), _values(steps, "eval_runtime_s")
    summary["train_s"] = None if train is None else sum(train)
    summary["eval_s"] = None if evaluation is None else sum(evaluation)
    summary["wall_time_s"] = None if train is None or evaluation is None else sum(train) + sum(evaluation)
    return summary
