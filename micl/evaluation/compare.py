"""Comparison of methods x task orders x seeds: tables (Markdown + JSON) and a plot from finished runs.

Per run (`run_summary`, from its results.json, those of earlier releases too): for each task metric (CIDEr for
captioning, exact match or VQA accuracy for QA; scores of different metrics are never averaged together) the last
row's average, forgetting, BWT, FWT and plasticity (MFT); the last row's score of every task; what the run cost
(micl/evaluation/efficiency.py, as the run recorded it).

Per method and order (a cell): mean and sample standard deviation (n - 1 in the denominator) over its seeds, with
n. Per method over the orders: for each seed that has a run of every order, the mean over the orders; then mean and
sample standard deviation over those seeds.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..errors import MiclError
from ..utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .continual import grouped_metrics
from .efficiency import EFFICIENCY_COLUMNS, scaled
from .report import load_results, metric_label, run_metrics
from .scoring import TASK_METRICS

__all__ = ["METRIC_KEYS", "cell_summaries", "render_markdown", "run_folder_name", "run_summary", "summarize",
           "write_comparison"]

METRIC_KEYS = ("average", "forgetting", "bwt", "fwt", "plasticity")
_TITLES = {"average": "avg", "forgetting": "forgetting", "bwt": "BWT", "fwt": "FWT", "plasticity": "MFT"}
#: settings shown on the page when every run has the same value
SETTING_KEYS = ("model.llm", "model.image_encoder", "model.audio_encoder", "model.video_encoder", "model.dtype",
                "lora.r", "lora.alpha", "train.epochs", "train.batch_size", "train.lr", "train.projector_lr",
                "data.root", "data.max_train_samples", "data.max_eval_samples", "data.eval_split",
                "eval.max_new_tokens", "eval.num_beams", "eval.repetition_penalty", "eval.forward_transfer")


def run_folder_name(method: str, order: str, seed: int) -> str:
    """A run's folder under the comparison's: `<method>-<order>`, `_s<seed>` added for seeds other than 0 (so the
    folders of a comparison of seed 0 alone are the seed-0 runs of one over several seeds, and are reused)."""
    return f"{method}-{order}" if seed == 0 else f"{method}-{order}_s{seed}"


def _task_type(metric: str | None) -> str | None:
    return next((kind for kind, names in TASK_METRICS.items() if metric in names), None)


def run_summary(run_dir: str | Path, method: str, order: str, seed: int | None = None) -> dict:
    """One run's row: `values` {"<metric>/<key>", "final/<task>", "cost/<key>": number or None} and the run's
    identity. `seed`: None = the one its results.json records."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise MiclError(f"{path}: not found; the run {method} / {order} did not finish")
    results = load_results(run_dir)
    metrics = run_metrics(results)
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    values: dict[str, float | None] = {}
    for metric, group in metrics["by_metric"].items():
        values.update({f"{metric}/{key}": group.get(key) for key in METRIC_KEYS})
    values.update({f"final/{task}": score for task, score in metrics["final_scores"].items()})
    values.update({f"cost/{key}": scaled(metrics["efficiency"], key) for key in EFFICIENCY_COLUMNS})
    overall = metrics["overall"]
    by_type = grouped_metrics(results["matrix"], [_task_type(m) for m in metrics["task_metrics"].values()])
    return {
        "method": method,
        "order": order,
        "seed": config.get("seed") if seed is None else seed,
        "run_dir": str(run_dir),
        "complete": bool(overall["complete"]),
        "metrics": list(metrics["by_metric"]),
        "tasks": list(results["tasks"]),
        "values": values,
        "config": config,
        # compare.json of earlier releases (not in the tables: `average` is over every task, CIDEr and accuracy mixed)
        "average": overall["average"],
        "caption_average": by_type.get("caption", {}).get("average"),
        "qa_average": by_type.get("qa", {}).get("average"),
        "forgetting": overall["forgetting"],
        "bwt": overall["bwt"],
    }


def _stats(values) -> dict:
    xs = [float(v) for v in values if v is not None]
    return {"mean": sum(xs) / len(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) >= 2 else None,
            "n": len(xs)}


