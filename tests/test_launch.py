"""`micl train` with a recipe `launch` section starts the processes itself (micl/launch.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, tiny_recipe_overrides
from micl.cli import main
from micl.errors import ConfigError
from micl.launch import already_launched, builtin_configs, resolved_config
from test_distributed import QA, QA_TASK, RECIPE, _env, _free_port


def test_builtin_accelerate_configs_are_the_repository_ones():
    assert builtin_configs() == sorted(p.stem for p in (REPO / "recipes" / "accelerate").glob("*.yaml"))
    assert {"cpu", "ddp", "zero2", "zero3", "zero3_offload", "multinode_zero2"} <= set(builtin_configs())


def test_deepspeed_json_of_a_builtin_config_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, settings, rewritten = resolved_config("zero2", "recipe.yaml")
    assert rewritten and path.name == "zero2.yaml"
    json_file = settings["deepspeed_config"]["deepspeed_config_file"]
    assert json_file.endswith("zero2.json") and json.loads(open(json_file).read())["zero_optimization"]["stage"] == 2


def test_multi_machine_config_is_refused():
    with pytest.raises(ConfigError, match="every machine"):
        resolved_config("multinode_zero2", "recipe.yaml")


def test_unknown_launch_config_is_a_clear_error_before_anything_starts(tiny_models, synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), "launch.config=zero4"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "'launch.config' must be one of cpu, ddp," in captured.err and "got 'zero4'" in captured.err
    assert "launching" not in captured.out and not out.exists()
    rc = main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), "launch.num_processes=2"])
    assert rc == 2 and "'launch.num_processes' needs 'launch.config'" in capsys.readouterr().err


def test_launch_section_starts_two_processes(tiny_models, synth_root, tmp_path):
    """`micl train RECIPE launch.config=cpu launch.num_processes=2`, run from another directory: one command,
    two training processes (world size 2 as the loop recorded it), the exit code of the launch."""
    assert not already_launched()
    out = tmp_path / "run"
    args = [*tiny_recipe_overrides(tiny_models, synth_root, out), QA, "eval.forward_transfer=false", "train.logging_steps=1",
            "launch.config=cpu", "launch.num_processes=2", f"launch.main_process_port={_free_port()}"]
    done = subprocess.run([sys.executable, "-m", "micl", "train", RECIPE, *args], cwd=tmp_path,
                          env=_env(MICL_CACHE_DIR=str(tmp_path / "cache")), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "[micl] launching 2 processes (cpu): " in done.stdout
    metrics = json.loads((out / f"step_0_{QA_TASK}" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 8 samples, 4 per process and batch: one optimizer step per epoch (two with one process)
    assert json.loads((out / "results.json").read_text())["complete"]
    assert [e["step"] for e in metrics["log_history"] if "loss" in e] == [1]

    # a failing run's exit code comes back through the launcher (here a mismatching rerun: code 2 per rank)
    done = subprocess.run([sys.executable, "-m", "micl", "train", RECIPE, *args, "seed=1"], cwd=tmp_path,
                          env=_env(MICL_CACHE_DIR=str(tmp_path / "cache")), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode != 0 and "different settings" in done.stderr


def test_launch_section_is_ignored_under_a_launcher(monkeypatch):
    """`accelerate launch ... -m micl train` (WORLD_SIZE / LOCAL_RANK set) and the processes `launch` starts
    (MICL_LAUNCHED) train themselves: nothing is started twice."""
    from micl.config import load_recipe
    from micl.launch import LAUNCHED_ENV, launch_requested

    config = load_recipe(RECIPE, ["launch.config=ddp"])
    for key in ("WORLD_SIZE", "LOCAL_RANK", LAUNCHED_ENV):
        monkeypatch.delenv(key, raising=False)
    assert launch_requested(config)
    assert not launch_requested(load_recipe(RECIPE))
    for key in ("WORLD_SIZE", "LOCAL_RANK", LAUNCHED_ENV):
        with monkeypatch.context() as env:
            env.setenv(key, "1")
            assert not launch_requested(config)
