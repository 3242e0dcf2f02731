"""Continual-learning metrics from a results matrix (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).

``R[i][j]`` is the score of task ``j`` after training step ``i``; ``None`` where task ``j`` was not
evaluated (not learned yet). Task ``j`` is learned at step ``s_j`` (``learned_at[j]``; by default
``s_j = j``, one task per step; a joint multi-task run learns every task at step 0). With ``T`` rows
(steps done so far; a run still in progress has fewer rows than steps), the tasks *seen* are those
with ``s_j <= T-1``:

* average             = mean_{seen j} R[T-1][j]                          (last row)
* average_incremental = mean_{i<T} ( mean_{j: s_j<=i} R[i][j] )          (average after every step)
* forgetting_j        = max_{s_j<=l<T-1} R[l][j] - R[T-1][j]    for s_j < T-1; forgetting = mean_j
* bwt                 = mean_{j: s_j<T-1} ( R[T-1][j] - R[s_j][j] )
* plasticity (MFT)    = mean_{seen j} R[s_j][j]           (score right after learning; "mean finetuned")
* fwt                 = mean_{j: 0<s_j<T} ( a_j - b_j ), a_j = score of task j just before its step
                        (``pre_step_scores[j]``, else ``R[s_j-1][j]``) and b_j = score of the initial
                        model on task j (``initial_scores[j]``). ``None`` unless both are known for
                        at least one j: unseen tasks are normally not evaluated.

``None`` entries are skipped in every mean; a metric with nothing to average is ``None`` (so a run of
one step, e.g. joint training, has no forgetting, BWT or FWT). Scores keep the matrix's scale (0-100
in micl), so forgetting/BWT/FWT are in points.

The MCIL metrics of arXiv 2506.09999 (its reference code's ``main.py``; mapping: docs/adaptive_fusion.md),
with F_t, BWT_t, FWT_t the metrics above on the rows up to step t (0 at t = 0, as the reference's
``continuum`` Logger returns for one task), sim_t in [0, 1] the similarity of task t to task t-1
(sim_0 = 1) and NMI_m the normalised mutual information of the fused and the m-th unimodal representation:

* m1 = average_incremental / 2 + mean_t[ (1 - sim_t) * (100 - F_t) ] / 2
* m2 = ( average_incremental / 100 / 2 + mean_t( BWT_t + FWT_t ) / 100 / 2 ) / 2 + mean_m( NMI_m ) / 2
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

__all__ = [
    "average",
    "average_incremental",
    "backward_transfer",
    "backward_transfer_per_task",
    "continual_metrics",
    "final_scores",
    "forgetting",
    "forgetting_per_task",
    "forward_transfer",
    "forward_transfer_per_task",
    "grouped_metrics",
    "learned_steps",
    "mcil_metrics",
    "normalize_matrix",
    "plasticity",
    "plasticity_per_task",
]

Cell = float | None


def _cell(v, where: str) -> Cell:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, Real):
        raise ValueError(f"{where}: expected a number or None, got {v!r}")
    v = float(v)
    return None if math.isnan(v) else v


def normalize_matrix(matrix: Sequence[Sequence[Cell]], num_tasks: int | None = None) -> list[list[Cell]]:
    """Square-up a results matrix: rows padded with None to the widest row (or ``num_tasks``),
    NaN -> None, trailing all-None rows (a step whose evaluation has not run yet) dropped."""
    if matrix is None or isinstance(matrix, (str, bytes)):
        raise ValueError("results matrix must be a list of rows")
    rows = []
    for i, row in enumerate(matrix):
        if row is None or isinstance(row, (str, bytes)):
            raise ValueError(f"results matrix row {i} must be a list")
        rows.append([_cell(v, f"matrix[{i}][{j}]") for j, v in enumerate(row)])
    while rows and all(v is None for v in rows[-1]):
        rows.pop()
    width = max(max((len(r) for r in rows), default=0), num_tasks or 0)
    return [r + [None] * (width - len(r)) for r in rows]


def learned_steps(learned_at: Sequence[int] | None, width: int) -> list[int]:
    """The step that learns each of ``width`` tasks: ``learned_at[j]``, else ``j`` (one task per step)."""
    given = list(learned_at or ())
    for j, s in enumerate(given):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"learned_at[{j}]: expected a step index >= 0, got {s!r}")
    return given[:width] + list(range(len(given), width))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _opt(scores: Sequence[Cell] | None, j: int, name: str) -> Cell:
    if scores is None or j >= len(scores):
        return None
    return _cell(scores[j], f"{name}[{j}]")


def _setup(matrix, learned_at, num_tasks: int | None = None):
    R = normalize_matrix(matrix, num_tasks)
    width = len(R[0]) if R else num_tasks or 0
    return R, len(R), learned_steps(learned_at, width)


def final_scores(matrix: Sequence[Sequence[Cell]], learned_at: Sequence[int] | None = None) -> list[Cell]:
    """The last row, ``None`` for the tasks not seen yet."""
    R, T, L = _setup(matrix, learned_at)
    return [R[T - 1][j] if L[j] <= T - 1 else None for j in range(len(L))] if T else []


def average(matrix: Sequence[Sequence[Cell]], learned_at: Sequence[int] | None = None) -> float | None:
    """Mean of the last row over the tasks seen so far."""
    return _mean(final_scores(matrix, learned_at))


def average_incremental(matrix: Sequence[Sequence[Cell]], learned_at: Sequence[int] | None = None) -> float | None:
    """Mean over steps of each row's mean over the tasks seen at that step."""
    R, T, L = _setup(matrix, learned_at)
    return _mean(_mean(R[i][j] for j in range(len(L)) if L[j] <= i) for i in range(T))


