"""Continual metrics on hand-computed matrices."""

import math

import pytest

from micl.evaluation import continual as cm

# R[i][j]: score of task j after step i
R = [
    [80.0, None, None],
    [60.0, 70.0, None],
    [50.0, 65.0, 90.0],
]


def test_full_matrix():
    out = cm.continual_metrics(R)
    assert out["num_steps"] == 3 and out["num_tasks"] == 3 and out["complete"]
    assert out["average"] == pytest.approx((50 + 65 + 90) / 3)                        # 68.333
    assert out["average_incremental"] == pytest.approx((80 + (60 + 70) / 2 + (50 + 65 + 90) / 3) / 3)
    assert out["forgetting_per_task"] == [pytest.approx(30.0), pytest.approx(5.0), None]  # max(80,60)-50, 70-65
    assert out["forgetting"] == pytest.approx(17.5)
    assert out["bwt"] == pytest.approx(((50 - 80) + (65 - 70)) / 2)                   # -17.5
    assert out["fwt"] is None  # unseen tasks not evaluated, no baseline


def test_forgetting_uses_the_best_earlier_score():
    M = [[40.0, None, None], [60.0, 50.0, None], [55.0, 45.0, 30.0]]  # task 0 improved at step 1
    assert cm.forgetting_per_task(M) == [pytest.approx(5.0), pytest.approx(5.0), None]
    assert cm.backward_transfer(M) == pytest.approx(((55 - 40) + (45 - 50)) / 2)  # +5: BWT can be positive


def test_fwt():
    initial = [10.0, 20.0, 30.0]       # zero-shot scores of the initial model
    pre_step = [None, 25.0, 40.0]      # task j evaluated just before step j
    assert cm.forward_transfer(R, initial, pre_step) == pytest.approx(((25 - 20) + (40 - 30)) / 2)
    assert cm.forward_transfer_per_task(R, initial, pre_step) == [None, pytest.approx(5.0), pytest.approx(10.0)]
    # the same numbers read from a matrix where unseen tasks were evaluated too
    full = [[80.0, 25.0, 5.0], [60.0, 70.0, 40.0], [50.0, 65.0, 90.0]]
    assert cm.forward_transfer(full, initial) == pytest.approx(7.5)
    assert cm.forward_transfer(full) is None            # no baseline -> undefined
    assert cm.forward_transfer(R, None, pre_step) is None
    assert cm.forward_transfer(R, initial, [None, 25.0]) == pytest.approx(5.0)  # partial information
    # unseen-task entries do not change the other metrics
    assert cm.average(full) == cm.average(R) and cm.forgetting(full) == cm.forgetting(R)
    assert cm.average_incremental(full) == cm.average_incremental(R)


def test_partial_matrix_run_in_progress():
    partial = [[80.0], [60.0, 70.0]]  # 2 of 3 steps done, rows not padded
    out = cm.continual_metrics(partial, num_tasks=3)
    assert out["num_steps"] == 2 and out["num_tasks"] == 3 and not out["complete"]
    assert out["average"] == pytest.approx(65.0)
    assert out["forgetting_per_task"] == [pytest.approx(20.0), None, None]
    assert out["forgetting"] == pytest.approx(20.0) and out["bwt"] == pytest.approx(-20.0)
    # a trailing row whose evaluation has not run yet is ignored
    assert cm.continual_metrics(R[:2] + [[None, None, None]])["average"] == pytest.approx(65.0)
    # one step: nothing to forget yet
    one = cm.continual_metrics([[80.0, None, None]])
    assert one["average"] == 80.0 and one["average_incremental"] == 80.0
    assert one["forgetting"] is None and one["bwt"] is None and one["fwt"] is None
    empty = cm.continual_metrics([])
    assert empty["average"] is None and empty["num_steps"] == 0 and not empty["complete"]


