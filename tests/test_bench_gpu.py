"""scripts/bench_gpu.py (the paper-scale GPU check) at tiny shapes on the CPU, so that it cannot rot.

The script runs as it will on the GPU machine: from the checkout without an install, and without
deepspeed, datasets, evaluate or pycocoevalcap (imports of them fail here)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_gpu.py"
ABSENT = ("deepspeed", "datasets", "evaluate", "pycocoevalcap")
# None in sys.modules: `import x` raises ImportError and importlib.util.find_spec(x) says "not installed"
LAUNCH = ("import runpy, sys\n"
          f"for name in {ABSENT!r}:\n    sys.modules[name] = None\n"
          f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\n"
          f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", LAUNCH, "--tiny", "--threads", "1", "--out", str(out), *extra]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds its checkout itself
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def run_script(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(command(out, *extra), cwd=tmp_path, env=environment(), capture_output=True, text=True,
                          timeout=300)
    return proc, json.loads(out.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_tiny_check_measures_every_stage(tmp_path):
    proc, data = run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = data["stages"]
    assert list(stages) == ["matmul", "train", "step_vs_peft", "methods", "clip", "generation"]
    assert {name: entry["status"] for name, entry in stages.items()} == dict.fromkeys(stages, "ok")
    meta = data["meta"]
    assert meta["scale"] == "tiny" and meta["device"] == "cpu"
    assert all(meta[k] for k in ("date", "torch", "transformers", "peft", "accelerate"))
    assert Path(meta["micl"]) == REPO / "micl"  # this checkout's micl, without PYTHONPATH or an install

    result = {name: entry["result"] for name, entry in stages.items()}
    assert positive(result["matmul"]["tflops"])
    for batch in (2, 4):
        row = result["train"][f"batch_{batch}"]
        assert row["batch"][0] == batch and row["steps"] == 2
        assert positive(row["tokens_per_s"]) and 0 < row["mfu_4n"] < 1
    assert positive(result["train"]["llm_matmul_weights"])
    assert positive(result["step_vs_peft"]["ratio"])
    methods = result["methods"]
    assert methods["rows"] == {"main": 2, "pseudo": 2, "instructions": 4}
    assert positive(methods["step_ratio"])
    assert result["clip"]["features"] == [4, 16, 32] and positive(result["clip"]["images_per_s"])
    generation = result["generation"]
    for batch in (2, 4):
        row = generation[f"beam_batch_{batch}"]
        assert row["num_beams"] == 2 and row["max_new_tokens"] == 4 and positive(row["samples_per_s"])
        assert 0 < row["mean_new_tokens"] <= 4
    assert generation["greedy"]["one_by_one_done"] == 4 and positive(generation["greedy"]["speedup"])

    # the targets are reported beside the values, and not judged at tiny shapes
    targets = {row["measure"]: row for row in data["targets"]}
    assert len(targets) == 4 and all(row["met"] is None for row in targets.values())
    assert targets["micl step / PEFT LoRA step"]["value"] == result["step_vs_peft"]["ratio"]
    assert "| micl step / PEFT LoRA step |" in proc.stdout and "<= 1.08" in proc.stdout


def test_no_time_left_skips_every_stage_and_says_so(tmp_path):
    proc, data = run_script(tmp_path, "--deadline", "0", "--stages", "matmul,train,generation")
    assert proc.returncode == 1  # not every stage ran
    stages = data["stages"]
    assert list(stages) == ["matmul", "train", "generation"]
    assert all(entry["status"] == "skipped" and "deadline" in entry["reason"] for entry in stages.values())
    assert "| stage generation | skipped |" in proc.stdout


def test_the_deadline_skips_the_stages_after_the_one_that_used_it_up(tmp_path):
    import torch

    bench_gpu = load_script()
    bench = bench_gpu.Bench(bench_gpu.TINY, torch.device("cpu"), tmp_path / "out.json",
                            deadline=600, stage_timeout=600)

    def uses_the_time(result):  # as a long stage would, without waiting for one (machine speed plays no part)
        result["done"] = True
        bench.started -= bench.remaining() - 1  # 1 s left

    bench.run("first", lambda result: result.update(value=1.0))
    bench.run("long", uses_the_time)
    bench.run("after", lambda result: result.update(value=2.0))
    stages = json.loads((tmp_path / "out.json").read_text())["stages"]
    assert stages["first"]["status"] == "ok" and stages["long"]["status"] == "ok"
    assert stages["after"]["status"] == "skipped" and "deadline" in stages["after"]["reason"]
    assert stages["after"]["result"] == {}


def test_a_killed_check_keeps_the_stages_finished(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(command(out), cwd=tmp_path, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_file() and json.loads(out.read_text())["stages"].get("train", {}).get("status") == "ok":
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the check ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    stages = json.loads(out.read_text())["stages"]
    assert stages["matmul"]["status"] == "ok" and stages["train"]["status"] == "ok"
    assert positive(stages["train"]["result"]["batch_4"]["tokens_per_s"])
    assert "generation" not in stages or stages["generation"]["status"] == "running"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_gpu", module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_a_stage_past_its_time_limit_keeps_its_parts_and_a_failure_does_not_stop_the_next(tmp_path):
    import torch

    bench_gpu = load_script()
    bench = bench_gpu.Bench(bench_gpu.TINY, torch.device("cpu"), tmp_path / "out.json", deadline=60,
                            stage_timeout=0.5)

    def slow(result):
        result["first_part"] = 1.0
        time.sleep(30)

    def broken(result):
        raise RuntimeError("CUDA out of memory (as a stage may fail)")

    start = time.monotonic()
    bench.run("slow", slow)
    bench.run("broken", broken)
    bench.run("fine", lambda result: result.update(value=2.0))
    assert time.monotonic() - start < 10
    stages = json.loads((tmp_path / "out.json").read_text())["stages"]
    assert stages["slow"]["status"] == "timed_out" and stages["slow"]["result"] == {"first_part": 1.0}
    assert stages["broken"]["status"] == "failed" and "out of memory" in stages["broken"]["error"]
    assert stages["fine"] == {**stages["fine"], "status": "ok", "result": {"value": 2.0}}
    with pytest.raises(KeyError):
        bench.result("absent")["value"]