def forgetting_per_task(matrix: Sequence[Sequence[Cell]], learned_at: Sequence[int] | None = None) -> list[float | None]:
    """``max_{s_j<=l<T-1} R[l][j] - R[T-1][j]`` for each task learned before the last step; ``None`` elsewhere."""
    R, T, L = _setup(matrix, learned_at)
    out: list[float | None] = [None] * len(L)
    for j, s in enumerate(L):
        if s >= T - 1:
            continue
        last = R[T - 1][j]
        past = [R[l][j] for l in range(s, T - 1) if R[l][j] is not None]
        if last is not None and past:
            out[j] = max(past) - last
    return out


def forgetting(matrix: Sequence[Sequence[Cell]], learned_at: Sequence[int] | None = None) -> float | None:
    """Mean forgetting over the tasks learned before the last step."""
    return _mean(forgetting_per_task(matrix, learned_at))


def backward_transfer_per_task(matrix: Sequence[Sequence[Cell]],
                               learned_at: Sequence[int] | None = None) -> list[float | None]:
    """``R[T-1][j] - R[s_j][j]`` for each task learned before the last step; ``None`` elsewhere."""
    R, T, L = _setup(matrix, learned_at)
    out: list[float | None] = [None] * len(L)
    for j, s in enumerate(L):
        if s < T - 1 and R[T - 1][j] is not None and R[s][j] is not None:
            out[j] = R[T - 1][j] - R[s][j]
    return out


def backward_transfer(matrix: Sequence[Sequence[Cell]], learned_at: Sequence[int] | None = None) -> float | None:
    """BWT: mean over the tasks learned before the last step of ``R[T-1][j] - R[s_j][j]`` (negative = forgetting)."""
    return _mean(backward_transfer_per_task(matrix, learned_at))


def plasticity_per_task(matrix: Sequence[Sequence[Cell]], learned_at: Sequence[int] | None = None) -> list[Cell]:
    """``R[s_j][j]``, the score of each seen task right after the step that learned it."""
    R, T, L = _setup(matrix, learned_at)
    return [R[s][j] if s <= T - 1 else None for j, s in enumerate(L)]


def plasticity(matrix: Sequence[Sequence[Cell]], learned_at: Sequence[int] | None = None) -> float | None:
    """MFT: mean over the seen tasks of the score right after learning them (how well a method still learns
    new tasks, apart from how much it forgets them later)."""
    return _mean(plasticity_per_task(matrix, learned_at))


def forward_transfer_per_task(
    matrix: Sequence[Sequence[Cell]],
    initial_scores: Sequence[Cell] | None = None,
    pre_step_scores: Sequence[Cell] | None = None,
    learned_at: Sequence[int] | None = None,
) -> list[float | None]:
    """``a_j - b_j`` for each seen task learned after step 0 (see module docstring); ``None`` elsewhere."""
    R = normalize_matrix(matrix)
    T = len(R)
    width = max(len(R[0]) if R else 0, len(initial_scores or ()), len(pre_step_scores or ()))
    L = learned_steps(learned_at, width)
    out: list[float | None] = [None] * width
    for j, s in enumerate(L):
        if not 0 < s <= T - 1:
            continue
        a = _opt(pre_step_scores, j, "pre_step_scores")
        if a is None and j < len(R[s - 1]):
            a = R[s - 1][j]
        b = _opt(initial_scores, j, "initial_scores")
        if a is not None and b is not None:
            out[j] = a - b
    return out


def forward_transfer(
    matrix: Sequence[Sequence[Cell]],
    initial_scores: Sequence[Cell] | None = None,
    pre_step_scores: Sequence[Cell] | None = None,
    learned_at: Sequence[int] | None = None,
) -> float | None:
    """FWT (Lopez-Paz & Ranzato 2017, with the initial model as baseline, as Avalanche does)."""
    return _mean(forward_transfer_per_task(matrix, initial_scores, pre_step_scores, learned_at))


