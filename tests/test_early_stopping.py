"""train.early_stopping_patience (micl/training/early_stopping.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl

from conftest import REPO, tiny_recipe_overrides
from micl.cli import main
from micl.config import load_recipe
from micl.errors import ConfigError
from micl.methods import METHODS, ContinualMethod
from micl.methods.base import unwrap_model
from micl.training.early_stopping import EarlyStopping

RECIPE = str(REPO / "recipes" / "finetune.yaml")


class FakeModel:
    def __init__(self):
        self.weight = torch.zeros(1)

    def trainable_state_dict(self):
        return {"w": self.weight.clone()}

    def load_trainable_state_dict(self, state):
        self.weight = state["w"].clone()


def test_stops_after_patience_epochs_without_improvement_and_restores_the_best():
    model, scores = FakeModel(), iter([1.0, 3.0, 2.0, 3.0, 9.0])
    stopper = EarlyStopping(model, lambda: next(scores), patience=2)
    stopped = []
    for epoch in range(5):
        model.weight = torch.tensor([float(epoch)])  # the weights this epoch ends with
        control = TrainerControl()
        stopper.on_epoch_end(None, None, control)
        stopped.append(control.should_training_stop)
        if control.should_training_stop:
            break
    assert stopped == [False, False, False, True]  # best at epoch 1 (3.0); 2.0 and 3.0 do not beat it
    stopper.on_train_end(None, None, TrainerControl())
    assert model.weight.item() == 1.0
    assert stopper.summary() == {"val_scores": [1.0, 3.0, 2.0, 3.0], "best_epoch": 1, "patience": 2,
                                 "stopped_early": True}
    restored = EarlyStopping(FakeModel(), None, patience=2)
    restored.load_step_state(stopper.step_state())  # what a within-step checkpoint carries
    assert restored.summary() == stopper.summary() and torch.equal(restored.best_state["w"], torch.tensor([1.0]))


def test_last_epoch_best_keeps_the_final_weights():
    model, scores = FakeModel(), iter([1.0, 2.0])
    stopper = EarlyStopping(model, lambda: next(scores), patience=3)
    for epoch in range(2):
        model.weight = torch.tensor([float(epoch)])
        stopper.on_epoch_end(None, None, TrainerControl())
    stopper.on_train_end(None, None, TrainerControl())
    assert model.weight.item() == 1.0 and not stopper.summary()["stopped_early"]


class EpochWeights(ContinualMethod):
    """Records the projector weights every epoch ends with (runs before the early-stopping callback)."""

    name = "epoch_weights"
    seen: list = []

    def on_epoch_end(self, ctx):
        model = unwrap_model(ctx.model)
        EpochWeights.seen.append({k: v.detach().clone() for k, v in model.projectors.state_dict().items()})


def test_run_stops_early_and_saves_the_best_epoch(tiny_models, synth_root, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "epoch_weights", EpochWeights)
    EpochWeights.seen = []
    out = tmp_path / "run"
    assert main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), "order=[synth_image_qa]",
                 "method=[finetune,epoch_weights]", "train.epochs=6", "train.early_stopping_patience=1",
                 "eval.forward_transfer=false", "lora.dropout=0.0"]) == 0
    record = json.loads((out / "step_0_synth_image_qa" / "metrics.json").read_text())["early_stopping"]
    scores, best = record["val_scores"], record["best_epoch"]
    assert best == scores.index(max(scores))
    assert len(scores) == min(6, best + 2)  # one epoch of patience after the best, or all six
    assert len(EpochWeights.seen) == len(scores)
    saved = load_file(str(out / "step_0_synth_image_qa" / "projectors.safetensors"))
    assert all(torch.equal(saved[k], EpochWeights.seen[best][k]) for k in saved)  # the best epoch's weights
    if best < len(scores) - 1:
        assert record["stopped_early"] and any(not torch.equal(saved[k], EpochWeights.seen[-1][k]) for k in saved)


def test_patience_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="train.early_stopping_patience"):
        load_recipe(RECIPE, ["train.early_stopping_patience=0"])


def test_refused_under_zero3(tiny_models, synth_root, tmp_path):
    """By the preflight, before anything runs (tests/test_preflight.py runs it through `micl train`)."""
    from micl.preflight import preflight

    config = load_recipe(RECIPE, [*tiny_recipe_overrides(tiny_models, synth_root, tmp_path / "run"),
                                  "train.early_stopping_patience=2"])
    preflight(config, RECIPE, zero_stage=2)
    with pytest.raises(ConfigError, match="'train.early_stopping_patience' is not supported under DeepSpeed ZeRO-3"):
        preflight(config, RECIPE, zero_stage=3)


def test_killed_mid_epoch_resumes_with_the_scores_so_far(tiny_models, synth_root, tmp_path, monkeypatch):
    from conftest import Killed, crashing
    from micl.methods.finetune import Finetune

    settings = [*tiny_recipe_overrides(tiny_models, synth_root, tmp_path / "reference"), "order=[synth_image_qa]",
                "train.epochs=3", "train.early_stopping_patience=3", "eval.forward_transfer=false", "lora.dropout=0.0"]
    assert main(["train", RECIPE, *settings]) == 0
    # 2 optimizer steps per epoch, a checkpoint after each: call 4 is the second batch of epoch 2, after
    # checkpoint-3, which holds the score of epoch 1
    monkeypatch.setitem(METHODS, "finetune", crashing(Finetune, "augment_batch", step=0, call=4))
    killed = [s.replace(str(tmp_path / "reference"), str(tmp_path / "killed")) for s in settings]
    with pytest.raises(Killed):
        main(["train", RECIPE, *killed])
    monkeypatch.setitem(METHODS, "finetune", Finetune)
    assert main(["train", RECIPE, *killed]) == 0
    expected = json.loads((tmp_path / "reference" / "step_0_synth_image_qa" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "step_0_synth_image_qa" / "metrics.json").read_text())
    assert resumed["resumed_from"] == "checkpoint-3"
    assert resumed["early_stopping"] == expected["early_stopping"] and len(expected["early_stopping"]["val_scores"]) == 3
    for name in ("projectors.safetensors", "adapter/adapter_model.safetensors"):
        got = load_file(str(tmp_path / "killed" / "step_0_synth_image_qa" / name))
        want = load_file(str(tmp_path / "reference" / "step_0_synth_image_qa" / name))
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want), name
