"""Recipe settings passed through to transformers: model.attn_implementation, train.gradient_checkpointing,
train.dataloader_num_workers / dataloader_pin_memory."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, tiny_recipe_overrides
from micl.config import load_recipe
from micl.errors import ConfigError, MiclError
from micl.modeling.llm import load_llm
from micl.training.loop import ContinualRun

RECIPE = REPO / "recipes" / "finetune.yaml"
ONE_TASK = ["order=[synth_image_qa]", "eval.forward_transfer=false", "train.logging_steps=1"]


def _run(tiny_models, synth_root, out, *extra) -> ContinualRun:
    return ContinualRun(load_recipe(RECIPE, [*tiny_recipe_overrides(tiny_models, synth_root, out), *ONE_TASK, *extra]))


def test_attn_implementation_reaches_the_llm(tiny_models, synth_root, tmp_path):
    run = _run(tiny_models, synth_root, tmp_path / "run", "model.attn_implementation=eager")
    assert run.model.llm.get_base_model().config._attn_implementation == "eager"
    llm, _ = load_llm(tiny_models["llm"], attn_implementation="sdpa")
    assert llm.config._attn_implementation == "sdpa"
    with pytest.raises(MiclError, match="model.attn_implementation: 'no_such_attention' refused"):
        load_llm(tiny_models["llm"], attn_implementation="no_such_attention")


def test_dataloader_settings_reach_the_trainer(tiny_models, synth_root, tmp_path):
    run = _run(tiny_models, synth_root, tmp_path / "run", "train.dataloader_num_workers=2",
               "train.dataloader_pin_memory=true")
    args = run._training_args(0, range(8))
    # (TrainingArguments turns pinning off when it runs on the CPU)
    assert (args.dataloader_num_workers, args.dataloader_pin_memory) == (2, torch.cuda.is_available())
    default = _run(tiny_models, synth_root, tmp_path / "default")._training_args(0, range(8))
    assert (default.dataloader_num_workers, default.dataloader_pin_memory) == (0, False)


def _train_counting_layer_calls(run: ContinualRun) -> tuple[int, list[float]]:
    """Trains the run's one task; returns how often the MLP of the LLM's first decoder layer ran with
    gradients on (training forwards and recomputations; a counter in its `forward`, since module hooks do
    not run again in a recomputation) and the logged losses."""
    calls = {"n": 0}
    mlp = run.model.llm.get_base_model().model.layers[0].mlp
    forward = mlp.forward

    def counting_forward(*args, **kwargs):
        if mlp.training and torch.is_grad_enabled():
            calls["n"] += 1
        return forward(*args, **kwargs)

    mlp.forward = counting_forward
    try:
        run.run()
    finally:
        del mlp.forward
    metrics = json.loads((run.out / "step_0_synth_image_qa" / "metrics.json").read_text())
    return calls["n"], [e["loss"] for e in metrics["log_history"] if "loss" in e]


def test_gradient_checkpointing_recomputes_the_llm_layers(tiny_models, synth_root, tmp_path):
    """8 samples, batch 4: two optimizer steps. With checkpointing each decoder layer runs twice per step
    (forward, then recomputed in the backward) and the losses are the same; also with a worker process
    loading the batches."""
    plain_calls, plain_losses = _train_counting_layer_calls(_run(tiny_models, synth_root, tmp_path / "plain"))
    checkpointed = _run(tiny_models, synth_root, tmp_path / "checkpointed", "train.gradient_checkpointing=true",
                        "train.dataloader_num_workers=1")
    calls, losses = _train_counting_layer_calls(checkpointed)
    assert plain_calls == 2 and calls == 4
    assert len(losses) == 2 and losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-6)
    # how a run is computed is not its identity: the finished run continues with other runtime settings
    again = _run(tiny_models, synth_root, tmp_path / "plain", "train.gradient_checkpointing=true",
                 "train.dataloader_num_workers=2", "model.attn_implementation=eager").run()
    assert again["complete"]
    again = _run(tiny_models, synth_root, tmp_path / "plain", "train.num_threads=1", "eval.batch_size=3",
                 "train.save_steps=7").run()  # another machine's core count, another evaluation batch size
    assert again["complete"]
    with pytest.raises(ConfigError, match="different settings"):
        _run(tiny_models, synth_root, tmp_path / "plain", "train.lr=2e-3").run()
    # decoding settings change the scores: not mixed into one results matrix
    for decoding in ("eval.num_beams=2", "eval.max_new_tokens=5", "eval.repetition_penalty=1.2"):
        with pytest.raises(ConfigError, match=r"different settings \(eval\)"):
            _run(tiny_models, synth_root, tmp_path / "plain", decoding).run()


def test_another_tuners_settings_are_not_part_of_a_runs_identity():
    """A plain-LoRA run does not depend on gated LoRA's gate_init (whose default changed), a gated one does."""
    from micl.training.run_identity import identity

    plain = {"lora": {"type": "lora", "r": 8, "gate_init": 0.5, "num_experts": 10}}
    assert identity(plain, "lora") == identity({"lora": {**plain["lora"], "gate_init": 1.0}}, "lora")
    assert identity(plain, "lora") != identity({"lora": {**plain["lora"], "r": 4}}, "lora")
    gated = {"lora": {**plain["lora"], "type": "gated_lora"}}
    assert identity(gated, "lora") != identity({"lora": {**gated["lora"], "gate_init": 1.0}}, "lora")
    assert identity(gated, "lora") == identity({"lora": {**gated["lora"], "num_experts": 4}}, "lora")
