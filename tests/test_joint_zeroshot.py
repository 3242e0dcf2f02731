"""The rows that frame a comparison: joint multi-task training (one step over every task, the upper bound) and
zero-shot (the untrained model on every task), on the tests' tiny models; and the step schedule they declare."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, Killed, crashing, tiny_recipe_overrides
from micl.cli import main
from micl.config import load_recipe
from micl.errors import ConfigError
from micl.methods import METHODS, build_methods
from micl.methods.joint import Joint
from micl.run_folder import RunFolder
from micl.training.model_factory import build_model
from micl.training.task_data import TaskData
from micl.training.trainer import MiclTrainer

TASKS = ["synth_image_caption", "synth_audio_qa"]
SETTINGS = [f"order=[{','.join(TASKS)}]", "train.logging_steps=1", "eval.forward_transfer=true"]


def train(recipe, tiny_models, synth_root, out, *extra) -> int:
    return main(["train", str(REPO / "recipes" / f"{recipe}.yaml"), *tiny_recipe_overrides(tiny_models, synth_root, out),
                 *SETTINGS, *extra])


@pytest.fixture(scope="module")
def joint_run(tiny_models, synth_root, tmp_path_factory):
    """An uninterrupted joint run, and the dataset indices of every training batch it took."""
    out = tmp_path_factory.mktemp("joint") / "run"
    batches = []
    original = MiclTrainer.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        batches.append(list(inputs["indices"]))
        return original(self, model, inputs, num_items_in_batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MiclTrainer, "training_step", recording)
        assert train("joint", tiny_models, synth_root, out) == 0
    return out, batches


def test_joint_trains_one_step_on_the_union_of_the_tasks_shuffled_together(joint_run):
    out, batches = joint_run
    results = json.loads((out / "results.json").read_text())
    assert results["phases"] == ["joint"] and results["complete"] and results["learned_at"] == [0, 0]
    assert len(results["matrix"]) == 1 and None not in results["matrix"][0]  # one row: every task after the step
    assert results["forgetting"] is None and results["bwt"] is None and results["fwt"] is None  # do not apply
    for group in results["by_metric"].values():
        assert group["plasticity"] == group["average"] and group["seen"] == group["tasks"] == 1
    record = json.loads((out / "step_0_joint" / "metrics.json").read_text())
    assert record["tasks"] == TASKS and record["task"] == "joint"
    # 8 training samples per task, batch 4, one epoch: 4 optimizer steps over both tasks' samples (2 for one task)
    assert record["optimizer_steps"] == 4 and sorted(i for b in batches for i in b) == list(range(16))
    assert any(min(b) < 8 <= max(b) for b in batches)  # a batch with samples of both tasks: shuffled together
    assert json.loads((out / "run_config.json").read_text())["phases"] == ["joint"]
    assert [p.name for p in RunFolder(out).finished_phases(complete=True)] == ["step_0_joint"]
    assert "| 0: joint |" in (out / "report.md").read_text()


def test_a_step_records_what_it_cost(joint_run):
    out, _ = joint_run
    record = json.loads((out / "step_0_joint" / "metrics.json").read_text())
    phase = out / "step_0_joint"
    assert record["trainable_params"] == sum(t.numel() for name in ("adapter/adapter_model.safetensors",
                                                                   "projectors.safetensors")
                                             for t in load_file(str(phase / name)).values())
    assert record["extra_storage_bytes"] == (phase / "method_state.pt").stat().st_size  # joint keeps nothing else
    assert record["peak_rss_window"] == "step" and record["peak_rss_bytes"] > 100 * 2**20
    assert record["eval_runtime_s"] > 0 and record["train_runtime_s"] > 0
    efficiency = json.loads((out / "results.json").read_text())["efficiency"]
    assert efficiency["wall_time_s"] == pytest.approx(record["train_runtime_s"] + record["eval_runtime_s"])
    assert efficiency["trainable_params"] == record["trainable_params"]


def test_a_killed_joint_run_resumes_to_the_same_results(joint_run, tiny_models, synth_root, tmp_path, monkeypatch):
    reference, _ = joint_run
    out = tmp_path / "killed"
    monkeypatch.setitem(METHODS, "joint", crashing(Joint, "extra_loss", step=0, call=3))  # after checkpoint-2
    with pytest.raises(Killed):
        train("joint", tiny_models, synth_root, out)
    assert not (out / "step_0_joint").exists()
    monkeypatch.setitem(METHODS, "joint", Joint)
    assert train("joint", tiny_models, synth_root, out) == 0
    resumed, expected = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert resumed["steps"][0]["resumed_from"] == "checkpoint-2" and resumed["matrix"] == expected["matrix"]
    for name in ("adapter/adapter_model.safetensors", "projectors.safetensors"):
        got, want = (load_file(str(d / "step_0_joint" / name)) for d in (out, reference))
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want), name


def test_zeroshot_evaluates_the_untrained_model_on_every_task(joint_run, tiny_models, synth_root, tmp_path, capsys):
    out = tmp_path / "zeroshot"
    assert train("zeroshot", tiny_models, synth_root, out) == 0
    assert "[micl] step 1/1 untrained: no training" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["phases"] == ["untrained"] and results["complete"] and len(results["matrix"]) == 1
    record = json.loads((out / "step_0_untrained" / "metrics.json").read_text())
    assert record["optimizer_steps"] == 0 and record["train_loss"] is None and record["trainable_params"] == 0
    assert not (out / ".checkpoints").exists()
    adapter = load_file(str(out / "step_0_untrained" / "adapter" / "adapter_model.safetensors"))
    assert all(not t.any() for k, t in adapter.items() if "lora_B" in k)  # LoRA as initialised: a no-op
    # the phase holds the model exactly as the recipe builds it (seeded projectors), untouched by any training
    config = load_recipe(str(REPO / "recipes" / "zeroshot.yaml"),
                         [*tiny_recipe_overrides(tiny_models, synth_root, out), *SETTINGS])
    built = build_model(config, TaskData(config)).projectors.state_dict()
    saved = load_file(str(out / "step_0_untrained" / "projectors.safetensors"))
    assert saved.keys() == built.keys() and all(torch.equal(saved[k], built[k]) for k in built)
    # the model the forward-transfer evaluation scores before step 0 (the same seed builds the same model)
    initial = json.loads((joint_run[0] / "initial_scores.json").read_text())["scores"]
    assert results["matrix"][0] == initial == json.loads((out / "initial_scores.json").read_text())["scores"]
    predictions = (out / "step_0_untrained" / "predictions.jsonl").read_text().splitlines()
    assert {json.loads(line)["task"] for line in predictions} == set(TASKS)


def test_a_method_that_sets_the_schedule_is_the_recipes_only_method(tmp_path):
    recipe = str(REPO / "recipes" / "joint.yaml")
    with pytest.raises(ConfigError, match="'joint' sets what each step trains on"):
        build_methods(load_recipe(recipe, ["method=[joint,replay]"]), recipe)
    assert [m.schedule for m in build_methods(load_recipe(recipe), recipe)] == ["joint"]
