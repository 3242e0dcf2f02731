"""MoInCL and LwF together (one shared previous-model teacher), over 3 tasks, killed in the middle of step 1
and resumed: the results matrix and the saved weights equal an uninterrupted run's. MoInCL's per-batch draws
(which samples get pseudo targets, which instructions) are seeded by the batch's sample indices, not by a call
counter that would restart at 0 on resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, Killed, crashing, tiny_recipe_overrides
from micl.cli import main
from micl.methods import METHODS
from micl.methods.moincl import MoInCL

SETTINGS = ["order=[synth_image_qa,synth_image_caption,synth_audio_qa]", "method=[moincl,lwf]",
            "method_args.moincl.pseudo_num=2", "method_args.moincl.instruction_k=2", "train.logging_steps=1",
            "eval.forward_transfer=false", "train.batch_size=2"]


def run(tiny_models, synth_root, out) -> int:
    return main(["train", str(REPO / "recipes" / "moincl.yaml"), *tiny_recipe_overrides(tiny_models, synth_root, out),
                 *SETTINGS])


def test_moincl_and_lwf_share_a_teacher_and_a_killed_step_resumes_to_the_same_run(tiny_models, synth_root, tmp_path,
                                                                                  monkeypatch):
    reference = tmp_path / "reference"
    assert run(tiny_models, synth_root, reference) == 0
    expected = json.loads((reference / "results.json").read_text())
    assert expected["complete"] and len(expected["matrix"]) == 3
    out = tmp_path / "killed"
    # killed while fetching the third optimizer step's batch of step 1 (checkpoint-2 is on disk)
    monkeypatch.setitem(METHODS, "moincl", crashing(MoInCL, "augment_batch", step=1, call=3))
    with pytest.raises(Killed):
        run(tiny_models, synth_root, out)
    assert (out / "step_0_synth_image_qa").is_dir() and not (out / "step_1_synth_image_caption").exists()
    monkeypatch.setitem(METHODS, "moincl", MoInCL)
    assert run(tiny_models, synth_root, out) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["steps"][1]["resumed_from"] == "checkpoint-2"
    assert resumed["matrix"] == expected["matrix"]
    for step in (1, 2):
        phase = f"step_{step}_{expected['tasks'][step]}"
        for name in ("adapter/adapter_model.safetensors", "projectors.safetensors"):
            got, want = load_file(str(out / phase / name)), load_file(str(reference / phase / name))
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want), \
                [k for k in want if not torch.equal(got[k], want[k])][:5]


def test_moincl_lwf_and_replay_together_over_three_tasks(tiny_models, synth_root, tmp_path):
    """Two teacher methods and replay in one recipe: one teacher per step (no second 'teacher' adapter), every
    step finished, the shared teacher gone after the run."""
    out = tmp_path / "three"
    args = [*SETTINGS, "method=[moincl,lwf,replay]", "method_args.replay.replay_batch_size=2"]
    assert main(["train", str(REPO / "recipes" / "moincl.yaml"), *tiny_recipe_overrides(tiny_models, synth_root, out),
                 *args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 3
    adapter = json.loads((out / "step_2_synth_audio_qa" / "adapter" / "adapter_config.json").read_text())
    assert "teacher" not in json.dumps(adapter)
    assert all(step["train_loss"] > 0 for step in results["steps"])


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/micl-unsafe-load-marker",))


def test_a_method_state_that_would_run_code_is_refused(tiny_models, synth_root, tmp_path):
    import os

    from micl.errors import MiclError

    out = tmp_path / "run"
    args = ["train", str(REPO / "recipes" / "replay.yaml"), *tiny_recipe_overrides(tiny_models, synth_root, out),
            "order=[synth_image_qa,synth_audio_qa]", "eval.forward_transfer=false"]
    assert main([*args, "order=[synth_image_qa]", f"output_dir={tmp_path / 'first'}"]) == 0
    first = tmp_path / "first" / "step_0_synth_image_qa"
    (out).mkdir()
    import shutil

    shutil.copytree(first, out / first.name)
    config = json.loads((tmp_path / "first" / "run_config.json").read_text())
    config["order"] = ["synth_image_qa", "synth_audio_qa"]
    config["output_dir"] = str(out)
    (out / "run_config.json").write_text(json.dumps(config))
    torch.save([_RunsCode()], out / first.name / "method_state.pt")
    if os.path.exists("/tmp/micl-unsafe-load-marker"):
        os.remove("/tmp/micl-unsafe-load-marker")
    with pytest.raises(MiclError, match="method_state.pt: holds objects other than tensors"):
        from micl.config import load_recipe
        from micl.training.loop import ContinualRun

        ContinualRun(load_recipe(args[1], args[2:])).run()
    assert not os.path.exists("/tmp/micl-unsafe-load-marker")
