"""Harmony (micl/methods/harmony.py): feature modulation, alignment loss, phase folders with merged base
weights and the modulator, a tiny 2-task run through the real loop, resume, composition, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import Killed, crashing, REPO, extra_loss_survives_another_forward, tiny_recipe_overrides
from micl.adapters.gated_lora import GatedLoraConfig, gated_lora_layers, low_rank_factors, reset_gated_lora
from micl.cli import main
from micl.data.collator import MultimodalCollator
from micl.errors import ConfigError, MiclError
from micl.hub import finished_phases, phase_payload
from micl.methods import METHODS
from micl.methods.harmony import (PROXIES, FeatureModulator, Harmony, HarmonyArgs, alignment_terms,
                                  hybrid_alignment_loss)
from micl.modeling.llm import load_llm
from micl.modeling.multimodal import MultimodalLM
from micl.run_folder import MODULATOR_FILE, UPDATES_FILE
from micl.modeling.prompting import PromptBuilder
from micl.training.trainer import model_inputs

RECIPE = str(REPO / "recipes" / "harmony.yaml")
TWO_TASKS = "order=[synth_image_caption,synth_audio_qa]"
DIMS = {"image": 12, "audio": 6}


# ---- feature modulation --------------------------------------------------------------------------------
def modulator_with(prototypes=("image",), dim=16, **kwargs):
    modulator = FeatureModulator(dim, **kwargs)
    for i, modality in enumerate(prototypes):
        modulator.set_prototype(modality, torch.full((dim,), float(i + 1)), torch.full((dim,), 0.5))
    return modulator


def test_proxies_shapes_mixing_and_noise():
    modulator = modulator_with()
    pi = modulator.mixing()
    assert pi.shape == (3,) and pi.sum().item() == pytest.approx(1.0) and (pi > 0).all()
    with torch.no_grad():
        modulator.mix_logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
    assert modulator.mixing().sum().item() == pytest.approx(1.0)
    x = torch.randn(2, 5, 16)
    modulator.eval()  # no noise: x + lambda_g * (p - x), deterministic
    proxy = modulator.proxies(x, "image")
    assert proxy.shape == x.shape
    assert torch.allclose(proxy, x + 0.6 * (torch.ones(16) - x))
    assert torch.equal(modulator.proxies(x, "image"), proxy)
    modulator.train()  # noise from the mixture, with gradients into the mixing logits
    noisy = modulator.proxies(x, "image")
    assert noisy.shape == x.shape and not torch.allclose(noisy, proxy)
    noisy.pow(2).sum().backward()
    assert modulator.mix_logits.grad is not None and modulator.mix_logits.grad.abs().sum() > 0


def test_fusion_starts_as_identity_and_only_for_later_modalities():
    modulator = modulator_with(("image", "audio"))
    x = {"image": torch.randn(2, 4, 16), "audio": torch.randn(2, 3, 16), "video": torch.randn(1, 2, 16)}
    out = modulator(x)
    assert all(torch.equal(out[m], x[m]) for m in x)  # gate tanh(0) = 0
    assert modulator.historical("image") == [] and modulator.historical("audio") == ["image"]
    assert modulator.historical("video") == ["image", "audio"]  # learned for the first time now
    with torch.no_grad():
        modulator.fusion_gate.fill_(0.5)
    modulator.eval()
    out = modulator(x)
    assert torch.equal(out["image"], x["image"])  # the first modality is never modulated
    assert not torch.allclose(out["audio"], x["audio"]) and out["audio"].shape == x["audio"].shape
    aux = {}
    modulator(x, aux=aux)
    assert aux == {}  # proxies recorded only in training with gradients
    modulator.train()
    modulator(x, aux=aux)
    assert list(aux[PROXIES]) == ["audio", "video"]
    assert list(aux[PROXIES]["video"]) == ["image", "audio"]


def test_modulator_rebuilds_from_its_config():
    modulator = modulator_with(("image", "audio"), num_components=2, component_scales=[1.0, 3.0], fusion_dim=8)
    clone = FeatureModulator(**modulator.modulator_config())
    clone.load_state_dict(modulator.state_dict())
    assert clone.modalities == ["image", "audio"] and clone.component_scales == [1.0, 3.0]


# ---- alignment loss --------------------------------------------------------------------------------------
def test_alignment_loss_small_when_aligned_positive_otherwise():
    torch.manual_seed(0)
    z = torch.randn(6, 16)
    prototype = torch.randn(16)
    aligned = alignment_terms(z, z.clone(), prototype)
    assert aligned["mse"].item() == 0 and aligned["distribution"].item() == pytest.approx(0, abs=1e-6)
    off = alignment_terms(z, torch.randn(6, 16) * 3 + 1, prototype)
    assert off["mse"] > 0.5 and off["distribution"] > 0.1
    assert off["contrastive"] > aligned["contrastive"] + 1.0  # positives no longer the most similar
    small = hybrid_alignment_loss(z, z.clone(), prototype)
    large = hybrid_alignment_loss(z, torch.randn(6, 16) * 3 + 1, prototype)
    assert 0 <= small < 0.5 < large
    # lambda * (mse + lambda_con * con + lambda_dis * dis), paper weights by default
    y = torch.randn(6, 16) * 3 + 1
    t = alignment_terms(z, y, prototype)
    expected = 1.5 * (t["mse"] + 0.8 * t["contrastive"] + 0.6 * t["distribution"])
    assert hybrid_alignment_loss(z, y, prototype).item() == pytest.approx(expected.item(), rel=1e-6)


def test_alignment_loss_comes_with_the_main_forward_not_the_last_one(tiny_models):
    """`[lwf, harmony]`: the teacher's forward runs between the main forward and harmony's extra_loss; the
    loss reads the proxies from the main forward's outputs, so it does not change (nor vanish)."""
    model = build(tiny_models)
    model.set_media_modulator(modulator_with(("image",), dim=model.llm.get_input_embeddings().embedding_dim))
    outputs, expected, again = extra_loss_survives_another_forward(Harmony(), model, media_batch(model))
    assert list(outputs.aux[PROXIES]) == ["audio"]  # the image is the historical modality
    assert expected is not None and expected.item() > 0
    assert torch.equal(again, expected)


