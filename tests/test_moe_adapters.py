"""The moe_adapters method (micl/methods/moe_adapters.py) over the moe_lora tuner."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import Killed, crashing, REPO, tiny_recipe_overrides
from micl.cli import main
from micl.errors import ConfigError
from micl.methods import METHODS
from micl.methods.base import TokenSum
from micl.modeling.multimodal import model_inputs
from micl.methods.moe_adapters import (MEMORY_ITEMS, MoeAdapters, MoeAdaptersArgs, alignment_loss,
                                       joint_representation, preservation_kl)

RECIPE = str(REPO / "recipes" / "moe_adapters.yaml")
ORDER = "order=[synth_image_caption,synth_audio_qa]"


def run(tiny_models, synth_root, out, *extra):
    return main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), "eval.forward_transfer=false",
                 "lora.num_experts=4", "lora.top_k=2", "lora.dropout=0.0",
                 "method_args.moe_adapters.freeze_threshold=0.3", "method_args.moe_adapters.memory_size=8",
                 "method_args.moe_adapters.memory_batch_size=4", *extra])


def test_preservation_loss_is_zero_for_the_same_model_and_positive_otherwise():
    torch.manual_seed(0)
    old = torch.randn(6, 16)
    assert preservation_kl(old, old.clone(), 0.1).item() == pytest.approx(0.0, abs=1e-7)
    assert preservation_kl(old, 3 * old, 0.1).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    new = old + 0.5 * torch.randn(6, 16)
    assert preservation_kl(old, new, 0.1).item() > 1e-3
    new.requires_grad_(True)
    preservation_kl(old, new, 0.1).backward()
    assert new.grad.abs().sum() > 0


def test_alignment_pulls_each_medium_toward_the_joint_representation_at_the_last_prompt_position():
    # positions: pad | image image | audio audio | text text (last prompt position: 6) | target target
    attention = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100] * 7 + [5, 6]])
    image = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0, 0]]).bool()
    audio = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0]]).bool()
    joint = torch.randn(8)
    hidden = torch.randn(1, 9, 8)
    hidden[0, 6] = joint
    assert torch.equal(joint_representation(hidden, attention, labels)[0], joint)
    hidden[0, 1:3] = 2 * joint  # the image tokens point where the joint does: no image term
    other = torch.randn(8)
    hidden[0, 3:5] = other - (other @ joint) / (joint @ joint) * joint  # audio orthogonal to the joint: 1
    loss = alignment_loss(hidden, attention, labels, {"image": image})
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # whatever the text tokens: the joint is not their mean
    both = alignment_loss(hidden, attention, labels, {"image": image, "audio": audio})
    assert both.item() == pytest.approx(0.5, abs=1e-5)  # one term per (sample, medium)

    hidden = torch.randn(1, 9, 8, requires_grad=True)
    alignment_loss(hidden, attention, labels, {"image": image, "audio": audio}).backward()
    moved = hidden.grad[0].abs().sum(-1) > 0
    # each medium moves toward the joint (its anchor, stop-gradient); text and targets are not representations
    assert moved.tolist() == [False, True, True, True, True, False, False, False, False]
    assert alignment_loss(hidden, attention, labels, {}) is None  # no media: no term


def test_args_validation():
    with pytest.raises(ConfigError, match="freeze_threshold"):
        MoeAdaptersArgs(freeze_threshold=1.5)
    with pytest.raises(ConfigError, match="'method_args.moe_adapters.memory_batch_size' must be an integer >= 2"):
        MoeAdaptersArgs(memory_batch_size=1)
    with pytest.raises(ConfigError, match="distill_temperature"):
        MoeAdaptersArgs(distill_temperature=0)


class Spy(MoeAdapters):
    name = "moe_adapters"
    losses: list = []  # per training batch: (step, memory rows, memory indices held, [loss values])
    frozen_untouched: list = []

    def auxiliary_losses(self, model, batch, ctx):
        memory = batch.get("moe_adapters")
        held = {index for _, index in self.memory}
        rows = None if memory is None else (len(memory["indices"]), set(memory["indices"]) <= held)
        values = []
        for losses in super().auxiliary_losses(model, batch, ctx):
            assert isinstance(losses[0], TokenSum) and losses[0].items == MEMORY_ITEMS
            values = [losses[0].value.item(), *(x.item() for x in losses[1:])]
            yield losses
        Spy.losses.append((ctx.step, rows, values))
        # during training (not only after the guard restores them): no gradient flag, no gradient
        frozen = self._frozen_params(model)
        Spy.frozen_untouched.append((ctx.step, len(frozen), all(not p.requires_grad and p.grad is None
                                                                for p in frozen)))


def _key(name: str, part: str) -> str:
    return f"base_model.model.{name.removeprefix('base_model.model.')}.moe_lora_{part}"


def test_two_task_run_freezes_experts_and_their_router_rows_bit_exactly_and_rehearses_the_memory(
        tiny_models, synth_root, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "moe_adapters", Spy)
    Spy.losses, Spy.frozen_untouched = [], []
    out = tmp_path / "run"
    assert run(tiny_models, synth_root, out, ORDER) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 2

    record = json.loads((out / "moe_adapters" / "step_0_synth_image_caption.json").read_text())
    units_total = 0
    for name, layer in record["layers"].items():
        assert sum(layer["counts"]) == 2 * layer["units"]  # top_k activations per routed token
        units_total += layer["units"]
        assert layer["newly_frozen"] == [e for e, f in enumerate(layer["frequency"]) if f > 0.3]
    assert units_total > 0 and record["frozen_experts"] > 0
    frozen = {name: layer["frozen"] for name, layer in record["layers"].items()}
    # load balancing in every layer during the first task, then only in the layers that froze no expert
    second_record = json.loads((out / "moe_adapters" / "step_1_synth_audio_qa.json").read_text())
    assert record["balanced_layers"] == len(frozen)
    assert 0 < sum(1 for ids in frozen.values() if ids) < len(frozen)
    assert second_record["balanced_layers"] == sum(1 for ids in frozen.values() if not ids)

    # a frozen expert's weights and router row are bit-identical after the second task; the others moved
    before = load_file(str(out / "step_0_synth_image_caption" / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(out / "step_1_synth_audio_qa" / "adapter" / "adapter_model.safetensors"))
    same, moved = 0, 0
    for name, ids in frozen.items():
        for e in range(4):
            for part in ("A", "B"):
                key = f"{_key(name, part)}.{e}"
                if e in ids:
                    assert torch.equal(before[key], after[key]), key
                    same += 1
                else:
                    moved += not torch.equal(before[key], after[key])
        router_before, router_after = before[_key(name, "router.weight")], after[_key(name, "router.weight")]
        rest = [e for e in range(4) if e not in ids]
        assert torch.equal(router_before[ids], router_after[ids]), name
        assert not torch.equal(router_before[rest], router_after[rest]), name
    assert same > 0 and moved > 0
    assert any(after[k].any() for k in after if k.endswith("moe_lora_frozen"))

    assert all(ok for _, _, ok in Spy.frozen_untouched)
    assert [n > 0 for step, n, _ in Spy.frozen_untouched] == [step == 1 for step, _, _ in Spy.frozen_untouched]
    # no memory in the first task; from the second on every batch rehearses 4 samples of the first task's memory
    assert all(rows is None and not values for step, rows, values in Spy.losses if step == 0)
    second = [(rows, values) for step, rows, values in Spy.losses if step == 1]
    assert second and all(rows == (4, True) and len(values) == 2 for rows, values in second)
    assert all(values[0] > 0 and values[1] > -1e-6 for _, values in second)  # CE (+ KD) and preservation KL
    # the first batch of task 2: the model is the previous model, so the preservation KL is exactly 0
    assert second[0][1][1] == pytest.approx(0.0, abs=1e-6)

    # method state: frozen experts, memory, history; the teacher adapter is gone
    state = torch.load(out / "step_1_synth_audio_qa" / "method_state.pt", weights_only=False)[0]
    assert len(state["memory"]) == 8 and {t for t, _ in state["memory"]} == {"synth_image_caption",
                                                                             "synth_audio_qa"}
    assert len(state["history"]) == 2 and set(state["frozen"]) >= {k for k, v in frozen.items() if v}
    assert not any(".teacher" in k for k in after)


def test_composes_with_moincl_teacher_and_keeps_frozen_experts_exact(tiny_models, synth_root, tmp_path):
    out = tmp_path / "run"
    # QA after QA: no pseudo captions to generate (slow), but the teacher adapter, its forwards (instruction
    # distillation) and the LoRA interpolation after every epoch all run
    assert run(tiny_models, synth_root, out, "order=[synth_image_qa,synth_audio_qa]", "method=[moincl,moe_adapters]",
               "method_args.moincl.instruction_k=1") == 0
    record = json.loads((out / "moe_adapters" / "step_0_synth_image_qa.json").read_text())
    before = load_file(str(out / "step_0_synth_image_qa" / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(out / "step_1_synth_audio_qa" / "adapter" / "adapter_model.safetensors"))
    assert not any(".teacher" in k for k in after)
    checked = 0
    for name, layer in record["layers"].items():
        for e in layer["frozen"]:
            assert torch.equal(before[f"{_key(name, 'A')}.{e}"], after[f"{_key(name, 'A')}.{e}"])
            checked += 1
        # the interpolation (1 - alpha) * old + alpha * new of an unchanged row can move it by an ulp: guarded
        rows = layer["frozen"]
        assert torch.equal(before[_key(name, "router.weight")][rows], after[_key(name, "router.weight")][rows])
    assert checked > 0


def test_refused_without_the_moe_lora_tuner(tiny_models, synth_root, tmp_path, capsys):
    assert run(tiny_models, synth_root, tmp_path / "run", "order=[synth_image_caption]", "lora.type=lora") == 2
    assert "lora.type: moe_lora" in capsys.readouterr().err


def test_state_round_trip_reapplies_freezing_at_task_start():
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from micl.adapters.moe_lora import MoeLoraConfig, moe_layers
    from micl.methods.base import StepContext

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    model = get_peft_model(llm, MoeLoraConfig(r=2, target_modules=["q_proj"], num_experts=3, top_k=1))
    name = next(iter(moe_layers(model)))
    method = MoeAdapters()
    method.load_state_dict({"frozen": {name: [2]}, "memory": [], "history": []})
    method.on_task_start(StepContext(step=1, task=None, seen_tasks=[], model=model, train_dataset=None, run_dir=""))
    layer = moe_layers(model)[name]
    assert not layer.moe_lora_A["default"][2].requires_grad and layer.moe_lora_A["default"][1].requires_grad
    assert method.state_dict()["frozen"] == {name: [2]}


def test_killed_mid_task_resumes_with_the_same_frozen_experts_and_results(tiny_models, synth_root, tmp_path,
                                                                          monkeypatch):
    # logging every step: the Trainer's train_loss of a resumed step only averages the losses logged so far
    settings = (ORDER, "train.logging_steps=1")
    reference = tmp_path / "reference"
    assert run(tiny_models, synth_root, reference, *settings) == 0
    out = tmp_path / "killed"
    monkeypatch.setitem(METHODS, "moe_adapters", crashing(MoeAdapters))
    with pytest.raises(Killed):
        run(tiny_models, synth_root, out, *settings)
    assert not (out / "step_1_synth_audio_qa").exists()
    monkeypatch.setitem(METHODS, "moe_adapters", MoeAdapters)
    assert run(tiny_models, synth_root, out, *settings) == 0
    resumed = json.loads((out / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert resumed["steps"][1]["resumed_from"] == "checkpoint-1"
    assert resumed["matrix"] == expected["matrix"]
    assert resumed["steps"][1]["train_loss"] == pytest.approx(expected["steps"][1]["train_loss"], rel=1e-5)
    phase = "step_1_synth_audio_qa"
    for name in ("adapter/adapter_model.safetensors", "projectors.safetensors"):
        got, want = load_file(str(out / phase / name)), load_file(str(reference / phase / name))
        assert got.keys() == want.keys()
        assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-6) for k in want), \
            [k for k in want if not torch.allclose(got[k].float(), want[k].float(), atol=1e-6)][:5]
    got = load_file(str(out / phase / "adapter/adapter_model.safetensors"))
    want = load_file(str(reference / phase / "adapter/adapter_model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want if k.endswith("moe_lora_frozen"))


def _tiny_moe_model(tiny_models):
    from micl.adapters import build_peft_config
    from micl.config import LoraArgs
    from micl.modeling.llm import load_llm
    from micl.modeling.multimodal import MultimodalLM
    from micl.modeling.prompting import PromptBuilder

    torch.manual_seed(0)
    llm, tokenizer = load_llm(tiny_models["llm"])
    config = build_peft_config(LoraArgs(type="moe_lora", dropout=0.0, num_experts=4, top_k=2))
    model = MultimodalLM.with_adapter(llm, tokenizer, {"image": 12}, config)
    with torch.no_grad():  # a trained adapter (B starts at zero)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model, PromptBuilder(tokenizer, "")


def _context(model, builder, step=1):
    from types import SimpleNamespace

    from micl.data.collator import MultimodalCollator
    from micl.methods.base import StepContext
    from test_modeling import example

    torch.manual_seed(2)
    old = [{**example(builder, "describe.", "image", torch.randn(4, 12), target), "index": i}
           for i, target in enumerate(["a red circle", "a blue square", "two green dots", "a star"])]
    return StepContext(step=step, task=SimpleNamespace(name="new"), seen_tasks=[SimpleNamespace(name="old")],
                       model=model, train_dataset=None, run_dir="", dataset_fn=lambda spec, split: old,
                       collate_fn=MultimodalCollator(model.tokenizer.pad_token_id)), old


def test_memory_losses_are_zero_for_the_previous_model_and_pull_the_model_back_toward_it(tiny_models):
    """Rehearsal is the CE of the memory samples; distillation (T^2 KL to the previous model on their targets)
    and the preservation KL are exactly 0 while the model is the previous one, positive once it moved, and
    their gradient moves it back."""
    model, builder = _tiny_moe_model(tiny_models)
    method = MoeAdapters(MoeAdaptersArgs(memory_batch_size=4, rehearsal_weight=0.0, align_weight=0.0))
    method.memory = [("old", i) for i in range(4)]
    ctx, old = _context(model, builder)
    method.on_task_start(ctx)
    assert method.teacher is not None
    batch = method.augment_batch(ctx.collate_fn([{**old[0], "index": 0}]), ctx)
    assert sorted(batch["moe_adapters"]["indices"]) == [0, 1, 2, 3]
    assert method.count_loss_items(batch)[MEMORY_ITEMS] == (batch["moe_adapters"]["labels"][:, 1:] != -100).sum()
    model.train()
    (memory, kl), = method.auxiliary_losses(model, batch, ctx)
    assert memory.value.item() == pytest.approx(0.0, abs=1e-5) and kl.item() == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():  # the model moves away from the previous one
        for param in model.projectors.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    (memory, kl), = method.auxiliary_losses(model, batch, ctx)
    start = memory.value.item() + kl.item()
    assert memory.value.item() > 1e-3 and kl.item() > 1e-6
    optimizer = torch.optim.Adam(model.projectors.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        (memory, kl), = method.auxiliary_losses(model, batch, ctx)
        (memory.value + kl).backward()
        optimizer.step()
    (memory, kl), = method.auxiliary_losses(model, batch, ctx)
    assert memory.value.item() + kl.item() < 0.5 * start

    rehearsal = MoeAdapters(MoeAdaptersArgs(memory_batch_size=4, distill_weight=0.0, preserve_weight=0.0))
    rehearsal.memory = method.memory
    rehearsal.on_task_start(ctx)
    assert rehearsal.teacher is None  # rehearsal alone needs no previous model
    (ce,), = rehearsal.auxiliary_losses(model, batch, ctx)
    model.eval()
    with torch.no_grad():
        expected = model(**model_inputs(batch["moe_adapters"])).loss_sum
    assert ce.value.item() == pytest.approx(expected.item(), rel=1e-5)
    method.teacher.remove()
    assert not any("teacher" in n for n, _ in model.named_parameters())


def test_load_balancing_only_in_layers_without_frozen_experts():
    from types import SimpleNamespace

    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from micl.adapters.moe_lora import MoeLoraConfig, moe_layers
    from micl.methods.base import StepContext

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    model = get_peft_model(llm, MoeLoraConfig(r=2, target_modules=["q_proj", "v_proj"], num_experts=3, top_k=1))
    names = list(moe_layers(model))
    method = MoeAdapters(MoeAdaptersArgs(balance_coef=0.5, align_weight=0.0))
    ctx = StepContext(step=1, task=None, seen_tasks=[], model=model, train_dataset=None, run_dir="")
    method.load_state_dict({"frozen": {names[0]: [1]}})
    method.on_task_start(ctx)
    model.train()
    ids = torch.randint(0, 32, (2, 5))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    layers = moe_layers(model)
    loss = method.extra_loss(model, {}, SimpleNamespace(hidden_states=None), ctx)
    assert loss.item() == pytest.approx(0.5 * layers[names[1]].balance_loss().item(), rel=1e-6)
    method.load_state_dict({"frozen": {name: [0] for name in names}})
    method.on_task_start(ctx)
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert method.extra_loss(model, {}, SimpleNamespace(hidden_states=None), ctx) is None


def test_memory_draw_must_hold_every_past_task_under_uniform_forwards(tiny_models):
    model, builder = _tiny_moe_model(tiny_models)
    ctx, _ = _context(model, builder, step=3)
    ctx.uniform_forwards = True
    method = MoeAdapters(MoeAdaptersArgs(memory_batch_size=2))
    method.memory = [("a", 0), ("b", 0), ("c", 0)]
    with pytest.raises(ConfigError, match="memory_batch_size"):
        method.on_task_start(ctx)
    method = MoeAdapters(MoeAdaptersArgs(memory_batch_size=3))
    method.memory = [("a", 0), ("b", 0), ("c", 0)]
    method.on_task_start(ctx)
    assert all({t for t, _ in method.draw_memory(ctx, str(key))} == {"a", "b", "c"} for key in range(5))
    method.teacher.remove()


class MemoryLoss(MoeAdapters):
    """Records the mean CE of the first task's memory samples after the first task and after the second."""
    name = "moe_adapters"
    seen: list = []

    def _memory_ce(self, ctx) -> float:
        from micl.methods.base import unwrap_model
        from micl.methods.replay import training_items

        model = unwrap_model(ctx.model)
        model.eval()
        first = [pair for pair in self.memory if pair[0] == self.memory[0][0]]
        with torch.no_grad():
            out = model(**model_inputs(ctx.collate_fn(training_items(ctx, first, 0))))
        model.train()
        return (out.loss_sum / out.num_tokens).item()

    def on_task_end(self, ctx):
        if ctx.step == 1:
            MemoryLoss.seen.append(self._memory_ce(ctx))
        super().on_task_end(ctx)
        if ctx.step == 0:
            MemoryLoss.seen.append(self._memory_ce(ctx))


