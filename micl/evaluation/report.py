"""Markdown report of a run: results matrix, continual metrics per task metric, cost, per-step metrics, two plots.

``write_report(run_dir)`` reads ``run_dir/results.json`` and writes, atomically, ``report.md``,
``matrix.png`` (heat map of the results matrix) and ``forgetting.png`` (forgetting per task) beside
it. It works on a run still in progress (partial matrix) and on the results.json of earlier releases
(no ``task_metrics``, ``learned_at``, ``by_metric`` or ``efficiency``: computed from what they have).

Scores of different metrics (CIDEr, accuracy) are never averaged together: every mean is per metric.
"""

from __future__ import annotations

import io
import json
from numbers import Real
from pathlib import Path

from micl.errors import MiclError
from micl.evaluation.continual import continual_metrics, grouped_metrics
from micl.evaluation.efficiency import EFFICIENCY_COLUMNS, efficiency_summary, scaled
from micl.utils.io import atomic_write_bytes, atomic_write_text

__all__ = ["load_results", "render_report", "write_report", "plot_matrix", "plot_forgetting", "metric_label",
           "metric_line", "run_metrics", "task_metric_names"]

_DEFINITIONS = {
    "average": "mean of the last row over the tasks seen so far",
    "average_incremental": "mean over steps of each row's mean over the tasks seen at that step",
    "forgetting": "mean over j < T-1 of max_{j<=l<T-1} R[l][j] - R[T-1][j] (lower is better)",
    "bwt": "mean over j < T-1 of R[T-1][j] - R[j][j] (negative = forgetting)",
    "fwt": "mean over 0 < j < T of (score of task j just before step j) - (initial model's score)",
    "plasticity": "MFT: mean over the tasks of R[j][j], the score right after learning task j",
}
_LABELS = {"cider": "CIDEr", "vqa_accuracy": "VQA accuracy", "exact_match": "exact match"}


def metric_label(name: str | None) -> str:
    """How tables name a task metric (CIDEr, VQA accuracy, exact match, or the metric's own name)."""
    return "score" if name is None else _LABELS.get(name, name)


