"""The loss and the gradients of one optimizer step do not depend on how the global batch is split: 2
processes x batch 4 (DDP, ZeRO-2, ZeRO-3), 1 process x batch 8 and 1 process x batch 4 x accumulation 2
agree, on image captioning, whose targets have different lengths (every loss is normalised by the target
tokens of the whole global batch, micl/training/loss_scale.py). Under DDP the same holds with MoInCL,
LwF and replay, when the ranks run different numbers of auxiliary rows (their forwards and backwards
run inside `no_sync`).

Gradients are read off one SGD step (no momentum, no weight decay, no clipping): grad = (w0 - w1) / lr.
With warm-up 0.5 of 2 optimizer steps the first step has learning rate 0 and the second the full rate, so
the second step's gradient is taken at the initial weights; a warm-up computed from the wrong number of
optimizer steps shows up as a different update.
"""

from __future__ import annotations

import json
import os
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe_overrides
from test_distributed import RECIPE, launch, reports

LR = 0.5
SGD = ["train.optim=sgd", f"train.lr={LR}", "train.projector_lr=null", "train.max_grad_norm=0",
       "train.weight_decay=0", "lora.dropout=0.0", "train.logging_steps=1", "eval.forward_transfer=false",
       "data.max_eval_samples=1", "eval.max_new_tokens=1"]
CAPTION = ["order=[synth_image_caption]", "data.max_train_samples=16", "train.epochs=1", "train.warmup_ratio=0.5",
           # the untrained model's scores (same weights everywhere): 4 evaluation batches of 2
           "eval.forward_transfer=true", "data.max_eval_samples=8", "eval.batch_size=2", "eval.max_new_tokens=3"]
# step 0 image QA, step 1 image captioning with pseudo QA targets, LwF distillation and replay of step 0
AUX = ["order=[synth_image_qa,synth_image_caption]", "method=[moincl,lwf,replay]", "data.max_train_samples=8",
       "train.epochs=1", "train.warmup_ratio=0", "method_args.moincl.pseudo_num=1",
       # no instructions: a rank without pseudo rows runs no MoInCL forward at all (fewer auxiliary passes)
       "method_args.moincl.instruction_k=0", "method_args.replay.replay_batch_size=2",
       "method_args.replay.buffer_size=4"]


def _overrides(tiny_models, synth_root, out, batch_size: int, accum: int, extra: list[str]) -> list[str]:
    return [*tiny_recipe_overrides(tiny_models, synth_root, out), *SGD, *extra,
            f"train.batch_size={batch_size}", f"train.grad_accum={accum}"]


def _single(tiny_models, synth_root, folder, batch_size, accum, extra) -> dict:
    from distributed_worker import main as worker_main

    assert worker_main([str(folder / "report"), RECIPE,
                        *_overrides(tiny_models, synth_root, folder / "run", batch_size, accum, extra)]) == 0
    return {"report": json.loads((folder / "report.rank0.json").read_text()), "out": folder / "run"}