def test_knowledge_preservation_keeps_the_first_tasks_outputs(tiny_models, synth_root, tmp_path, monkeypatch):
    """The same two tasks with and without rehearsal, distillation and preservation on the memory: with them,
    the first task's memory samples lose less of their fit (CE after the second task - CE after the first)."""
    monkeypatch.setitem(METHODS, "moe_adapters", MemoryLoss)
    MemoryLoss.seen = []
    off = [f"method_args.moe_adapters.{key}=0" for key in ("rehearsal_weight", "distill_weight", "preserve_weight")]
    for name, extra in (("on", []), ("off", off)):
        assert run(tiny_models, synth_root, tmp_path / name, ORDER, "train.epochs=3", "train.lr=1e-2",
                   "train.projector_lr=1e-2", *extra) == 0
    first, with_memory, first_off, without = MemoryLoss.seen
    assert first == first_off  # the first task trains alike
    print(f"memory CE after task 1 {first:.4f}; after task 2: with {with_memory:.4f}, without {without:.4f}")
    assert with_memory - first < 0.5 * (without - first)


def test_sample_routing_through_the_multimodal_model_pools_the_prompt_only(tiny_models):
    """MultimodalLM computes its loss itself and gives the LLM no labels: the router must still see them, or
    sample routing pools the targets in training (and routes differently from generation, which has none)."""
    from micl.adapters import build_peft_config
    from micl.config import LoraArgs
    from micl.data.collator import MultimodalCollator
    from micl.modeling.llm import load_llm
    from micl.modeling.multimodal import MultimodalLM
    from micl.modeling.prompting import PromptBuilder
    from test_modeling import example

    torch.manual_seed(0)
    llm, tokenizer = load_llm(tiny_models["llm"])
    config = build_peft_config(LoraArgs(type="moe_lora", dropout=0.0, num_experts=4, top_k=2, routing="sample"))
    model = MultimodalLM.with_adapter(llm, tokenizer, {"image": 12}, config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    builder, collate = PromptBuilder(tokenizer, ""), MultimodalCollator(tokenizer.pad_token_id)
    features = torch.randn(4, 12)
    batches = [collate([example(builder, "describe.", "image", features, target)])
               for target in ("a red circle", "a blue square")]
    assert batches[0]["input_ids"].shape == batches[1]["input_ids"].shape
    prompt_length = int((batches[0]["labels"][0] == -100).sum())
    model.eval()
    with torch.no_grad():
        logits = [model(**{**batch, "logits_to_keep": 0}).logits[:, :prompt_length] for batch in batches]
    # the prompt is the same, so the routing is, so is every logit before the first target token
    torch.testing.assert_close(logits[0], logits[1])