def test_missing_and_bad_values():
    holes = [[80.0, None], [math.nan, 70.0]]  # task 0 not evaluated at step 1 (NaN = missing)
    assert cm.average(holes) == 70.0
    assert cm.forgetting(holes) is None and cm.backward_transfer(holes) is None
    with pytest.raises(ValueError, match=r"matrix\[0\]\[1\]"):
        cm.normalize_matrix([[1.0, "x"]])
    with pytest.raises(ValueError):
        cm.normalize_matrix("not a matrix")


def test_grouped_metrics():
    g = cm.grouped_metrics(R, ["cider", "vqa_accuracy", "cider"])
    assert g["cider"]["average"] == pytest.approx((50 + 90) / 2) and g["cider"]["forgetting"] == pytest.approx(30.0)
    assert g["vqa_accuracy"]["average"] == 65.0 and g["vqa_accuracy"]["bwt"] == pytest.approx(-5.0)


def test_plasticity_is_the_mean_score_right_after_learning():
    assert cm.plasticity(R) == pytest.approx((80 + 70 + 90) / 3)  # R[j][j]
    assert cm.plasticity_per_task(R) == [80.0, 70.0, 90.0]
    assert cm.continual_metrics(R)["plasticity"] == pytest.approx(80.0)
    assert cm.plasticity([[80.0], [60.0, 70.0]]) == pytest.approx(75.0)  # in progress: the tasks seen
    assert cm.final_scores(R) == [50.0, 65.0, 90.0] and cm.final_scores([[80.0, None]]) == [80.0, None]


def test_a_step_that_learns_several_tasks():
    joint = [[70.0, 60.0, 50.0]]  # every task learned at step 0 (joint training): one row
    out = cm.continual_metrics(joint, initial_scores=[1.0, 2.0, 3.0], pre_step_scores=[1.0, 2.0, 3.0],
                               learned_at=[0, 0, 0])
    assert out["complete"] and out["average"] == pytest.approx(60.0) and out["plasticity"] == pytest.approx(60.0)
    assert out["forgetting"] is None and out["bwt"] is None and out["fwt"] is None  # nothing learned after anything
    assert not cm.continual_metrics(joint)["complete"]  # read as one task per step it would be step 0 of 3
    # tasks 0 and 1 at step 0, task 2 at step 1
    two = [[80.0, 60.0, 10.0], [70.0, 40.0, 90.0]]
    L = [0, 0, 1]
    assert cm.average(two, L) == pytest.approx((70 + 40 + 90) / 3)
    assert cm.forgetting_per_task(two, L) == [pytest.approx(10.0), pytest.approx(20.0), None]
    assert cm.backward_transfer(two, L) == pytest.approx(-15.0)
    assert cm.plasticity_per_task(two, L) == [80.0, 60.0, 90.0]
    assert cm.forward_transfer(two, initial_scores=[0.0, 0.0, 4.0], learned_at=L) == pytest.approx(6.0)  # R[0][2]
    assert cm.average_incremental(two, L) == pytest.approx((70 + (70 + 40 + 90) / 3) / 2)
    with pytest.raises(ValueError, match=r"learned_at\[1\]"):
        cm.learned_steps([0, -1], 2)


def test_grouped_metrics_per_task_metric():
    g = cm.grouped_metrics(R, ["cider", "exact_match", "cider"], initial_scores=[0.0, 10.0, 20.0],
                           pre_step_scores=[None, 25.0, 40.0])
    assert g["cider"]["plasticity"] == pytest.approx((80 + 90) / 2) and g["exact_match"]["plasticity"] == 70.0
    assert g["cider"]["fwt"] == pytest.approx(20.0) and g["exact_match"]["fwt"] == pytest.approx(15.0)
    assert g["cider"]["bwt"] == pytest.approx(-30.0) and g["cider"]["seen"] == 2
    joint = cm.grouped_metrics([[70.0, 60.0]], ["cider", "exact_match"], learned_at=[0, 0])
    assert joint["cider"] == {"tasks": 1, "seen": 1, "average": 70.0, "forgetting": None, "bwt": None, "fwt": None,
                              "plasticity": 70.0, "average_incremental": 70.0}
