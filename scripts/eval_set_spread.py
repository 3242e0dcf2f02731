"""How large an evaluation set must be: the spread of a task's score from the evaluation sample alone, against
the spread over training seeds.

    python scripts/eval_set_spread.py RUN_DIR [RUN_DIR ...] [--sizes 24 48 96 240] [--draws 200] [--json OUT]

Each RUN_DIR is one finished run (the same recipe, one seed each) evaluated on a large test split. For every task,
in the phase where it was learned (the diagonal R[j][j]): the score on all N samples, and for each size n the
standard deviation of the score over `--draws` test sets of n samples drawn with replacement from those N (a
bootstrap: a test set of n new samples from the same generator). Table: per task and n, the evaluation SD (mean
over the runs) beside the SD of the full-N score over the runs (seeds). docs/synth.md uses it to choose sizes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from micl.data.tasks import get_task  # noqa: E402
from micl.evaluation.scoring import score_task  # noqa: E402
from micl.run_folder import PREDICTIONS_FILE, RunFolder  # noqa: E402
from micl.training.evaluation import main_metric  # noqa: E402


def learned_phase_predictions(run_dir: Path) -> dict[str, list[dict]]:
    """Per task: its predictions in the phase that learned it (one task per step)."""
    folder = RunFolder(run_dir)
    out = {}
    for phase in folder.finished_phases():
        rows = [json.loads(line) for line in (phase.folder / PREDICTIONS_FILE).read_text().splitlines() if line]
        out[phase.task] = [row for row in rows if row["task"] == phase.task]
    return out


def score(task: str, rows: list[dict]) -> float:
    spec = get_task(task)
    return score_task(spec.task_type, [r["prediction"] for r in rows], [r["references"] for r in rows],
                      metric=main_metric(spec), meteor=False)["score"]


def spread(runs: list[Path], sizes: list[int], draws: int, seed: int = 0) -> list[dict]:
    per_run = [learned_phase_predictions(run) for run in runs]
    tasks = [task for task in per_run[0] if all(task in p for p in per_run)]
    rng = random.Random(seed)
    table = []
    for task in tasks:
        full = [score(task, p[task]) for p in per_run]
        for n in sizes:
            sds = []
            for predictions in per_run:
                rows = predictions[task]
                scores = [score(task, rng.choices(rows, k=n)) for _ in range(draws)]
                sds.append(statistics.stdev(scores))
            table.append({"task": task, "n": n, "available": min(len(p[task]) for p in per_run),
                          "eval_sd": statistics.fmean(sds), "seed_sd": statistics.stdev(full) if len(full) > 1 else None,
                          "full_scores": full})
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--sizes", nargs="+", type=int, default=[24, 48, 96, 240])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    table = spread(args.runs, args.sizes, args.draws)
    print("| task | n | SD from the evaluation sample | SD over seeds (all samples) | scores per seed |")
    print("|---|---|---|---|---|")
    for row in table:
        seed_sd = "–" if row["seed_sd"] is None else f"{row['seed_sd']:.1f}"
        print(f"| {row['task']} | {row['n']} | {row['eval_sd']:.1f} | {seed_sd} | "
              f"{', '.join(f'{s:.1f}' for s in row['full_scores'])} (n={row['available']}) |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