def _keys(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row["values"]))


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def cell_summaries(rows: list[dict]) -> list[dict]:
    """Per method and order: {key: {mean, std, n}} over the seeds of its runs."""
    cells = []
    for order in _unique(r["order"] for r in rows):
        for method in _unique(r["method"] for r in rows):
            runs = [r for r in rows if r["method"] == method and r["order"] == order]
            if runs:
                cells.append({"method": method, "order": order, "n": len(runs), "seeds": [r["seed"] for r in runs],
                              "values": {key: _stats(r["values"].get(key) for r in runs) for key in _keys(runs)}})
    return cells


def summarize(rows: list[dict], orders: list[str] | None = None) -> list[dict]:
    """Per method over the orders: the seeds with a run of every order (n of them), each seed's mean over the
    orders (None where an order lacks the value), then {key: {mean, std, n}} over those seeds."""
    orders = orders or _unique(r["order"] for r in rows)
    summary = []
    for method in _unique(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        by_seed: dict = {}
        for run in runs:
            by_seed.setdefault(run["seed"], {})[run["order"]] = run
        seeds = [seed for seed, of_seed in by_seed.items() if all(order in of_seed for order in orders)]
        per_seed = []
        for seed in seeds:
            of_seed = [by_seed[seed][order]["values"] for order in orders]
            per_seed.append({key: None if any(v.get(key) is None for v in of_seed)
                             else sum(v[key] for v in of_seed) / len(of_seed) for key in _keys(runs)})
        summary.append({"method": method, "orders": orders, "n": len(seeds), "seeds": seeds,
                        "values": {key: _stats(s[key] for s in per_seed) for key in _keys(runs)}})
    return summary


# ---- Markdown ------------------------------------------------------------------------------------------------

def _cell(stat: dict | None, n: int) -> str:
    if not stat or stat["mean"] is None:
        return "–"
    text = f"{stat['mean']:.2f}" + ("" if stat["std"] is None else f" ± {stat['std']:.2f}")
    return text + ("" if stat["n"] == n else f" (n={stat['n']})")


def _table(header: list[str], rows: list[list[str]], text_cols: int = 1) -> list[str]:
    align = ["---"] * text_cols + ["---:"] * (len(header) - text_cols)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _tables(entries: list[dict], metrics: list[str], tasks: list[str]) -> list[str]:
    """The three tables of a group of entries (cells of one order, or the summary over the orders)."""
    def rows(keys):
        return [[e["method"], str(e["n"])] + [_cell(e["values"].get(k), e["n"]) for k in keys] for e in entries]

    metric_keys = [f"{m}/{k}" for m in metrics for k in METRIC_KEYS]
    out = _table(["method", "n"] + [f"{metric_label(m)} {_TITLES[k]}" for m in metrics for k in METRIC_KEYS],
                 rows(metric_keys), text_cols=1)
    out += ["", "Final score of each task (the last row):", ""]
    out += _table(["method", "n"] + [f"`{t}`" for t in tasks], rows([f"final/{t}" for t in tasks]))
    out += ["", "Cost:", ""]
    out += _table(["method", "n"] + [title for title, _ in EFFICIENCY_COLUMNS.values()],
                  rows([f"cost/{k}" for k in EFFICIENCY_COLUMNS]))
    return out


def _setting(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def common_settings(rows: list[dict]) -> dict:
    """The settings of SETTING_KEYS that every run has the same value of ("varies" otherwise)."""
    settings = {}
    for key in SETTING_KEYS:
        values = _unique(repr(_setting(r["config"], key)) for r in rows)
        settings[key] = _setting(rows[0]["config"], key) if len(values) == 1 else "varies"
    return settings


def render_markdown(rows: list[dict], command: str = "", seeds: list[int] | None = None,
                    orders: list[str] | None = None, missing: list[str] = ()) -> str:
    orders = orders or _unique(r["order"] for r in rows)
    metrics = _unique(m for r in rows for m in r["metrics"])
    tasks = _unique(t for r in rows for t in r["tasks"])
    seeds = seeds if seeds is not None else sorted(_unique(r["seed"] for r in rows), key=str)
    lines = ["# Method comparison", ""]
    if command:
        lines += [f"Produced by `{command}` (each run: its recipe with `order`, `seed` and `output_dir` set by "
                  "`micl compare`, then the `--set` overrides).", ""]
    lines += [f"- Runs tabulated: {len(rows)} ({len(_unique(r['method'] for r in rows))} methods, orders "
              f"{', '.join(orders)}, seeds {', '.join(map(str, seeds))})"
              + (f"; not finished, left out: {len(missing)}" if missing else ""),
              "- Every cell: mean ± sample standard deviation (n − 1 in the denominator) over the seeds of its runs; "
              "n = number of seeds in the row (a standard deviation needs n ≥ 2; a value over fewer seeds says "
              "so: (n=k)).",
              "- Settings common to every run: " + ", ".join(
                  f"`{k}={v}`" for k, v in common_settings(rows).items() if v is not None), ""]
    lines += ["Scores of the last row (after the last step) on the evaluation split. Each metric's columns average "
              "only its tasks: scores of different metrics are never averaged together. avg: average; forgetting "
              "(lower is better); BWT (negative = forgetting); FWT (score before learning a task minus the untrained "
              "model's; needs `eval.forward_transfer`); MFT: plasticity, the mean score right after learning each "
              "task. –: does not apply (a run of one step, joint or zero-shot, has no forgetting, BWT or FWT) or "
              "was not recorded. Cost: trainable parameters and extra storage (bytes a method keeps per phase beyond "
              "the adapter and projectors), the largest over the steps; peak RSS of the highest step; wall time: "
              "training + evaluation, summed over the steps (docs/metrics.md).", ""]
    summary = summarize(rows, orders)
    if len(orders) > 1:
        lines += [f"## Mean over the orders ({', '.join(orders)})", "",
                  "n: seeds with a run of every order; each seed's mean over the orders, then mean ± std over the "
                  "seeds.", ""]
        lines += _tables(summary, metrics, tasks) + [""]
    cells = cell_summaries(rows)
    for order in orders:
        of_order = [c for c in cells if c["order"] == order]
        if of_order:
            order_tasks = _unique(t for r in rows if r["order"] == order for t in r["tasks"])
            lines += [f"## Order `{order}`", ""] + _tables(of_order, metrics, order_tasks) + [""]
    lines += ["## Per run", ""]
    head = ["method", "order", "seed", "complete"] + [f"{metric_label(m)} {_TITLES[k]}" for m in metrics
                                                      for k in ("average", "forgetting", "plasticity")]
    body = [[r["method"], r["order"], str(r["seed"]), "yes" if r["complete"] else "no"]
            + [_cell(_stats([r["values"].get(f"{m}/{k}")]), 1) for m in metrics for k in ("average", "forgetting",
                                                                                        "plasticity")]
            for r in rows]
    lines += _table(head, body, text_cols=4)
    lines += ["", "![comparison](compare.png)", ""]
    return "\n".join(lines)


# ---- plot ------------------------------------------------------------------------------------------------------

def plot(summary: list[dict], metrics: list[str]) -> bytes:
    """PNG: per metric, the average and the forgetting of every method (mean over the orders, ± std over seeds)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = [s["method"] for s in summary]
    fig = Figure(figsize=(max(8.0, 1.1 * len(methods) * max(len(metrics), 1) + 2), 3.4))
    FigureCanvasAgg(fig)
    width = 0.8 / max(len(metrics), 1)
    for k, (key, title) in enumerate((("average", "average (last row)"), ("forgetting", "forgetting"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for g, metric in enumerate(metrics):
            stats = [s["values"].get(f"{metric}/{key}") or {} for s in summary]
            ax.bar([i + g * width for i in range(len(methods))], [st.get("mean") or 0.0 for st in stats], width,
                   yerr=[st.get("std") or 0.0 for st in stats], capsize=3, label=metric_label(metric))
        ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(methods))])
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_comparison(rows: list[dict], out_dir: str | Path, command: str = "", seeds: list[int] | None = None,
                     orders: list[str] | None = None, missing: list[str] = ()) -> Path:
    """compare.md, compare.json and compare.png in `out_dir`. `missing`: the runs left out (not finished)."""
    if not rows:
        raise MiclError(f"{out_dir}: no finished run to compare")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    orders = orders or _unique(r["order"] for r in rows)
    summary = summarize(rows, orders)
    metrics = _unique(m for r in rows for m in r["metrics"])
    atomic_write_json(out / "compare.json", {
        "command": command, "orders": orders, "seeds": seeds, "std": "sample standard deviation (n - 1)",
        "settings": common_settings(rows), "missing": list(missing),
        "runs": [{k: v for k, v in r.items() if k != "config"} for r in rows],
        "cells": cell_summaries(rows), "summary": summary})
    atomic_write_bytes(out / "compare.png", plot(summary, metrics))
    return atomic_write_text(out / "compare.md", render_markdown(rows, command, seeds, orders, missing))