def continual_metrics(
    matrix: Sequence[Sequence[Cell]],
    initial_scores: Sequence[Cell] | None = None,
    pre_step_scores: Sequence[Cell] | None = None,
    num_tasks: int | None = None,
    learned_at: Sequence[int] | None = None,
) -> dict:
    """Every metric above in one dict, plus ``num_steps``, ``num_tasks`` and ``complete`` (all
    tasks learned and evaluated). ``num_tasks``: length of the task order, when the matrix rows
    are not padded to it."""
    R, T, L = _setup(matrix, learned_at, num_tasks)
    final = final_scores(R, L)
    return {
        "num_steps": T,
        "num_tasks": len(L),
        "complete": T > 0 and all(s <= T - 1 and R[T - 1][j] is not None for j, s in enumerate(L)),
        "average": _mean(final),
        "average_incremental": average_incremental(R, L),
        "forgetting": forgetting(R, L),
        "forgetting_per_task": forgetting_per_task(R, L),
        "bwt": backward_transfer(R, L),
        "fwt": forward_transfer(R, initial_scores, pre_step_scores, L),
        "fwt_per_task": forward_transfer_per_task(R, initial_scores, pre_step_scores, L),
        "plasticity": plasticity(R, L),
        "final_scores": final,
    }


def grouped_metrics(matrix: Sequence[Sequence[Cell]], groups: Sequence[str | None],
                    initial_scores: Sequence[Cell] | None = None, pre_step_scores: Sequence[Cell] | None = None,
                    learned_at: Sequence[int] | None = None) -> dict[str, dict]:
    """Average (and incremental), forgetting, BWT, FWT and plasticity restricted to the tasks of each group (``groups[j]`` is task
    j's group, e.g. its metric name: a mean over CIDEr and accuracies together means nothing).

    The per-task terms are the same as above; only the means are taken per group."""
    R, T, L = _setup(matrix, learned_at, len(groups))
    per_task = {
        "average": final_scores(R, L),
        "forgetting": forgetting_per_task(R, L),
        "bwt": backward_transfer_per_task(R, L),
        "fwt": forward_transfer_per_task(R, initial_scores, pre_step_scores, L),
        "plasticity": plasticity_per_task(R, L),
    }
    out: dict[str, dict] = {}
    for g in dict.fromkeys(x for x in groups if x is not None):
        cols = [j for j, x in enumerate(groups) if x == g]
        out[g] = {"tasks": len(cols), "seen": sum(1 for j in cols if L[j] <= T - 1),
                  **{name: _mean(values[j] for j in cols if j < len(values)) for name, values in per_task.items()},
                  "average_incremental": _mean(_mean(R[i][j] for j in cols if L[j] <= i) for i in range(T))}
    return out


def _per_step(metric, R, *args) -> list[float]:
    """metric on the rows up to each step t; 0 where it has nothing to average (the first step)."""
    values = [metric(R[: t + 1], *args) for t in range(len(R))]
    return [0.0 if v is None else v for v in values]


def mcil_metrics(
    matrix: Sequence[Sequence[Cell]],
    task_similarity: Sequence[float],
    nmi: Sequence[float] | None = None,
    initial_scores: Sequence[Cell] | None = None,
    pre_step_scores: Sequence[Cell] | None = None,
) -> dict:
    """``m1`` and ``m2`` (module docstring) with their per-step terms. ``task_similarity[t]`` = sim_t for every
    step; ``nmi`` = the NMI of each unimodal representation (None: no audio-visual task, m2 None). m2 is also
    None without forward transfer (``initial_scores``) for the steps after the first."""
    R = normalize_matrix(matrix)
    T = len(R)
    if T == 0 or len(task_similarity) < T:
        raise ValueError(f"mcil_metrics: one task similarity per step needed ({T} steps, "
                         f"{len(task_similarity)} similarities)")
    sim = [float(s) for s in task_similarity[:T]]
    acc = average_incremental(R)
    f = _per_step(forgetting, R)
    bwt = _per_step(backward_transfer, R)
    fwt = [forward_transfer(R[: t + 1], initial_scores, pre_step_scores) for t in range(T)]
    fwt[0] = 0.0 if fwt[0] is None else fwt[0]
    m1 = None if acc is None else acc / 2 + _mean((1 - s) * (100 - ft) for s, ft in zip(sim, f)) / 2
    m2 = None
    if acc is not None and nmi and all(v is not None for v in fwt):
        transfer = _mean(b + w for b, w in zip(bwt, fwt))
        m2 = (acc / 100 / 2 + transfer / 100 / 2) / 2 + _mean(float(v) for v in nmi) / 2
    return {"m1": m1, "m2": m2, "task_similarity": sim, "forgetting_per_step": f, "bwt_per_step": bwt,
            "fwt_per_step": fwt, "nmi": None if nmi is None else [float(v) for v in nmi]}