def _launched(config, tiny_models, synth_root, folder, extra, **env) -> dict:
    done = launch(config, folder / "report", _overrides(tiny_models, synth_root, folder / "run", 4, 1, extra),
                  timeout=int(os.environ.get("MICL_TEST_LAUNCH_TIMEOUT", "300")), **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    both = reports(folder / "report")
    return {"report": both[0], "reports": both, "out": folder / "run"}


def _gradient(run: dict, step: int) -> dict[str, torch.Tensor]:
    kept = run["out"] / "kept_checkpoints" / f"step_{step}"
    before, after = load_file(str(kept / "init.safetensors")), load_file(str(kept / "trainable.safetensors"))
    return {name: (before[name] - after[name].float()) / LR for name in before}


def _relative(a: dict, b: dict) -> float:
    flat_a = torch.cat([a[k].flatten() for k in sorted(a)])
    flat_b = torch.cat([b[k].flatten() for k in sorted(b)])
    return float((flat_a - flat_b).norm() / flat_b.norm())


@pytest.fixture(scope="module")
def caption_runs(tiny_models, synth_root, tmp_path_factory):
    runs = {}

    def get(name: str) -> dict:
        if name not in runs:
            folder = tmp_path_factory.mktemp(name.replace(" ", "_"))
            if name == "1x8":
                runs[name] = _single(tiny_models, synth_root, folder, 8, 1, CAPTION)
            elif name == "1x4x2":
                runs[name] = _single(tiny_models, synth_root, folder, 4, 2, CAPTION)
            else:
                runs[name] = _launched(f"{name}.yaml", tiny_models, synth_root, folder, CAPTION,
                                       MICL_CACHE_DIR=str(folder / "cache"))
        return runs[name]

    return get


def _check_same_step(reference: dict, other: dict, step: int = 0) -> None:
    ref, got = reference["report"], other["report"]
    assert got["schedule"][str(step)]["optimizer_steps"] == ref["schedule"][str(step)]["optimizer_steps"] == 2
    # warm-up from the real optimizer steps: ceil(0.5 x 2) = 1 however the batch is split
    assert got["schedule"][str(step)]["warmup_steps"] == ref["schedule"][str(step)]["warmup_steps"] == 1
    assert got["log_history"][str(step)] == pytest.approx(ref["log_history"][str(step)], rel=1e-5)
    assert _relative(_gradient(other, step), _gradient(reference, step)) < 1e-5


def test_targets_differ_in_length(caption_runs):
    counts = caption_runs("1x4x2")["report"]["steps"]["0"]["label_counts"]
    assert len({n for batch in counts for n in batch}) > 1


def test_accumulation_matches_one_large_batch(caption_runs):
    _check_same_step(caption_runs("1x8"), caption_runs("1x4x2"))


def test_ddp_two_processes_match_one_process(caption_runs):
    _check_same_step(caption_runs("1x8"), caption_runs("ddp"))


def test_evaluation_is_shared_by_the_processes_with_the_scores_of_one(caption_runs):
    single, ddp = caption_runs("1x8")["report"], caption_runs("ddp")
    # initial (forward-transfer) and after-step evaluations: 2 x 4 batches in one process, half per rank
    assert single["generate_calls"] == 8
    assert [r["generate_calls"] for r in ddp["reports"]] == [4, 4]
    assert ddp["report"]["initial_scores"] == single["initial_scores"]  # exactly: the same predictions


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_two_processes_match_one_process(caption_runs, config):
    _check_same_step(caption_runs("1x8"), caption_runs(config))


def test_ddp_auxiliary_losses_with_different_counts_per_rank(tiny_models, synth_root, tmp_path):
    """MoInCL (one sample keeps its pseudo target: only the rank whose batch holds it runs a pseudo row),
    LwF and replay under DDP: no hang, and the gradient of step 1's first optimizer step equals a single
    process's on the same micro-batches (batch 4 x accumulation 2)."""
    keep = {"MICL_TEST_PSEUDO_KEEP": "first"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MICL_TEST_PSEUDO_KEEP", "first")
        single = _single(tiny_models, synth_root, tmp_path / "single", 4, 2, AUX)
    ddp = _launched("ddp.yaml", tiny_models, synth_root, tmp_path / "ddp", AUX, **keep)
    # the pseudo row was in one micro-batch of the step, i.e. on one rank: that rank runs two auxiliary
    # forwards (MoInCL's, replay's), the other one
    assert sorted(single["report"]["steps"]["1"]["pseudo_rows"]) == [0, 1]
    assert sorted(r["steps"]["1"]["pseudo_rows"][0] for r in ddp["reports"]) == [0, 1]
    assert sorted(r["steps"]["1"]["extra_inputs"][0] for r in ddp["reports"]) == [["moincl", "replay"], ["replay"]]
    assert single["report"]["log_history"]["1"] == pytest.approx(ddp["report"]["log_history"]["1"], rel=1e-5)
    assert _relative(_gradient(ddp, 1), _gradient(single, 1)) < 1e-5
    assert math.isfinite(ddp["report"]["log_history"]["1"][0])
