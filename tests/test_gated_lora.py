"""The gated LoRA PEFT tuner (micl/adapters/gated_lora): arithmetic, merge, phase folding, save/load."""

import copy
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from peft.utils import PeftType
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import REPO
from micl.adapters import build_peft_config
from micl.adapters.gated_lora import (GatedLoraConfig, GatedLoraLinear, gated_lora_layers, low_rank_factors,
                                      reset_gated_lora)
from micl.config import LoraArgs
from micl.modeling.low_rank import apply_low_rank_update, low_rank_delta

TARGETS = ["q_proj", "v_proj"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def gated(llm, **kwargs):
    """B random too (init_weights=False), so the adapter changes the output."""
    config = GatedLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", init_weights=False,
                             **kwargs)
    return get_peft_model(llm, config)


def set_gates(model, value=0.3):
    with torch.no_grad():
        for i, (_, layer) in enumerate(gated_lora_layers(model, "default")):
            layer.gated_lora_gate["default"].fill_(value + 0.1 * i)


IDS = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 1, 0, 4]])


def test_registered_with_peft():
    assert PeftType("GATED_LORA") is PeftType.GATED_LORA and PeftType.GATED_LORA in list(PeftType)
    config = build_peft_config(LoraArgs(type="gated_lora", r=4, alpha=16, dropout=0.0, target_modules=TARGETS,
                                        gate_init=0.2))
    assert isinstance(config, GatedLoraConfig) and config.peft_type == PeftType.GATED_LORA
    assert (config.r, config.lora_alpha, config.target_modules, config.gate_init) == (4, 16, set(TARGETS), 0.2)


def test_forward_is_w0x_plus_gate_scaling_bax():
    model = gated(tiny_llama())
    set_gates(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, GatedLoraLinear)
    x = torch.randn(3, 5, 32)
    W0 = layer.get_base_layer().weight
    A, B, g = layer.gated_lora_A["default"], layer.gated_lora_B["default"], layer.gated_lora_gate["default"]
    omega, scaling = 2 * torch.sigmoid(g), 8 / 4  # gate_max 2
    by_hand = x @ W0.T + omega * scaling * (x @ A.T @ B.T)
    assert torch.allclose(layer(x), by_hand, atol=1e-6)
    assert not torch.allclose(layer(x), x @ W0.T, atol=1e-3)  # the adapter does something
    # the gate scales the adapter's contribution: omega -> 0 gives the base layer
    with torch.no_grad():
        g.fill_(-60.0)
    assert torch.allclose(layer(x), x @ W0.T, atol=1e-6)
    assert torch.allclose(layer.get_delta_weight("default"), torch.zeros_like(W0), atol=1e-12)


def test_only_adapter_parameters_train_and_the_gate_gets_a_gradient():
    model = gated(tiny_llama())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("gated_lora_" in n for n in trainable)
    assert sum("gated_lora_gate" in n for n in trainable) == 4  # one scalar gate per adapted module
    model(IDS, labels=IDS).loss.backward()
    gate = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.gated_lora_gate.default"]
    assert gate.grad is not None and gate.grad.abs().item() > 0


def test_fresh_adapter_is_the_identity_with_gate_init():
    base = tiny_llama()
    expected = base(IDS).logits
    model = get_peft_model(base, GatedLoraConfig(r=4, target_modules=TARGETS, gate_init=0.25))
    assert torch.equal(model(IDS).logits, expected)  # B = 0
    for _, layer in gated_lora_layers(model, "default"):
        assert layer.gate("default").item() == pytest.approx(0.25)
        assert 2 * torch.sigmoid(layer.gated_lora_gate["default"]).item() == pytest.approx(0.25)