def load_results(run_dir: str | Path) -> dict:
    """Read and check ``run_dir/results.json``; MiclError naming the file on any problem."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise MiclError(f"{path}: results.json not found (no evaluation has finished in this run yet?)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiclError(f"{path}: cannot read results: {e}") from e
    if not isinstance(results, dict):
        raise MiclError(f"{path}: expected a JSON object at the top level")
    matrix = results.get("matrix", [])
    if not isinstance(matrix, list) or not all(isinstance(r, list) for r in matrix):
        raise MiclError(f"{path}: 'matrix' must be a list of rows (lists)")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v is not None and (isinstance(v, bool) or not isinstance(v, Real)):
                raise MiclError(f"{path}: matrix[{i}][{j}] must be a number or null, got {v!r}")
    tasks = results.get("tasks")
    width = max((len(r) for r in matrix), default=0)
    if tasks is None:
        tasks = [f"task {j}" for j in range(width)]
    if not isinstance(tasks, list):
        raise MiclError(f"{path}: 'tasks' must be a list of task names")
    tasks = [str(t) for t in tasks] + [f"task {j}" for j in range(len(tasks), width)]
    results["tasks"] = tasks
    results["matrix"] = matrix
    steps = results.get("steps", [])
    if not isinstance(steps, list):
        raise MiclError(f"{path}: 'steps' must be a list")
    results["steps"] = steps
    return results


# ------------------------------------------------------------------------------------------
# formatting helpers
# ------------------------------------------------------------------------------------------

def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, Real):
        return f"{float(v):.{digits}f}"
    return str(v)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]], text_cols: int = 1) -> list[str]:
    """Markdown table; the first ``text_cols`` columns left-aligned, the others right-aligned."""
    align = ["---"] * text_cols + ["---:"] * (len(header) - text_cols)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align[: len(header)]) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _number(v):
    return float(v) if isinstance(v, Real) and not isinstance(v, bool) else None


def task_metric_names(results: dict) -> list[str | None]:
    """Main metric name of each task (from ``task_metrics`` or the steps' ``metric`` fields)."""
    tasks = results["tasks"]
    names: dict[str, str] = {}
    declared = results.get("task_metrics")
    if isinstance(declared, dict):
        names.update({str(k): str(v) for k, v in declared.items()})
    for step in results["steps"]:
        metrics = step.get("metrics") if isinstance(step, dict) else None
        if isinstance(metrics, dict):
            for task, m in metrics.items():
                if isinstance(m, dict) and isinstance(m.get("metric"), str):
                    names.setdefault(str(task), m["metric"])
    return [names.get(t) for t in tasks]


def _number_list(value) -> list | None:
    return value if isinstance(value, list) else None


def _learned_at(results: dict) -> list[int] | None:
    learned = results.get("learned_at")
    if isinstance(learned, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in learned):
        return learned
    return None  # one task per step


def _registered_metric(task: str) -> str | None:
    from micl.data.tasks import get_task
    from micl.errors import DataError

    try:
        metric = get_task(task).metric
    except DataError:
        return None
    return "cider" if metric == "caption" else metric


def run_metrics(results: dict) -> dict:
    """A run's metrics (``results`` as returned by :func:`load_results`), each mean per task metric:
    ``by_metric`` {metric: {tasks, seen, average, average_incremental, forgetting, bwt, fwt, plasticity}},
    ``final_scores`` {task: last-row score or None}, ``efficiency`` (micl/evaluation/efficiency.py: as recorded,
    else from the steps' records) and ``overall`` (every task together: only meaningful for one metric)."""
    tasks = results["tasks"]
    initial, pre_step = _number_list(results.get("initial_scores")), _number_list(results.get("pre_step_scores"))
    learned_at = _learned_at(results)
    overall = _summary(results)
    names = task_metric_names(results)
    if any(names):  # a task not evaluated yet: the metric its task definition names, if micl knows the task
        names = [name or _registered_metric(task) for task, name in zip(tasks, names)]
    else:  # nothing says: one group of every task
        names = ["score"] * len(tasks)
    by_metric = grouped_metrics(results["matrix"], names, initial, pre_step, learned_at)
    efficiency = results.get("efficiency")
    if not isinstance(efficiency, dict):
        efficiency = efficiency_summary(results["steps"])
    return {"overall": overall, "by_metric": by_metric, "task_metrics": dict(zip(tasks, names)),
            "final_scores": dict(zip(tasks, overall["final_scores"])), "efficiency": efficiency}


def metric_line(results: dict) -> str:
    """The last row's averages, one per metric: 'CIDEr 41.3 | exact match 50.0'."""
    by_metric = results.get("by_metric")
    if not isinstance(by_metric, dict) or not by_metric:
        by_metric = run_metrics(results)["by_metric"]
    return " | ".join(f"{metric_label(name)} {_fmt(group.get('average'), 1)}" for name, group in by_metric.items())


def _summary(results: dict) -> dict:
    """Continual metrics: the values recorded in results.json, computed from the matrix if absent."""
    tasks = results["tasks"]
    computed = continual_metrics(
        results["matrix"],
        initial_scores=results.get("initial_scores"),
        pre_step_scores=results.get("pre_step_scores"),
        num_tasks=len(tasks),
        learned_at=_learned_at(results),
    )
    summary = dict(computed)
    for key in ("average", "average_incremental", "forgetting", "bwt", "fwt", "plasticity"):
        recorded = results.get(key)
        if _number(recorded) is not None:
            summary[key] = float(recorded)
    recorded = results.get("forgetting_per_task")
    if isinstance(recorded, dict):
        summary["forgetting_per_task"] = [_number(recorded.get(t)) for t in tasks]
    elif isinstance(recorded, list):
        summary["forgetting_per_task"] = [_number(v) for v in recorded] + [None] * (len(tasks) - len(recorded))
    return summary


# ------------------------------------------------------------------------------------------
# plots (matplotlib object API + Agg canvas: no pyplot, no global backend change)
# ------------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_matrix(matrix: list[list], tasks: list[str], title: str = "Results matrix") -> bytes:
    """PNG bytes of the matrix as an annotated heat map (rows: after step i; columns: task j)."""
    import numpy as np
    from matplotlib.figure import Figure

    n_rows, n_cols = len(matrix), max(len(tasks), max((len(r) for r in matrix), default=0))
    fig = Figure(figsize=(max(4.0, 1.2 * n_cols + 2.5), max(3.0, 0.6 * n_rows + 2.0)))
    ax = fig.add_subplot(1, 1, 1)
    if n_rows == 0 or n_cols == 0:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        return _png(fig)
    data = np.full((n_rows, n_cols), np.nan)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if _number(v) is not None:
                data[i, j] = float(v)
    finite = data[np.isfinite(data)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    masked = np.ma.masked_invalid(data)
    im = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for i in range(n_rows):
        for j in range(n_cols):
            if np.isfinite(data[i, j]):
                dark = data[i, j] < 0.6 * vmax
                ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center",
                        color="white" if dark else "black", fontsize=9)
            else:
                ax.text(j, i, "–", ha="center", va="center", color="0.6", fontsize=9)
    labels = tasks + [f"task {j}" for j in range(len(tasks), n_cols)]
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels(labels, rotation=40, ha="right")
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([f"after {i}: {labels[i]}" if i < len(labels) else f"after {i}" for i in range(n_rows)])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("training step")
    ax.set_title(title)
    return _png(fig)


def plot_forgetting(per_task: list, tasks: list[str], mean: float | None = None) -> bytes:
    """PNG bytes of a bar chart of forgetting per task (tasks without a value are marked n/a)."""
    from matplotlib.figure import Figure

    n = max(len(tasks), len(per_task))
    labels = tasks + [f"task {j}" for j in range(len(tasks), n)]
    values = [_number(v) for v in per_task] + [None] * (n - len(per_task))
    fig = Figure(figsize=(max(4.0, 1.0 * n + 2.0), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    if not any(v is not None for v in values):
        ax.text(0.5, 0.5, "no forgetting measured yet\n(needs at least two training steps)",
                ha="center", va="center", fontsize=12)
        ax.set_axis_off()
        return _png(fig)
    heights = [v if v is not None else 0.0 for v in values]
    colors = ["tab:red" if (v or 0) > 0 else "tab:green" for v in values]
    bars = ax.bar(range(n), heights, color=colors)
    for b, v in zip(bars, values):
        ax.annotate("n/a" if v is None else f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom" if b.get_height() >= 0 else "top", fontsize=9,
                    xytext=(0, 2 if b.get_height() >= 0 else -2), textcoords="offset points")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, rotation=40, ha="right")
    ax.set_ylabel("forgetting (points)")
    ax.set_title("Forgetting per task" + ("" if mean is None else f" (mean {mean:.2f})"))
    return _png(fig)


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def render_report(results: dict, title: str = "Run report") -> str:
    """The Markdown text of the report (``results`` as returned by :func:`load_results`)."""
    tasks, matrix = results["tasks"], results["matrix"]
    summary = _summary(results)
    T = summary["num_steps"]
    phases = results.get("phases") if isinstance(results.get("phases"), list) else tasks
    status = "complete" if summary["complete"] else f"in progress: {T} of {len(phases)} steps evaluated"
    out = [f"# {title}", "", f"Tasks in order: {', '.join(f'`{t}`' for t in tasks) or '(none)'}  ",
           f"Status: {status}.", ""]

    out += ["## Results matrix", "",
            "Row *i*: scores after training step *i*; column *j*: task *j* "
            "(CIDEr x100 for captioning, accuracy in % for QA; – = not evaluated).", ""]
    header = ["after step"] + tasks
    rows = []
    initial = results.get("initial_scores")
    if isinstance(initial, list) and any(_number(v) is not None for v in initial):
        rows.append(["initial model"] + [_fmt(_number(v)) for v in initial] + ["–"] * (len(tasks) - len(initial)))
    for i in range(T):
        row = matrix[i] if i < len(matrix) else []
        cells = [_fmt(_number(v)) for v in row] + ["–"] * (len(tasks) - len(row))
        name = phases[i] if i < len(phases) else None
        rows.append([f"{i}: {name}" if name else str(i)] + cells[: len(tasks)])
    out += _table(header, rows) + ["", "![Results matrix](matrix.png)", ""]

    metrics = run_metrics(results)
    groups = metrics["by_metric"]
    out += ["## Continual metrics", "",
            "Each mean is over the tasks of one metric: scores of different metrics are not averaged together.", ""]
    header = ["metric"] + [f"{metric_label(g)} ({v['seen']}/{v['tasks']} tasks)" for g, v in groups.items()]
    if len(groups) == 1:  # one metric: the values results.json recorded
        rows = [[k, _fmt(summary.get(k)), _DEFINITIONS[k]] for k in _DEFINITIONS]
    else:
        rows = [[k] + [_fmt(v.get(k)) for v in groups.values()] + [_DEFINITIONS[k]] for k in _DEFINITIONS]
    out += _table(header + ["definition"], rows)
    out[-len(rows) - 1] = "|---|" + "---:|" * len(groups) + "---|"
    out += ["", "R[i][j] = score of task j after step i, T = steps evaluated so far (a task learned at step s: "
            "R[s][j] in place of R[j][j]). FWT needs the scores of each task before its step and of the initial "
            "model (`pre_step_scores`, `initial_scores`); it is – otherwise, and for a run of one step (as forgetting "
            "and BWT are).", ""]
    efficiency = metrics["efficiency"]
    out += ["## Cost", ""]
    out += _table([title for title, _ in EFFICIENCY_COLUMNS.values()],
                  [[_fmt(scaled(efficiency, key)) for key in EFFICIENCY_COLUMNS]], text_cols=0)
    out += ["", "Trainable parameters and extra storage (bytes a phase keeps beyond the adapter and projectors): the "
            "largest over the steps; peak RSS: the highest step's; wall time: training and evaluation seconds summed "
            "over the steps (docs/metrics.md).", ""]

    out += ["### Forgetting per task", ""]
    fpt = summary["forgetting_per_task"]
    out += _table(["task", "forgetting"], [[t, _fmt(fpt[j] if j < len(fpt) else None)] for j, t in enumerate(tasks)])
    out += ["", "![Forgetting per task](forgetting.png)", ""]

    out += ["## Per-step metrics", ""]
    if not results["steps"]:
        out += ["(none recorded yet)", ""]
    for k, step in enumerate(results["steps"]):
        if not isinstance(step, dict):
            continue
        idx, task = step.get("step", k), step.get("task", "?")
        out += [f"### Step {idx}: `{task}`", ""]
        metrics = step.get("metrics")
        if not isinstance(metrics, dict) or not metrics:
            out += ["(no metrics)", ""]
            continue
        names: list[str] = []
        for m in metrics.values():
            if isinstance(m, dict):
                names += [n for n in m if n not in names]
        names = [n for n in ("metric", "score") if n in names] + [n for n in names if n not in ("metric", "score")]
        table_rows = []
        for t, m in metrics.items():
            if isinstance(m, dict):
                table_rows.append([t] + [_fmt(m.get(n)) for n in names])
            else:
                table_rows.append([t] + [_fmt(m)] + [""] * (len(names) - 1 if names else 0))
        out += _table(["task"] + (names or ["score"]), table_rows, text_cols=2 if names[:1] == ["metric"] else 1) + [""]

    config = results.get("config")
    if config:
        out += ["## Configuration", "", "```json",
                json.dumps(config, indent=2, ensure_ascii=False, sort_keys=False, default=str), "```", ""]
    return "\n".join(out)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``matrix.png`` and ``forgetting.png`` into ``run_dir`` (atomically)
    from ``run_dir/results.json``. Returns the path of ``report.md``."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    summary = _summary(results)
    tasks = results["tasks"]
    T = summary["num_steps"]
    atomic_write_bytes(run_dir / "matrix.png", plot_matrix(results["matrix"][:T], tasks))
    atomic_write_bytes(run_dir / "forgetting.png",
                       plot_forgetting(summary["forgetting_per_task"], tasks, summary.get("forgetting")))
    return atomic_write_text(run_dir / "report.md", render_report(results, title=f"Run report: {run_dir.name}"))
