"""The moe_lora PEFT tuner (micl/adapters/moe_lora): routing, statistics, freezing, save/load."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import micl.adapters  # noqa: F401  (registers the tuner)
from conftest import REPO
from micl.adapters.moe_lora import MoeLoraConfig, MoeLoraConfigError, MoeLoraLinear, moe_layers
from micl.errors import ConfigError


def tiny_llama(seed=0, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))


def moe_model(routing="token", E=5, k=2, seed=0, **kw):
    from peft import get_peft_model

    llm = tiny_llama(seed)
    config = MoeLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                           num_experts=E, top_k=k, routing=routing, init_weights=False, **kw)
    return get_peft_model(llm, config)


def reference_delta(layer: MoeLoraLinear, x: torch.Tensor, name="default") -> torch.Tensor:
    """Per token, a Python loop over the chosen experts (what the batched GEMMs must equal)."""
    k, scale = layer.top_k[name], layer.scaling[name]
    flat = x.reshape(-1, layer.in_features)
    out = torch.zeros(flat.shape[0], layer.out_features)
    for n, token in enumerate(flat):
        logits = layer.moe_lora_router[name](token)
        top, ids = logits.topk(k)
        weights = torch.softmax(top, -1)
        for w, e in zip(weights, ids.tolist()):
            out[n] += w * scale * (layer.moe_lora_B[name][e] @ (layer.moe_lora_A[name][e] @ token))
    return out.view(*x.shape[:-1], -1)


def single_layer(E=6, k=2, routing="token"):
    torch.manual_seed(1)
    config = MoeLoraConfig(r=3, lora_alpha=6, target_modules=["x"], num_experts=E, top_k=k, routing=routing,
                           init_weights=False)
    return MoeLoraLinear(nn.Linear(16, 12), "default", config)


def test_token_routing_uses_exactly_k_experts_and_matches_a_per_token_loop():
    layer = single_layer(E=6, k=2).eval()
    x = torch.randn(3, 5, 16)
    ids, weights, logits, _, _ = layer._route("default", x, x.reshape(-1, 16))
    assert ids.shape == (15, 2) and all(len(set(row)) == 2 for row in ids.tolist())
    assert torch.allclose(weights.sum(-1), torch.ones(15))
    assert torch.equal(ids, logits.topk(2, -1).indices)
    with torch.no_grad():
        assert torch.allclose(layer._delta("default", x), reference_delta(layer, x), atol=1e-5)
        assert torch.allclose(layer(x), layer.base_layer(x) + reference_delta(layer, x), atol=1e-5)


def test_counts_sum_to_k_times_non_padding_tokens_and_sample_routing_counts_samples():
    ids = torch.randint(1, 64, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    for routing, units in (("token", int(mask.sum())), ("sample", 3)):
        model = moe_model(routing=routing, E=5, k=2)
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        model(input_ids=ids, attention_mask=mask)
        for layer in moe_layers(model).values():
            counts = layer.expert_counts()
            assert int(counts.sum()) == 2 * 2 * units and layer.routed_units() == 2 * units
        model.eval()  # eval-mode forwards (generation, teachers) are not counted
        model(input_ids=ids, attention_mask=mask)
        model.base_model.reset_expert_counts()
        assert all(int(layer.expert_counts().sum()) == 0 for layer in moe_layers(model).values())


def test_sample_routing_routes_every_token_of_a_sample_alike_and_ignores_targets():
    model = moe_model(routing="sample", E=4, k=2).eval()
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    labels[:, 4:] = ids[:, 4:]
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        changed = ids.clone()
        changed[:, 5] = (changed[:, 5] + 1) % 64
        b = model(input_ids=changed, attention_mask=mask, labels=labels).logits
    # the routing only reads the prompt (label -100): changing a target token changes nothing before it
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    # KV-cached decoding reuses the prompt's routing: greedy generate == full forwards over the prompt
    with torch.no_grad():
        prompt = ids[:, :4]
        out = model.generate(input_ids=prompt, attention_mask=mask[:, :4], max_new_tokens=2, do_sample=False)
        lab = torch.full_like(out, -100)
        lab[:, 4:] = out[:, 4:]
        full = model(input_ids=out, attention_mask=torch.ones_like(out), labels=lab).logits
    assert torch.equal(full[:, 3:5].argmax(-1), out[:, 4:6])


def test_load_balancing_loss_on_a_hand_built_case():
    config = MoeLoraConfig(r=1, lora_alpha=1, target_modules=["x"], num_experts=2, top_k=1)
    layer = MoeLoraLinear(nn.Linear(2, 2), "default", config).train()
    with torch.no_grad():
        layer.moe_lora_router["default"].weight.copy_(torch.eye(2))
    # three tokens prefer expert 0 (logits [1, 0]), one prefers expert 1 (logits [0, 1])
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    layer(x)
    p_hi = torch.softmax(torch.tensor([1.0, 0.0]), 0)[0].item()
    f = [0.75, 0.25]
    P = [(3 * p_hi + (1 - p_hi)) / 4, (3 * (1 - p_hi) + p_hi) / 4]
    expected = 2 * (f[0] * P[0] + f[1] * P[1])
    assert layer.balance_loss().item() == pytest.approx(expected, rel=1e-6)
    assert layer.expert_counts().tolist() == [3, 1]
    # perfectly balanced routing gives 1
    layer(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    assert layer.balance_loss().item() == pytest.approx(1.0, rel=1e-6)


def test_frozen_experts_get_no_gradient_and_adamw_with_weight_decay_does_not_move_them():
    from peft import get_peft_model

    model = moe_model(E=4, k=2)
    layers = moe_layers(model)
    for layer in layers.values():
        layer.freeze_experts([0, 2])
    model.set_adapter("default")  # PEFT re-enables gradients of the adapter: frozen experts stay frozen
    frozen = [p for layer in layers.values() for e in (0, 2)
              for p in (layer.moe_lora_A["default"][e], layer.moe_lora_B["default"][e])]
    assert all(not p.requires_grad for p in frozen)
    before = [p.detach().clone() for p in frozen]
    others = [layer.moe_lora_A["default"][1] for layer in layers.values()]
    others_before = [p.detach().clone() for p in others]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(1, 64, (4, 8))
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        assert all(p.grad is None for p in frozen)
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, before))
    assert any(not torch.equal(a, b) for a, b in zip(others, others_before))
    assert next(iter(layers.values())).frozen_experts() == [0, 2]
    del get_peft_model


def test_router_rows_of_frozen_experts_get_no_gradient_and_their_logits_stay():
    """A frozen expert's router row is used detached: exactly zero gradient, unchanged by AdamW (without weight
    decay, micl's default: decoupled decay would shrink any parameter with a gradient; the method writes the rows
    back at every epoch end), so the logit it gets for an input stays as it was while the other rows train."""
    model = moe_model(E=4, k=2)
    layers = moe_layers(model)
    for layer in layers.values():
        layer.freeze_experts([0, 2])
    routers = [layer.moe_lora_router["default"].weight for layer in layers.values()]
    assert all(w.requires_grad for w in routers)  # the router as a whole keeps training
    before = [w.detach().clone() for w in routers]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(1, 64, (4, 8))
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        for w in routers:
            assert w.grad[[0, 2]].abs().sum() == 0 and w.grad[[1, 3]].abs().sum() > 0
        optimizer.step()
    for w, w0 in zip(routers, before):
        assert torch.equal(w[[0, 2]], w0[[0, 2]]) and not torch.equal(w[[1, 3]], w0[[1, 3]])
    layer = next(iter(layers.values()))
    x = torch.randn(5, layer.in_features)
    logits = layer.moe_lora_router["default"](x, layer.moe_lora_frozen["default"])
    torch.testing.assert_close(logits[:, [0, 2]], nn.functional.linear(x, before[0])[:, [0, 2]])


@pytest.mark.parametrize("routing", ["token", "sample"])
def test_gradient_checkpointing_counts_each_token_once_and_recomputes_the_same_routing(tiny_models, routing):
    """Under train.gradient_checkpointing the decoder layers run again in the backward, after the model's
    forward cleared the routing context: without the saved context the recomputation counted every token a
    second time (padding too) and, with sample routing, pooled the whole row and routed differently from the
    forward, so the gradients were those of another function."""
    from micl.adapters import build_peft_config
    from micl.config import LoraArgs
    from micl.data.collator import MultimodalCollator
    from micl.modeling.llm import load_llm
    from micl.modeling.multimodal import MultimodalLM
    from micl.modeling.prompting import PromptBuilder
    from test_modeling import example

    def trained(checkpointing: bool):
        torch.manual_seed(0)
        llm, tokenizer = load_llm(tiny_models["llm"])
        config = build_peft_config(LoraArgs(type="moe_lora", dropout=0.0, num_experts=4, top_k=2, routing=routing))
        model = MultimodalLM.with_adapter(llm, tokenizer, {"image": 12}, config)
        with torch.no_grad():  # a trained adapter: B and the router away from their initial values
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.1)
        if checkpointing:
            model.activation_checkpointing_enable()
        builder = PromptBuilder(tokenizer, "")
        torch.manual_seed(1)
        batch = MultimodalCollator(tokenizer.pad_token_id)([
            example(builder, "describe.", "image", torch.randn(4, 12), "a red circle"),
            example(builder, "describe the picture in a few words.", "image", torch.randn(4, 12), "blue")])
        model.train()
        model(**batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        counts = [layer.expert_counts() for layer in moe_layers(model).values()]
        return grads, counts, batch

    plain_grads, plain_counts, batch = trained(False)
    grads, counts, _ = trained(True)
    units = int(batch["attention_mask"].sum()) if routing == "token" else 2
    assert all(int(c.sum()) == 2 * units for c in counts)
    assert all(torch.equal(a, b) for a, b in zip(counts, plain_counts))
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_save_then_from_pretrained_in_a_fresh_process_gives_identical_logits(tmp_path):
    model = moe_model(routing="token", E=5, k=2, seed=3)
    base_dir = tmp_path / "base"
    tiny_llama(3).save_pretrained(base_dir)
    for layer in moe_layers(model).values():
        layer.freeze_experts([1])
    model.eval()
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOE_LORA" and config["num_experts"] == 5
    torch.save({"ids": ids, "mask": mask, "logits": logits}, tmp_path / "expected.pt")
    script = f"""