def test_default_gate_starts_at_plain_lora_scale():
    """At step 0 a gated adapter with the default config and the same A and B is plain LoRA: omega = 1."""
    from peft import LoraConfig

    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    model = get_peft_model(tiny_llama(), GatedLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    plain = {n: m for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, layer in gated_lora_layers(model, "default"):
            assert layer.gate("default").item() == 1.0
            layer.gated_lora_A["default"].copy_(plain[name].lora_A["default"].weight)
            layer.gated_lora_B["default"].copy_(plain[name].lora_B["default"].weight)  # random, not zero
    lora.eval(), model.eval()
    expected = lora(IDS).logits
    assert not torch.allclose(expected, tiny_llama()(IDS).logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lora_args", ["defaults", "recipe"])
def test_micl_builds_the_gate_at_plain_lora_scale(lora_args):
    """LoraArgs' default and recipes/harmony.yaml give a fresh gate omega = 1."""
    from micl.config import load_recipe

    args = LoraArgs(type="gated_lora") if lora_args == "defaults" else \
        load_recipe(str(REPO / "recipes" / "harmony.yaml"), []).lora
    model = get_peft_model(tiny_llama(), build_peft_config(args))
    assert all(layer.gate("default").item() == 1.0 for _, layer in gated_lora_layers(model, "default"))


def test_merged_equals_unmerged_and_unmerge_restores():
    model = gated(tiny_llama())
    set_gates(model)
    model.eval()
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight
    original = weight.detach().clone()
    unmerged = model(IDS).logits
    model.merge_adapter()
    assert not torch.equal(weight, original)
    assert torch.allclose(model(IDS).logits, unmerged, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(weight, original, atol=1e-6)
    assert torch.allclose(model(IDS).logits, unmerged, atol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.allclose(merged(IDS).logits, unmerged, atol=1e-5)


def test_merge_includes_the_gate():
    model = gated(tiny_llama())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.gated_lora_gate["default"].fill_(0.7)
    A, B = layer.gated_lora_A["default"], layer.gated_lora_B["default"]
    expected = 2 * torch.sigmoid(torch.tensor(0.7)) * 2.0 * (B @ A)  # omega * scaling
    assert torch.allclose(layer.get_delta_weight("default"), expected, atol=1e-6)


def test_fold_into_base_then_fresh_adapter_keeps_the_output():
    model = gated(tiny_llama())
    set_gates(model)
    model.eval()
    before = model(IDS).logits
    factors = low_rank_factors(model, "default")
    assert all(name.endswith("base_layer.weight") for name in factors) and len(factors) == 4
    apply_low_rank_update(model, factors)
    reset_gated_lora(model, "default", seed=3)
    assert torch.allclose(model(IDS).logits, before, atol=1e-5)
    for _, layer in gated_lora_layers(model, "default"):
        assert not layer.gated_lora_B["default"].any()
        assert layer.gated_lora_gate["default"].item() == pytest.approx(0.0)  # gate_init 1.0 of gate_max 2
        assert not layer.merged  # the adapter itself is live (a fresh one), not "merged"
    # A is redrawn deterministically from the seed
    other = gated(tiny_llama())
    reset_gated_lora(other, "default", seed=3)
    a = [layer.gated_lora_A["default"] for _, layer in gated_lora_layers(model, "default")]
    b = [layer.gated_lora_A["default"] for _, layer in gated_lora_layers(other, "default")]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_low_rank_delta_is_the_merge_formula():
    model = gated(tiny_llama())
    set_gates(model)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    up, down, scale = layer.low_rank_factors("default")
    assert torch.equal(low_rank_delta(up, down, scale), layer.get_delta_weight("default"))


def test_gpt2_conv1d_layers():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    model = get_peft_model(base, GatedLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_weights=False))
    set_gates(model)
    model.eval()
    unmerged = model(IDS).logits
    model.merge_adapter()
    assert torch.allclose(model(IDS).logits, unmerged, atol=1e-5)
    model.unmerge_adapter()
    factors = low_rank_factors(model, "default")
    apply_low_rank_update(model, factors)
    reset_gated_lora(model, "default", seed=0)
    assert torch.allclose(model(IDS).logits, unmerged, atol=1e-5)


def test_second_adapter_as_a_teacher():
    model = gated(tiny_llama())
    model.add_adapter("teacher", copy.deepcopy(model.peft_config["default"]))
    model.set_adapter("teacher")
    model.set_adapter("default")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default" in n for n in trainable)
    model.delete_adapter("teacher")
    assert "teacher" not in model.peft_config
    for _, layer in gated_lora_layers(model, "default"):  # every per-adapter setting goes with the teacher
        assert all("teacher" not in getattr(layer, name) for name in (*layer.adapter_layer_names,
                                                                       *layer.other_param_names))
        assert "teacher" not in layer.gate_logit_init


def test_save_and_load_in_a_fresh_process(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = gated(base)
    set_gates(model)
    model.eval()
    expected = model(IDS).logits.detach()
    model.save_pretrained(tmp_path / "adapter")
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert '"peft_type": "GATED_LORA"' in config
    torch.save(IDS, tmp_path / "ids.pt")
    script = f"""
import micl.adapters, torch  # registers the tuner with PEFT
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
assert type(model.peft_config['default']).__name__ == 'GatedLoraConfig'
torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits.detach(), {str(tmp_path / 'logits.pt')!r})
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_an_adapter_saved_before_gate_max_keeps_its_gate(tmp_path):
    """adapter_config.json without `gate_max` (written when omega was sigmoid(g)) loads with gate_max 1."""
    import json

    from peft import PeftModel

    model = gated(tiny_llama())
    set_gates(model)
    model.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["gate_max"] == 2.0
    del config["gate_max"]
    config["gate_init"] = 0.5
    config_file.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].gate_max == 1.0
    for (_, old), (_, new) in zip(gated_lora_layers(model, "default"), gated_lora_layers(loaded, "default")):
        assert torch.equal(new.gate("default"), torch.sigmoid(old.gated_lora_gate["default"]))


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"gate_init": 2.0}, "gate_init must be in (0, 2)"),
    ({"gate_init": 0.8, "gate_max": 0.5}, "gate_init must be in (0, 0.5)"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GatedLoraConfig(target_modules=TARGETS, **kwargs)


def test_unsupported_layer_is_a_clear_error():
    with pytest.raises(TypeError, match="gated_lora: unsupported layer type Embedding"):
        get_peft_model(tiny_llama(), GatedLoraConfig(target_modules=["embed_tokens"]))
