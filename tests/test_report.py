"""Run report: report.md + matrix.png + forgetting.png from results.json; atomic writes."""

import json
import os
import stat

import pytest

from micl.errors import MiclError
from micl.evaluation.report import write_report
from micl.utils.io import atomic_write_json, atomic_write_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["synth_image_caption", "synth_audio_qa", "synth_video_qa"]


def _results(matrix, steps=None):
    return {
        "tasks": TASKS,
        "matrix": matrix,
        "average": None,
        "forgetting": None,
        "bwt": None,
        "fwt": None,
        "steps": steps or [],
        "config": {"method": "finetune", "train": {"lr": 3e-4}},
    }


def _steps(matrix):
    names = ["cider", "vqa_accuracy", "exact_match"]
    return [
        {"step": i, "task": TASKS[i],
         "metrics": {TASKS[j]: {"metric": names[j], "score": v, names[j]: v, "num_samples": 24}
                     for j, v in enumerate(row) if v is not None}}
        for i, row in enumerate(matrix)
    ]


def _check_outputs(run):
    for name in ("matrix.png", "forgetting.png"):
        data = (run / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]  # no temp file left behind
    return (run / "report.md").read_text(encoding="utf-8")


def test_write_report_complete_run(tmp_path):
    matrix = [[80.0, None, None], [60.0, 70.0, None], [50.0, 65.0, 90.0]]
    atomic_write_json(tmp_path / "results.json", _results(matrix, _steps(matrix)))
    path = write_report(tmp_path)
    assert path == tmp_path / "report.md"
    md = _check_outputs(tmp_path)
    assert "| after step | synth_image_caption | synth_audio_qa | synth_video_qa |" in md
    assert "| 2: synth_video_qa | 50.00 | 65.00 | 90.00 |" in md
    # one column per task metric, never a mean over CIDEr and accuracies together (68.33 here)
    assert "| metric | CIDEr (1/1 tasks) | VQA accuracy (1/1 tasks) | exact match (1/1 tasks) | definition |" in md
    assert "| average | 50.00 | 65.00 | 90.00 |" in md and "68.33" not in md
    assert "| forgetting | 30.00 | 5.00 | – |" in md and "| bwt | -30.00 | -5.00 | – |" in md
    assert "| plasticity | 80.00 | 70.00 | 90.00 |" in md and "| fwt | – | – | – |" in md
    assert "### Step 2: `synth_video_qa`" in md and "| synth_audio_qa | vqa_accuracy | 65.00 |" in md
    assert "![Results matrix](matrix.png)" in md and "![Forgetting per task](forgetting.png)" in md
    assert '"method": "finetune"' in md and "Status: complete." in md


def test_recorded_values_win_and_fwt_from_scores(tmp_path):
    matrix = [[80.0, None, None], [60.0, 70.0, None], [50.0, 65.0, 90.0]]
    res = _results(matrix)
    res["average"] = 12.34  # what the run recorded is shown as is
    res["initial_scores"] = [10.0, 20.0, 30.0]
    res["pre_step_scores"] = [None, 25.0, 40.0]
    atomic_write_json(tmp_path / "results.json", res)
    md = (write_report(tmp_path)).read_text()
    assert "| average | 12.34 |" in md and "| fwt | 7.50 |" in md
    assert "| initial model | 10.00 | 20.00 | 30.00 |" in md


def test_write_report_partial_run(tmp_path):
    matrix = [[80.0], [60.0, 70.0]]  # run in progress: 2 of 3 steps
    atomic_write_json(tmp_path / "results.json", _results(matrix, _steps(matrix)))
    md = _check_outputs(tmp_path) if write_report(tmp_path) else None
    assert "in progress: 2 of 3 steps" in md
    assert "| 1: synth_audio_qa | 60.00 | 70.00 | – |" in md
    assert "| forgetting | 20.00 |" in md
    write_report(tmp_path)  # rewriting over existing files works


def test_write_report_first_step_only(tmp_path):
    atomic_write_json(tmp_path / "results.json", _results([[42.0, None, None]]))
    md = _check_outputs(tmp_path) if write_report(tmp_path) else None
    assert "| forgetting | – |" in md and "(none recorded yet)" in md


def test_missing_results_json(tmp_path):
    with pytest.raises(MiclError, match="results.json") as e:
        write_report(tmp_path / "nope")
    assert str(tmp_path / "nope" / "results.json") in str(e.value)


def test_invalid_results_json(tmp_path):
    atomic_write_text(tmp_path / "results.json", "{not json")
    with pytest.raises(MiclError, match="results.json"):
        write_report(tmp_path)
    atomic_write_json(tmp_path / "results.json", {"tasks": TASKS, "matrix": [[1.0, "x"]]})
    with pytest.raises(MiclError, match=r"matrix\[0\]\[1\]"):
        write_report(tmp_path)


def test_atomic_writes(tmp_path):
    p = atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1.5, "name": "café", "path": tmp_path})
    assert json.loads(p.read_text(encoding="utf-8")) == {"x": 1.5, "name": "café", "path": str(tmp_path)}
    assert stat.S_IMODE(p.stat().st_mode) != 0o600  # not mkstemp's private mode
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert os.listdir(p.parent) == ["a.json"]
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert p.read_text() == "new" and os.listdir(p.parent) == ["a.json"]  # old content kept, no temp
