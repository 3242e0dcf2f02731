"""Harmony (micl/methods/harmony.py): feature modulation, alignment loss, phase folders with merged base
weights and the modulator, a tiny 2-task run through the real loop, resume, composition, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import Killed, crashing, REPO, tiny_recipe_overrides
from micl.adapters.gated_lora import GatedLoraConfig, gated_lora_layers, low_rank_factors, reset_gated_lora
from micl.cli import main
from micl.data.collator import MultimodalCollator
from micl.errors import ConfigError, MiclError
from micl.hub import finished_phases, phase_payload
from micl.methods import METHODS
from micl.methods.harmony import (FeatureModulator, Harmony, HarmonyArgs, alignment_terms, historical_proxy, kmeans,
                                  prototype_bank)
from micl.modeling.llm import load_llm
from micl.modeling.multimodal import MultimodalLM
from micl.run_folder import MODULATOR_FILE, UPDATES_FILE
from micl.modeling.prompting import PromptBuilder
from micl.methods.base import TokenSum
from micl.training.trainer import model_inputs

RECIPE = str(REPO / "recipes" / "harmony.yaml")
TWO_TASKS = "order=[synth_image_caption,synth_audio_qa]"
DIMS = {"image": 12, "audio": 6}


# ---- prototypes: clusters of an old task's pooled media tokens -------------------------------------------
class Task:
    name, task_type, modality = "synth_image_caption", "caption", "image"


def blobs(seed=0, per=6, tokens=4, dim=16, centres=((5.0, 0.0), (-5.0, 3.0), (0.0, -6.0))):
    """Media tokens of len(centres) well separated groups of samples, with a per-position token layout."""
    generator = torch.Generator().manual_seed(seed)
    layout = torch.randn(tokens, dim, generator=generator)
    layout -= layout.mean(0)
    groups, samples = [], []
    for g, (a, b) in enumerate(centres):
        centre = torch.zeros(dim)
        centre[0], centre[1] = a, b
        noise = torch.randn(per, tokens, dim, generator=generator) * 0.1
        groups.append(centre + layout + noise)
        samples += [{"instruction": f"q{g}.{i}", "target": f"answer {g}"} for i in range(per)]
    return torch.cat(groups), samples, layout


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    points = torch.cat([torch.randn(5, 3) * 0.1 + c for c in (torch.tensor([4.0, 0, 0]), torch.tensor([0, 4.0, 0]))])
    assignment = kmeans(points, 2, seed=3)
    assert assignment.tolist() == [0] * 5 + [1] * 5  # renumbered by first appearance
    assert torch.equal(kmeans(points, 2, seed=3), assignment) and torch.equal(kmeans(points, 2, seed=7), assignment)
    assert kmeans(torch.ones(4, 3), 3, seed=0).tolist() == [0, 0, 0, 0]  # fewer distinct points than k


def test_prototype_bank_has_one_prototype_per_cluster():
    tokens, samples, layout = blobs()
    bank = prototype_bank({"image": tokens}, samples, Task, num_prototypes=3, num_texts=2, seed=0)
    assert bank["streams"] == ["image"] and bank["sizes"].tolist() == [6, 6, 6]
    centres = bank["centres"]["image"]
    assert centres.shape == (3, 16)
    expected = torch.stack([tokens[g * 6:(g + 1) * 6].mean((0, 1)) for g in range(3)])
    torch.testing.assert_close(centres, expected)
    assert (centres[:, :2] - torch.tensor([[5.0, 0.0], [-5.0, 3.0], [0.0, -6.0]])).abs().max() < 0.2
    torch.testing.assert_close(bank["layout"]["image"], layout, atol=0.05, rtol=0)  # the token layout
    assert (bank["spread"]["image"] < 0.2).all() and (bank["spread"]["image"] > 0.05).all()  # within-cluster only
    # each cluster keeps the prompts of its own members, nearest the centre first
    assert [{t[1] for t in texts} for texts in bank["texts"]] == [{"answer 0"}, {"answer 1"}, {"answer 2"}]
    assert all(len(texts) == 2 for texts in bank["texts"])
    again = prototype_bank({"image": tokens}, samples, Task, num_prototypes=3, num_texts=2, seed=0)
    assert torch.equal(again["centres"]["image"], centres) and again["texts"] == bank["texts"]  # deterministic


def test_proxies_are_drawn_around_their_cluster_prototype():
    tokens, samples, _ = blobs()
    bank = prototype_bank({"image": tokens}, samples, Task, num_prototypes=3, num_texts=1, seed=0)
    centres, spread, layout = bank["centres"]["image"], bank["spread"]["image"], bank["layout"]["image"]
    base = torch.randn(1, 4, 16)
    for c in range(3):
        exact = historical_proxy(base, centres[c] + layout, spread[c], lambda_g=1.0)
        torch.testing.assert_close(exact[0], centres[c] + layout)  # lambda_g = 1: the prototype itself
        weights = torch.tensor([0.5, 1.0, 2.0]) / 3
        z = torch.randn(3, 256, 4, 16, generator=torch.Generator().manual_seed(c))
        draws = historical_proxy(base.expand(256, -1, -1), centres[c] + layout, spread[c], 0.6, weights, z)
        pooled = draws.mean(1)
        nearest = torch.cdist(pooled, centres).argmin(1)
        assert (nearest == c).all()  # every draw is nearer its own cluster's prototype than any other
        torch.testing.assert_close(draws.mean(0), base[0] + 0.6 * (centres[c] + layout - base[0]), atol=0.02, rtol=0)


# ---- token-level bridging ------------------------------------------------------------------------------
def bank_for(task_name, stream, clusters=2, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"task": task_name, "task_type": "caption", "modality": stream, "streams": [stream],
            "centres": {stream: torch.randn(clusters, dim, generator=generator)},
            "spread": {stream: torch.rand(clusters, dim, generator=generator)},
            "layout": {stream: torch.zeros(4, dim)}, "sizes": torch.ones(clusters, dtype=torch.long),
            "texts": [[["", "a caption"]]] * clusters}


def modulator_with(banks=(("image_task", "image"),), dim=16, **kwargs):
    modulator = FeatureModulator(dim, **kwargs)
    modulator.set_banks([bank_for(name, stream, dim=dim, seed=i) for i, (name, stream) in enumerate(banks)])
    return modulator


def test_fusion_starts_as_identity_and_only_for_later_modalities():
    modulator = modulator_with((("image_task", "image"), ("audio_task", "audio")))
    assert modulator.historical("image") == [] and modulator.historical("audio") == [0]
    assert modulator.historical("video") == [0, 1]  # learned for the first time now
    for modality in ("audio", "video"):
        modulator.add_fusion(modality)
    x = {"image": torch.randn(2, 4, 16), "audio": torch.randn(2, 3, 16), "video": torch.randn(1, 2, 16)}
    out = modulator(x)
    assert all(torch.equal(out[m], x[m]) for m in x)  # gates tanh(0) = 0
    assert modulator.pooled_proxies(x["video"], "video").shape == (1, 4, 16)  # 2 banks x 2 clusters
    modulator.eval()
    torch.testing.assert_close(modulator.pooled_proxies(x["audio"], "audio"),  # no noise at evaluation
                               x["audio"].mean(1, keepdim=True) * 0.4 + 0.6 * modulator.bank0_image_centres[None])
    with torch.no_grad():
        modulator.fusions["audio"].gate.fill_(0.5)
    out = modulator(x)
    assert torch.equal(out["image"], x["image"]) and torch.equal(out["video"], x["video"])
    assert not torch.allclose(out["audio"], x["audio"]) and torch.equal(modulator(x)["audio"], out["audio"])
    modulator.train()  # the mixing coefficients learn through the fusion (noise from the learned mixture)
    modulator(x)["audio"].pow(2).sum().backward()
    assert modulator.mix_logits.grad is not None and modulator.mix_logits.grad.abs().sum() > 0
    pi = modulator.mixing()
    assert pi.shape == (3,) and pi.sum().item() == pytest.approx(1.0)


def test_modulator_rebuilds_from_its_config():
    modulator = modulator_with((("image_task", "image"), ("audio_task", "audio")), num_components=2,
                               component_scales=[1.0, 3.0], fusion_dim=8)
    modulator.add_fusion("audio")
    clone = FeatureModulator(**modulator.modulator_config())
    clone.load_state_dict(modulator.state_dict())
    assert clone.banks == modulator.banks and list(clone.fusions) == ["audio"] and clone.component_scales == [1.0, 3.0]
    assert torch.equal(clone.bank1_audio_centres, modulator.bank1_audio_centres)
    with pytest.raises(MiclError, match="earlier micl"):
        FeatureModulator(16, modalities=["image"])  # a phase folder of the one-prototype-per-modality Harmony


# ---- alignment loss --------------------------------------------------------------------------------------
def test_alignment_terms_vanish_at_the_teacher_and_pull_towards_it():
    torch.manual_seed(0)
    teacher = torch.randn(6, 16)
    at = alignment_terms(teacher.clone(), teacher)
    assert all(v.item() == pytest.approx(0, abs=1e-6) for v in at.values())
    near = torch.cat([teacher[:3], teacher[:3] + 1e-3])  # near-duplicates: still zero at the teacher
    assert alignment_terms(near.clone(), near)["contrastive"].item() == pytest.approx(0, abs=1e-6)
    student = (teacher + torch.randn(6, 16)).requires_grad_()
    start = (student - teacher).norm().item()
    off = alignment_terms(student, teacher)
    assert all(v.item() > 1e-3 for v in off.values())
    optimizer = torch.optim.SGD([student], lr=5.0)
    for _ in range(100):  # descending the sum of the terms moves the student to the teacher
        optimizer.zero_grad()
        sum(alignment_terms(student, teacher).values()).backward()
        optimizer.step()
    assert (student - teacher).norm().item() < 0.2 * start


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
    modulator = modulator_with(dim=model.llm.get_input_embeddings().embedding_dim)
    modulator.add_fusion("audio")
    with torch.no_grad():
        modulator.fusions["audio"].gate.fill_(0.7)
    model.set_media_modulator(modulator)
    expected = logits(model, batch)
    assert not torch.allclose(expected, original, atol=1e-3)
    model.save_pretrained(tmp_path / "phase")
    assert (tmp_path / "phase" / UPDATES_FILE).is_file() and (tmp_path / "phase" / MODULATOR_FILE).is_file()
    assert len(load_file(str(tmp_path / "phase" / UPDATES_FILE))) == 2 * 4 * 3  # phases x modules x (up, down, scale)
    spec = json.loads((tmp_path / "phase" / "micl_model.json").read_text())["media_modulator"]
    assert spec["class"] == "micl.methods.harmony:FeatureModulator" and spec["config"]["fused"] == ["audio"]
    assert spec["config"]["banks"] == [{"task": "image_task", "streams": ["image"], "clusters": 2}]

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
    """Records, at the end of each phase (after the merge, before evaluation and saving), the logits of a fixed
    batch; the alignment loss of every batch; the proxy inputs of every batch with the teacher's logits on
    them."""
    name = "harmony"
    logits: dict = {}
    aligned: list = []
    proxies: list = []

    def auxiliary_losses(self, model, batch, ctx):
        if "harmony" in batch:
            inputs = self.proxy_inputs(ctx, batch)
            Spy.proxies.append((ctx.step, inputs, self.teacher.logits(inputs)))
        for losses in super().auxiliary_losses(model, batch, ctx):
            Spy.aligned.append((ctx.step, sum(float((part.value if isinstance(part, TokenSum) else part).detach())
                                              for part in losses)))
            yield losses

    def on_task_end(self, ctx):
        super().on_task_end(ctx)
        batch = ctx.collate_fn([ctx.train_dataset[i] for i in range(3)])
        was_training = ctx.model.training
        Spy.logits[ctx.step] = (batch, logits(ctx.model, batch))
        ctx.model.train(was_training)


def run(tiny_models, synth_root, out, *extra):
    return main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), "eval.forward_transfer=false",
                 "lora.dropout=0.0", "train.logging_steps=1", "method_args.harmony.fusion_dim=8",
                 "method_args.harmony.num_prototypes=3", "train.warmup_ratio=0", "train.epochs=2", TWO_TASKS, *extra])


def spied_run(out, *args):
    METHODS["harmony"], Spy.logits, Spy.aligned, Spy.proxies = Spy, {}, [], []
    try:
        assert run(*args[:2], out, *args[2:]) == 0
    finally:
        METHODS["harmony"] = Harmony
    return out, dict(Spy.logits), list(Spy.aligned), list(Spy.proxies)


@pytest.fixture(scope="module")
def reference(tiny_models, synth_root, tmp_path_factory):
    return spied_run(tmp_path_factory.mktemp("harmony") / "reference", tiny_models, synth_root)


def test_two_task_run_phases_reload_to_the_same_logits(reference):
    out, recorded, aligned, _ = reference
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 2
    # the alignment only once a finished task has prototypes (from step 1 on), on every batch of it
    assert [step for step, _ in aligned] == [1] * 4  # 2 epochs x 2 batches
    for step, name in ((0, "step_0_synth_image_caption"), (1, "step_1_synth_audio_qa")):
        folder = out / name
        assert (folder / UPDATES_FILE).is_file() and (folder / MODULATOR_FILE).is_file()
        model = MultimodalLM.from_pretrained(folder)
        assert len(model.low_rank_updates) == step + 1  # one merge per finished phase
        batch, expected = recorded[step]
        assert torch.equal(logits(model, batch), expected)
        state = torch.load(folder / "method_state.pt", weights_only=True)[0]
        tasks = ["synth_image_caption", "synth_audio_qa"][: step + 1]
        assert [b["task"] for b in state["banks"]] == tasks and state["merges"] == step + 1
        assert all(len(b["sizes"]) == 3 and b["sizes"].sum() == 8 for b in state["banks"])  # 3 clusters of 8 samples
        assert [b["task"] for b in model.media_modulator.banks] == tasks
        assert list(model.media_modulator.fusions) == ["audio"][:step]  # audio is bridged to the image task
        torch.testing.assert_close(model.media_modulator.bank0_image_centres, state["banks"][0]["centres"]["image"])
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


def test_proxies_go_through_the_previous_phase_model(reference):
    """The teacher of step 1 is the model of the saved step-0 phase (base weights with step 0's merge), its
    inputs are the image task's prompts with image-shaped proxies, and the alignment starts at zero."""
    out, _, aligned, proxies = reference
    previous = MultimodalLM.from_pretrained(out / "step_0_synth_image_caption").eval()
    for step, inputs, teacher_logits in proxies:
        assert step == 1 and set(inputs["media_tokens"]) == {"image"}
        assert inputs["media_tokens"]["image"].shape == (4, 4, 64)  # proxy_num rows x the image's 4 tokens
        with torch.no_grad():
            torch.testing.assert_close(previous(**inputs).logits, teacher_logits, rtol=1e-5, atol=1e-5)
    text = previous.tokenizer.decode(proxies[0][1]["input_ids"][0])
    assert "image: " in text  # the old task's prompt, with the proxy as its image
    # the first batch: the student (merged base + fresh adapter) is the teacher; then it has moved
    assert aligned[0][1] == pytest.approx(0, abs=1e-6) and all(loss > 1e-4 for _, loss in aligned[1:])


def test_alignment_keeps_the_model_closer_to_the_previous_phase(reference, tiny_models, synth_root, tmp_path):
    """The same run without the alignment (lambda_align 0): its final model drifts further from the step-0
    model on the old task's proxies."""
    out, _, _, proxies = reference
    unaligned = tmp_path / "unaligned"
    assert run(tiny_models, synth_root, unaligned, "method_args.harmony.lambda_align=0") == 0
    previous = MultimodalLM.from_pretrained(out / "step_0_synth_image_caption").eval()

    def drift(run_dir):
        final = MultimodalLM.from_pretrained(run_dir / "step_1_synth_audio_qa").eval()
        total = 0.0
        with torch.no_grad():
            for _, inputs, _ in proxies:
                before, after = previous(**inputs).logits, final(**inputs).logits
                total += float(torch.nn.functional.kl_div(after.log_softmax(-1), before.log_softmax(-1),
                                                          log_target=True, reduction="batchmean"))
        return total

    assert drift(out) < drift(unaligned)


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
    ("lora.gate_init=2.0", "'lora.gate_init' must be in (0, 2)"),
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
    with pytest.raises(ConfigError, match="num_prototypes"):
        Harmony(HarmonyArgs(num_prototypes=0))
    with pytest.raises(ConfigError, match="proxy_num"):
        Harmony(HarmonyArgs(proxy_num=-1))


def test_banks_survive_the_method_state_file(tmp_path):
    tokens, samples, _ = blobs()
    method = Harmony()
    method.banks = [prototype_bank({"image": tokens}, samples, Task, 3, 2, seed=0)]
    torch.save([method.state_dict()], tmp_path / "method_state.pt")
    restored = Harmony()
    restored.load_state_dict(torch.load(tmp_path / "method_state.pt", weights_only=True)[0])
    assert restored.banks[0]["texts"] == method.banks[0]["texts"]
    assert torch.equal(restored.banks[0]["centres"]["image"], method.banks[0]["centres"]["image"])
    with pytest.raises(MiclError, match="earlier micl"):
        restored.load_state_dict({"prototypes": {"image": {}}, "merges": 1})  # one prototype per modality
