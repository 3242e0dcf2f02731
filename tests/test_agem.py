"""A-GEM (micl/methods/agem.py): the projection through the real optimizer-step hook of a tiny 2-task run,
a run killed mid-step that resumes to the same weights, two DDP processes that average their reference
gradients, settings and the DeepSpeed refusal.

Also the worker of the DDP test: `accelerate launch ... tests/test_agem.py REPORT_PREFIX RECIPE key=value ...`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, Killed, crashing, tiny_recipe_overrides
from micl.cli import main
from micl.config import load_recipe
from micl.errors import ConfigError
from micl.methods import METHODS, build_methods
from micl.methods.agem import AGEM, project

RECIPE = str(REPO / "recipes" / "agem.yaml")
ORDER = "order=[synth_image_caption,synth_audio_qa]"
PHASE = "step_1_synth_audio_qa"


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


class Spy(AGEM):
    """Runs the real hook twice per optimizer step: on the gradient negated (then restored), and on the
    gradient itself (which the step uses). Of g and -g exactly one conflicts with g_ref, so every step
    checks both branches. Records (step, g, hook(-g), hook(g), g_ref, draw) per call."""

    name = "agem"
    calls: list = []
    reference = None

    def reference_gradient(self, model, params, batch):
        reference, used = super().reference_gradient(model, params, batch)
        Spy.reference = [r.clone() for r in reference]
        return reference, used

    def memory_batch(self, batches, ctx):
        batch = super().memory_batch(batches, ctx)
        Spy.draw = None if batch is None else list(batch["indices"])
        return batch

    def before_optimizer_step(self, model, batches, ctx):
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        as_vector = lambda: flat(torch.zeros_like(p) if p.grad is None else p.grad for p in params)  # noqa: E731
        g = as_vector()
        for p, grad in zip(params, grads):
            p.grad = None if grad is None else -grad
        Spy.reference = None
        super().before_optimizer_step(model, batches, ctx)
        negated = as_vector()
        for p, grad in zip(params, grads):
            p.grad = None if grad is None else grad.clone()
        super().before_optimizer_step(model, batches, ctx)
        reference = None if Spy.reference is None else flat(Spy.reference)
        Spy.calls.append({"step": ctx.step, "g": g, "negated": negated, "projected": as_vector(),
                          "reference": reference, "draw": Spy.draw})


def run(tiny_models, synth_root, out, *extra):
    return main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), "eval.forward_transfer=false",
                 "lora.dropout=0.0", "train.epochs=2", "method_args.agem.memory_size=6",
                 "method_args.agem.memory_batch_size=3", ORDER, *extra])


@pytest.fixture(scope="module")
def reference(tiny_models, synth_root, tmp_path_factory):
    METHODS["agem"], Spy.calls = Spy, []
    try:
        out = tmp_path_factory.mktemp("agem") / "reference"
        assert run(tiny_models, synth_root, out) == 0
    finally:
        METHODS["agem"] = AGEM
    return out, list(Spy.calls)


def test_conflicting_gradients_are_projected_and_others_left_alone_in_a_real_run(reference):
    out, calls = reference
    results = json.loads((out / "results.json").read_text())
    steps = [record["optimizer_steps"] for record in results["steps"]]
    # the hook ran at every optimizer step of both steps; the memory exists from the second step on
    assert [c["step"] for c in calls] == [0] * steps[0] + [1] * steps[1] and steps[1] >= 3
    assert all(c["reference"] is None and torch.equal(c["projected"], c["g"]) for c in calls if c["step"] == 0)
    conflicts = 0
    for call in (c for c in calls if c["step"] == 1):
        r = call["reference"]
        assert r is not None and r.norm() > 0
        assert len(call["draw"]) == 3
        for before, after in ((call["g"], call["projected"]), (-call["g"], call["negated"])):
            if before @ r < 0:
                conflicts += 1
                assert after @ r >= -1e-6 * after.norm() * r.norm()  # orthogonal (or better) to g_ref
                expected = before - (before @ r) / (r @ r) * r
                torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(after, before)  # no conflict: the gradient is untouched
    assert conflicts == steps[1]  # exactly one of g and -g conflicts at every step


def test_projection_of_one_vector_over_parameters():
    g = [torch.tensor([1.0, 0.0]), None, torch.tensor([2.0])]
    r = [torch.tensor([-1.0, 1.0]), torch.tensor([1.0]), torch.tensor([0.0])]
    assert project(g, r, [True, True, True])  # g . r = -1 over the whole vector
    # g - (-1 / 3) r: the parameter without a gradient gets the projection's component
    assert torch.allclose(g[0], torch.tensor([2 / 3, 1 / 3])) and torch.allclose(g[1], torch.tensor([1 / 3]))
    assert torch.equal(g[2], torch.tensor([2.0]))
    same = [torch.tensor([1.0, 1.0])]
    assert not project(same, [torch.tensor([1.0, 0.0])], [True]) and torch.equal(same[0], torch.tensor([1.0, 1.0]))


def test_killed_mid_step_resumes_with_the_same_memory_draws_and_weights(reference, tiny_models, synth_root, tmp_path,
                                                                        monkeypatch):
    expected_dir, expected_calls = reference
    out = tmp_path / "killed"
    # killed at the third optimizer step of step 1, in its second epoch (checkpoint-2 is on disk)
    monkeypatch.setitem(METHODS, "agem", crashing(Spy, "before_optimizer_step", step=1, call=3))
    with pytest.raises(Killed):
        run(tiny_models, synth_root, out)
    monkeypatch.setitem(METHODS, "agem", Spy)
    Spy.calls = []
    assert run(tiny_models, synth_root, out) == 0
    resumed = json.loads((out / "results.json").read_text())
    expected = json.loads((expected_dir / "results.json").read_text())
    assert resumed["steps"][1]["resumed_from"] == "checkpoint-2"
    # the resumed optimizer steps draw the memory samples the uninterrupted run drew, and project alike
    again, before = Spy.calls, [c for c in expected_calls if c["step"] == 1][2:]
    assert [c["draw"] for c in again] == [c["draw"] for c in before] and len(again) == 2
    assert all(torch.equal(a["projected"], b["projected"]) for a, b in zip(again, before))
    assert resumed["matrix"] == expected["matrix"]
    for name in ("projectors.safetensors", "adapter/adapter_model.safetensors"):
        got, want = load_file(str(out / PHASE / name)), load_file(str(expected_dir / PHASE / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_settings_and_deepspeed_refusal(monkeypatch):
    with pytest.raises(ConfigError, match="'method_args.agem.memory_batch_size' must be an integer >= 1"):
        build_methods(load_recipe(RECIPE, ["method_args.agem.memory_batch_size=0"]), RECIPE)
    (method,) = build_methods(load_recipe(RECIPE, ["method_args.agem.memory_size=5"]), RECIPE)
    assert method.memory.args.buffer_size == 5
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="method agem is not supported under DeepSpeed"):
        build_methods(load_recipe(RECIPE), RECIPE)


# ---- two DDP processes -----------------------------------------------------------------------------------
def digest(vector: torch.Tensor | None) -> str | None:
    return None if vector is None else hashlib.sha256(vector.numpy().tobytes()).hexdigest()


def test_ddp_processes_average_their_reference_gradients(tiny_models, synth_root, tmp_path):
    from test_distributed import _env, _free_port

    out, prefix = tmp_path / "ddp", tmp_path / "report"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", str(REPO / "recipes" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
           "--main_process_port", str(_free_port()), __file__, str(prefix), RECIPE,
           *tiny_recipe_overrides(tiny_models, synth_root, out), "eval.forward_transfer=false", "lora.dropout=0.0",
           "train.batch_size=2", "method_args.agem.memory_size=4", "method_args.agem.memory_batch_size=2", ORDER]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(prefix.with_name(f"report.rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and any(c["step"] == 1 for c in ranks[0])
    for mine, other in zip(*ranks):
        assert mine["step"] == other["step"]
        assert mine["projected"] == other["projected"]  # the same update on both replicas
        if mine["step"] == 1:
            assert mine["reference"] is not None and mine["reference"] == other["reference"]  # averaged
    draws = [[c["draw"] for c in calls if c["step"] == 1] for calls in ranks]
    assert draws[0] != draws[1]  # each process drew its own memory batches


def _worker() -> None:
    """One DDP process: the recipe with Spy as `agem`; writes what its hook saw, as digests."""
    from micl.utils.distributed import rank

    prefix, *argv = sys.argv[1:]
    METHODS["agem"], Spy.calls = Spy, []
    code = main(["train", *argv])
    report = [{"step": c["step"], "draw": c["draw"], "projected": digest(c["projected"]),
               "reference": digest(c["reference"])} for c in Spy.calls]
    with open(f"{prefix}.rank{rank()}.json", "w") as file:
        json.dump(report, file)
    sys.exit(code)


if __name__ == "__main__":
    _worker()
