"""End-to-end runs of `micl train` with tiny models built from configs (seconds, no network)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_recipe_overrides
from micl.cli import main
from micl.methods import METHODS, ContinualMethod

RECIPE = str(REPO / "recipes" / "finetune.yaml")
TWO_TASKS = "order=[synth_image_caption,synth_audio_qa]"


def run_cli(tiny_models, synth_root, out, *extra):
    return main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), *extra])


def test_two_task_order_writes_matrix_metrics_phases_and_report(tiny_models, synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(tiny_models, synth_root, out, TWO_TASKS) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["synth_image_caption", "synth_audio_qa"]
    matrix = results["matrix"]
    assert matrix[0][1] is None and None not in matrix[1]
    assert results["average"] == pytest.approx(sum(matrix[1]) / 2)
    assert results["forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])
    assert results["bwt"] == pytest.approx(matrix[1][0] - matrix[0][0])
    assert results["fwt"] == pytest.approx(results["pre_step_scores"][1] - results["initial_scores"][1])
    assert results["complete"] is True
    step1 = results["steps"][1]
    assert set(step1["metrics"]) == {"synth_image_caption", "synth_audio_qa"}
    assert {"cider", "bleu_4", "rouge_l"} <= set(step1["metrics"]["synth_image_caption"])
    assert "exact_match" in step1["metrics"]["synth_audio_qa"]
    for name in ("step_0_synth_image_caption", "step_1_synth_audio_qa"):
        phase = out / name
        assert (phase / "adapter" / "adapter_config.json").is_file()
        assert (phase / "projectors.safetensors").is_file() and (phase / "metrics.json").is_file()
    assert not (out / ".checkpoints" / "step_0").exists()  # within-step checkpoints are cleaned up
    assert (out / "report.md").is_file() and (out / "matrix.png").is_file() and (out / "forgetting.png").is_file()
    printed = capsys.readouterr().out
    assert "[micl] step 1/2 synth_image_caption" in printed and "[micl] step 2/2 synth_audio_qa" in printed

    # re-running a finished run changes nothing
    before = (out / "step_0_synth_image_caption" / "projectors.safetensors").read_bytes()
    assert run_cli(tiny_models, synth_root, out, TWO_TASKS) == 0
    assert (out / "step_0_synth_image_caption" / "projectors.safetensors").read_bytes() == before
    assert "already finished" in capsys.readouterr().out


class Recorder(ContinualMethod):
    name = "recorder"
    calls: list = []

    def on_task_start(self, ctx):
        self.calls.append(("on_task_start", ctx.step))

    def augment_batch(self, batch, ctx):
        if not self.calls or self.calls[-1] != ("batch", ctx.step):
            self.calls.append(("batch", ctx.step))
        return batch

    def extra_loss(self, model, batch, outputs, ctx):
        assert outputs.loss.requires_grad
        return None

    def on_epoch_end(self, ctx):
        self.calls.append(("on_epoch_end", ctx.step, ctx.epoch))

    def on_task_end(self, ctx):
        self.calls.append(("on_task_end", ctx.step))


def test_hooks_are_called_in_order(tiny_models, synth_root, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "recorder", Recorder)
    Recorder.calls = []
    assert run_cli(tiny_models, synth_root, tmp_path / "run", TWO_TASKS, "method=[finetune,recorder]",
                   "train.epochs=2", "eval.forward_transfer=false") == 0
    assert Recorder.calls == [
        ("on_task_start", 0), ("batch", 0), ("on_epoch_end", 0, 0), ("batch", 0), ("on_epoch_end", 0, 1),
        ("on_task_end", 0),
        ("on_task_start", 1), ("batch", 1), ("on_epoch_end", 1, 0), ("batch", 1), ("on_epoch_end", 1, 1),
        ("on_task_end", 1),
    ]


def test_corrupt_media_is_a_one_line_error_and_keeps_finished_steps(tiny_models, synth_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    out = tmp_path / "run"
    overrides = [TWO_TASKS, f"data.root={data}", "eval.forward_transfer=false"]
    # break every audio file of the second task: the run must stop at step 2 with a clear error
    for wav in (data / "media" / "synth_audio_qa").rglob("*.wav"):
        wav.write_bytes(b"not a wav file")
    assert run_cli(tiny_models, synth_root, out, *overrides) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("micl: error")]
    assert len(errors) == 1 and ".wav" in errors[0]
    finished = out / "step_0_synth_image_caption" / "metrics.json"
    assert finished.is_file()
    snapshot = finished.read_bytes()
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and len(results["matrix"]) == 1
    # a rerun with different settings refuses to touch the finished run
    assert run_cli(tiny_models, synth_root, out, *overrides, "seed=7") == 2
    assert "different settings" in capsys.readouterr().err
    assert finished.read_bytes() == snapshot


def test_recipe_typo_exits_2_naming_the_key(tiny_models, synth_root, tmp_path, capsys):
    assert run_cli(tiny_models, synth_root, tmp_path / "run", "train.epoch=2") == 2
    assert "train.epoch" in capsys.readouterr().err
    assert run_cli(tiny_models, synth_root, tmp_path / "run", "order=[synth_image_caption,synth_smell_qa]") == 2
    assert "synth_smell_qa" in capsys.readouterr().err


def _complete_checkpoint(folder: Path) -> bool:
    return any((c / "trainer_state.json").is_file() for c in folder.glob("checkpoint-*"))


def test_killed_run_resumes_to_the_same_results(tiny_models, synth_root, tmp_path):
    extra = [TWO_TASKS, "train.epochs=3", "eval.forward_transfer=false", "lora.dropout=0.1", "train.logging_steps=1"]
    reference = tmp_path / "reference"
    assert run_cli(tiny_models, synth_root, reference, *extra) == 0

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "micl", "train", RECIPE,
               *tiny_recipe_overrides(tiny_models, synth_root, out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / ".checkpoints" / "step_1"
    deadline = time.time() + 300
    while not _complete_checkpoint(checkpoints) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "step_0_synth_image_caption" / "metrics.json").is_file()
    assert not (out / "step_1_synth_audio_qa").exists(), "the run finished before it could be killed"

    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    resumed = json.loads((out / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert resumed["steps"][1]["resumed_from"] is not None  # step 2 continued from a mid-step checkpoint
    assert resumed["matrix"] == expected["matrix"]
    assert resumed["steps"][1]["train_loss"] == pytest.approx(expected["steps"][1]["train_loss"], rel=1e-5)
    resumed_weights = load_file(str(out / "step_1_synth_audio_qa" / "projectors.safetensors"))
    expected_weights = load_file(str(reference / "step_1_synth_audio_qa" / "projectors.safetensors"))
    assert all(torch.allclose(resumed_weights[k], expected_weights[k], atol=1e-6) for k in expected_weights)
    same = (out / "step_1_synth_audio_qa" / "predictions.jsonl").read_text()
    assert same == (reference / "step_1_synth_audio_qa" / "predictions.jsonl").read_text()
