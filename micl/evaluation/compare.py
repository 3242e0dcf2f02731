"""Comparison of methods x task orders: one table (Markdown + JSON) and a plot from finished runs.

Per run: average of the last row, average CIDEr (captioning tasks) and average accuracy (QA tasks) on
that row, average forgetting and BWT. Per method: the mean over the orders it was run on.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tasks import get_task
from ..errors import MiclError
from ..utils.io import atomic_write_json, atomic_write_text
from .continual import grouped_metrics


def run_summary(run_dir: str | Path, method: str, order: str) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise MiclError(f"{path}: not found; the run {method} / {order} did not finish")
    results = json.loads(path.read_text())
    groups = [get_task(name).task_type for name in results["tasks"]]
    by_type = grouped_metrics(results["matrix"], groups)
    return {
        "method": method,
        "order": order,
        "run_dir": str(run_dir),
        "complete": results.get("complete", False),
        "average": results["average"],
        "caption_average": by_type.get("caption", {}).get("average"),
        "qa_average": by_type.get("qa", {}).get("average"),
        "forgetting": results["forgetting"],
        "bwt": results["bwt"],
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = ("average", "caption_average", "qa_average", "forgetting", "bwt")
    return [{"method": m, "orders": [r["order"] for r in rows if r["method"] == m],
             **{k: _mean(r[k] for r in rows if r["method"] == m) for k in keys}} for m in methods]


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_markdown(rows: list[dict], summary: list[dict], settings: str = "") -> str:
    head = "| method | orders | average | avg CIDEr (caption) | avg accuracy (QA) | forgetting | BWT |\n"
    head += "|---|---|---:|---:|---:|---:|---:|\n"
    lines = ["# Method comparison", ""]
    if settings:
        lines += [settings, ""]
    lines += ["Mean over task orders (scores after the last step; forgetting: lower is better).", "", head.rstrip()]
    for s in summary:
        lines.append(f"| {s['method']} | {', '.join(s['orders'])} | {_fmt(s['average'])} | {_fmt(s['caption_average'])} "
                     f"| {_fmt(s['qa_average'])} | {_fmt(s['forgetting'])} | {_fmt(s['bwt'])} |")
    lines += ["", "Per run:", "", head.rstrip()]
    for r in rows:
        lines.append(f"| {r['method']} | {r['order']} | {_fmt(r['average'])} | {_fmt(r['caption_average'])} "
                     f"| {_fmt(r['qa_average'])} | {_fmt(r['forgetting'])} | {_fmt(r['bwt'])} |")
    lines += ["", "![comparison](compare.png)", ""]
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [s["method"] for s in summary]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in ((axes[0], "average", "average score (last row)"), (axes[1], "forgetting", "average forgetting")):
        values = [s[key] or 0.0 for s in summary]
        ax.bar(methods, values, color="#4c72b0" if key == "average" else "#c44e52")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_comparison(rows: list[dict], out_dir: str | Path, settings: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    atomic_write_json(out / "compare.json", {"runs": rows, "summary": summary, "settings": settings})
    plot(summary, out / "compare.png")
    atomic_write_text(out / "compare.md", render_markdown(rows, summary, settings))
    return out / "compare.md"