import torch, micl.adapters  # registers the tuner with PEFT
torch.set_num_threads({torch.get_num_threads()})  # same kernels' reduction order as the parent: exact equality
from peft import PeftModel
from transformers import AutoModelForCausalLM
from micl.adapters.moe_lora import moe_layers
base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
data = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    logits = model(input_ids=data["ids"], attention_mask=data["mask"]).logits
assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
assert all(layer.frozen_experts() == [1] for layer in moe_layers(model).values())
trainable = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}),
                                      {str(tmp_path / 'adapter')!r}, is_trainable=True)
for layer in moe_layers(trainable).values():
    assert not layer.moe_lora_A["default"][1].requires_grad and not layer.moe_lora_B["default"][1].requires_grad
    assert layer.moe_lora_A["default"][0].requires_grad and layer.moe_lora_router["default"].weight.requires_grad
print("OK")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout


@pytest.mark.parametrize("kwargs, key", [
    (dict(num_experts=2, top_k=3), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(num_experts=0), "num_experts"),
    (dict(routing="layer"), "routing"),
])
def test_bad_settings_are_clear_errors(kwargs, key):
    with pytest.raises(MoeLoraConfigError, match=f"lora.{key}") as info:
        MoeLoraConfig(target_modules=["q_proj"], **kwargs)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_recipe_lora_section_builds_the_config_and_bad_top_k_is_refused():
    from micl.adapters import build_peft_config
    from micl.config import load_recipe

    config = load_recipe(REPO / "recipes" / "moe_adapters.yaml")
    peft_config = build_peft_config(config.lora)
    assert isinstance(peft_config, MoeLoraConfig)
    assert (peft_config.num_experts, peft_config.top_k, peft_config.routing) == (10, 2, "token")
    bad = load_recipe(REPO / "recipes" / "moe_adapters.yaml", ["lora.top_k=11"])
    with pytest.raises(ConfigError, match="top_k"):
        build_peft_config(bad.lora)


def test_not_mergeable():
    model = moe_model()
    with pytest.raises(NotImplementedError, match="routing"):
        model.merge_and_unload()
