"""Trainable parameters stay float32 under a bf16 / fp16 recipe (the frozen LLM is in the recipe's dtype),
so that small updates are not rounded away (a bf16 weight near 0.02 moves in steps of ~1e-4, a LayerNorm
weight at 1.0 in steps of ~8e-3: AdamW at lr 1e-5 would leave them unchanged) and fp16 gradients can be
unscaled. The model is placed on the launcher's device as soon as it is built."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_recipe_overrides
from micl.config import load_recipe
from micl.training.loop import ContinualRun

RECIPE = "recipes/finetune.yaml"


def _run(tiny_models, synth_root, tmp_path, dtype: str) -> ContinualRun:
    from conftest import REPO

    overrides = [*tiny_recipe_overrides(tiny_models, synth_root, tmp_path / dtype), "order=[synth_image_caption]",
                 f"model.dtype={dtype}", "train.lr=1e-5", "train.projector_lr=1e-5", "train.warmup_ratio=0",
                 "train.batch_size=2", "eval.forward_transfer=false", "data.max_eval_samples=2"]
    return ContinualRun(load_recipe(REPO / RECIPE, overrides))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_small_updates_reach_every_projector_weight(tiny_models, synth_root, tmp_path, dtype):
    run = _run(tiny_models, synth_root, tmp_path, dtype)
    model = run.model
    assert {p.dtype for n, p in model.llm.named_parameters() if not p.requires_grad} == {getattr(torch, dtype)}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    before = {k: v.detach().clone() for k, v in model.projectors["image"].state_dict().items()}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    results = run.run()  # 4 optimizer steps at lr 1e-5
    assert results["steps"][0]["optimizer_steps"] == 4
    assert all(torch.isfinite(torch.tensor(x)) for x in [results["steps"][0]["train_loss"]])
    after = model.projectors["image"].state_dict()
    for name, value in before.items():
        moved = (after[name] != value).float().mean().item()
        assert moved > 0.99, f"{name}: only {moved:.0%} of the weights moved"
    assert bool((after["norm.weight"] != before["norm.weight"]).all())
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_model_is_placed_on_the_launch_device(tiny_models, synth_root, tmp_path, monkeypatch):
    """The model goes where the launcher computes as soon as it is built (a GPU under a launcher), not when
    the first Trainer is made: the initial and pre-step evaluations run before it. Here the 'device' is
    PyTorch's meta device, the one other device a CPU-only machine has."""
    import micl.training.model_factory as model_factory

    monkeypatch.setattr(model_factory, "launch_device", lambda: torch.device("meta"))
    run = _run(tiny_models, synth_root, tmp_path, "float32")
    assert {p.device.type for p in run.model.parameters()} == {"meta"}