# ---- phase folders: merged base weights + modulator ------------------------------------------------------
def build(tiny_models):
    torch.manual_seed(0)
    llm, tokenizer = load_llm(tiny_models["llm"])
    config = GatedLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return MultimodalLM.with_adapter(llm, tokenizer, DIMS, config, settings={"llm": tiny_models["llm"]})


def train_adapter(model, seed):
    """Stands in for a phase of training: random B and gates."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in gated_lora_layers(model.llm, "default"):
            B = layer.gated_lora_B["default"]
            B.copy_(torch.randn(B.shape, generator=generator) * 0.05)
            layer.gated_lora_gate["default"].fill_(float(seed) / 10)


def media_batch(model):
    builder = PromptBuilder(model.tokenizer, "")
    items = []
    for modality, instruction, target in (("image", "describe.", "a red circle."), ("audio", "what?", "a tone.")):
        features = torch.randn(4, DIMS[modality], generator=torch.Generator().manual_seed(len(items)))
        encoded = builder.encode(instruction, {modality: 4}, target)
        items.append({"input_ids": encoded.input_ids, "labels": encoded.labels, "media_mask": encoded.media_mask,
                      "media": {modality: features}})
    return MultimodalCollator(model.tokenizer.pad_token_id)(items)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def test_phase_folder_reloads_merged_weights_and_modulator(tiny_models, tmp_path):
    model = build(tiny_models)
    batch = media_batch(model)
    original = logits(model, batch)
    for phase in (1, 2):  # two phases folded into the base weights, then a third one live
        train_adapter(model, phase)
        before = logits(model, batch)
        model.merge_low_rank(low_rank_factors(model.llm, "default"))
        reset_gated_lora(model.llm, "default", seed=phase)
        assert torch.allclose(logits(model, batch), before, atol=1e-5)
    train_adapter(model, 3)
    modulator = modulator_with(("image",), dim=model.llm.get_input_embeddings().embedding_dim)
    with torch.no_grad():
        modulator.fusion_gate.fill_(0.7)
    model.set_media_modulator(modulator)
    expected = logits(model, batch)
    assert not torch.allclose(expected, original, atol=1e-3)
    model.save_pretrained(tmp_path / "phase")
    assert (tmp_path / "phase" / UPDATES_FILE).is_file() and (tmp_path / "phase" / MODULATOR_FILE).is_file()
    assert len(load_file(str(tmp_path / "phase" / UPDATES_FILE))) == 2 * 4 * 3  # phases x modules x (up, down, scale)
    spec = json.loads((tmp_path / "phase" / "micl_model.json").read_text())["media_modulator"]
    assert spec["class"] == "micl.methods.harmony:FeatureModulator" and spec["config"]["modalities"] == ["image"]

    loaded = MultimodalLM.from_pretrained(tmp_path / "phase")
    assert torch.equal(logits(loaded, batch), expected)
    assert len(loaded.low_rank_updates) == 2 and isinstance(loaded.media_modulator, FeatureModulator)

    fresh = build(tiny_models)
    fresh.load_phase(tmp_path / "phase")
    assert torch.equal(logits(fresh, batch), expected)
    fresh.load_phase(tmp_path / "phase")  # the same updates already applied: nothing replayed twice
    assert torch.equal(logits(fresh, batch), expected)

    other = build(tiny_models)
    train_adapter(other, 9)
    other.merge_low_rank(low_rank_factors(other.llm, "default"))
    with pytest.raises(MiclError, match="freshly built model"):
        other.load_phase(tmp_path / "phase")


def test_plain_phase_folder_has_no_extra_files(tiny_models, tmp_path):
    model = build(tiny_models)
    model.save_pretrained(tmp_path / "phase")
    assert not (tmp_path / "phase" / UPDATES_FILE).exists() and not (tmp_path / "phase" / MODULATOR_FILE).exists()
    assert "media_modulator" not in json.loads((tmp_path / "phase" / "micl_model.json").read_text())
    loaded = MultimodalLM.from_pretrained(tmp_path / "phase")
    assert loaded.media_modulator is None and loaded.low_rank_updates == []


# ---- through the real loop ---------------------------------------------------------------------------------
class Spy(Harmony):
    """Records, at the end of each phase (after the merge, before evaluation and saving), the logits of
    a fixed batch, and the alignment losses seen while training."""
    name = "harmony"
    logits: dict = {}
    aligned: list = []

    def extra_loss(self, model, batch, outputs, ctx):
        loss = super().extra_loss(model, batch, outputs, ctx)
        Spy.aligned.append((ctx.step, None if loss is None else loss.item()))
        return loss

    def on_task_end(self, ctx):
        super().on_task_end(ctx)
        batch = ctx.collate_fn([ctx.train_dataset[i] for i in range(3)])
        was_training = ctx.model.training
        Spy.logits[ctx.step] = (batch, logits(ctx.model, batch))
        ctx.model.train(was_training)


def run(tiny_models, synth_root, out, *extra):
    return main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), "eval.forward_transfer=false",
                 "lora.dropout=0.0", "train.logging_steps=1", "method_args.harmony.fusion_dim=8", TWO_TASKS, *extra])


@pytest.fixture(scope="module")
def reference(tiny_models, synth_root, tmp_path_factory):
    METHODS["harmony"], Spy.logits, Spy.aligned = Spy, {}, []
    try:
        out = tmp_path_factory.mktemp("harmony") / "reference"
        assert run(tiny_models, synth_root, out) == 0
    finally:
        METHODS["harmony"] = Harmony
    return out, dict(Spy.logits), list(Spy.aligned)


def test_two_task_run_phases_reload_to_the_same_logits(reference):
    out, recorded, aligned = reference
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 2
    # the alignment loss only where there is a historical modality (the image prototype, from step 1 on)
    assert all(loss is None for step, loss in aligned if step == 0)
    assert [loss for step, loss in aligned if step == 1] and all(loss > 0 for step, loss in aligned if step == 1)
    for step, name in ((0, "step_0_synth_image_caption"), (1, "step_1_synth_audio_qa")):
        folder = out / name
        assert (folder / UPDATES_FILE).is_file() and (folder / MODULATOR_FILE).is_file()
        model = MultimodalLM.from_pretrained(folder)
        assert len(model.low_rank_updates) == step + 1  # one merge per finished phase
        batch, expected = recorded[step]
        assert torch.equal(logits(model, batch), expected)
        state = torch.load(folder / "method_state.pt", weights_only=False)[0]
        assert list(state["prototypes"]) == ["image", "audio"][: step + 1] and state["merges"] == step + 1
        assert model.media_modulator.modalities == ["image", "audio"][: step + 1]
        # the saved adapter is the fresh one of the next phase: B = 0 (its effect is in the base weights)
        adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
        assert all(not v.any() for k, v in adapter.items() if "gated_lora_B" in k)
    # a Hub push carries the merged updates and the modulator with the phase
    payload = phase_payload(out, finished_phases(out)[1], "me/harmony")
    assert {UPDATES_FILE, MODULATOR_FILE, "adapter_config.json", "micl_model.json"} <= set(payload)
    # the step-1 folder loaded in place into a freshly built model (as a resumed run does)
    first = MultimodalLM.from_pretrained(out / "step_0_synth_image_caption")
    first.load_phase(out / "step_1_synth_audio_qa")
    assert torch.equal(logits(first, recorded[1][0]), recorded[1][1])


def test_killed_run_resumes_to_the_same_results(reference, tiny_models, synth_root, tmp_path, monkeypatch):
    expected_dir = reference[0]
    out = tmp_path / "killed"
    monkeypatch.setitem(METHODS, "harmony", crashing(Harmony))
    with pytest.raises(Killed):
        run(tiny_models, synth_root, out)
    assert (out / "step_0_synth_image_caption" / "metrics.json").is_file()
    assert not (out / "step_1_synth_audio_qa").exists()
    monkeypatch.setitem(METHODS, "harmony", Harmony)
    assert run(tiny_models, synth_root, out) == 0
    resumed = json.loads((out / "results.json").read_text())
    expected = json.loads((expected_dir / "results.json").read_text())
    assert resumed["steps"][1]["resumed_from"] == "checkpoint-1"
    assert resumed["matrix"] == expected["matrix"]
    assert resumed["steps"][1]["train_loss"] == pytest.approx(expected["steps"][1]["train_loss"], rel=1e-5)
    phase = "step_1_synth_audio_qa"
    for name in (UPDATES_FILE, MODULATOR_FILE, "projectors.safetensors", "adapter/adapter_model.safetensors"):
        got, want = load_file(str(out / phase / name)), load_file(str(expected_dir / phase / name))
        assert got.keys() == want.keys()
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want), name
    assert (out / phase / "predictions.jsonl").read_text() == (expected_dir / phase / "predictions.jsonl").read_text()


def test_composes_with_replay_and_moincl(tiny_models, synth_root, tmp_path):
    out = tmp_path / "composed"
    assert run(tiny_models, synth_root, out, "method=[harmony,replay,moincl]", "data.max_train_samples=4",
               "method_args.moincl.instruction_k=1", "method_args.moincl.pseudo_num=0",
               "method_args.replay.replay_batch_size=2") == 0
    folder = out / "step_1_synth_audio_qa"
    assert json.loads((out / "results.json").read_text())["complete"]
    assert not (folder / "adapter" / "teacher").exists()  # moincl's teacher adapter is never saved
    assert len(MultimodalLM.from_pretrained(folder).low_rank_updates) == 2


@pytest.mark.parametrize("override, message", [
    ("lora.type=lora", "method 'harmony' needs 'lora.type: gated_lora'"),
    ("method_args.harmony.lambda_g=1.5", "method_args.harmony.lambda_g must be in [0, 1]"),
    ("method_args.harmony.component_scales=[1.0]", "method_args.harmony.component_scales needs 3 positive values"),
    ("method_args.harmony.gamma=1", "gamma"),
    ("lora.gate_init=1.0", "'lora.gate_init' must be in (0, 1)"),
])
def test_bad_settings_are_clear_errors(tiny_models, synth_root, tmp_path, capsys, override, message):
    assert run(tiny_models, synth_root, tmp_path / "run", "order=[synth_image_caption]", override) == 2
    assert message in capsys.readouterr().err


def test_args_validation_without_a_run():
    with pytest.raises(ConfigError, match="num_components"):
        Harmony(HarmonyArgs(num_components=0))
    with pytest.raises(ConfigError, match="temperature"):
        Harmony(HarmonyArgs(temperature=0))
    with pytest.raises(ConfigError, match="prototype_samples"):
        Harmony(HarmonyArgs(prototype_samples=0))


def test_prototype_is_pooled_over_phases_of_a_modality():
    class Features(list):
        @property
        def features(self):
            return self

    projector = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        projector.weight.copy_(torch.eye(4))
    model = type("M", (), {"projectors": torch.nn.ModuleDict({"image": projector})})()
    first, second = [torch.randn(3, 4) for _ in range(5)], [torch.randn(3, 4) * 2 + 1 for _ in range(7)]
    method = Harmony()
    for features in (first, second):
        ctx = type("C", (), {"task": type("T", (), {"modality": "image"})(), "train_dataset": Features([{"image": f} for f in features])})()
        method._update_prototype(model, ctx, "image")
    everything = torch.cat(first + second)
    proto = method.prototypes["image"]
    assert proto["count"] == 36
    assert torch.allclose(proto["mean"], everything.mean(0), atol=1e-5)
    assert torch.allclose(proto["std"], everything.std(0, unbiased=False), atol=1e-5)
    restored = Harmony()
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.prototypes["image"]["mean"], proto["mean"])
