"""EWC and experience replay: penalty math, Fisher, buffers, determinism, settings, a tiny end-to-end run."""

import io
import json
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import REPO, tiny_recipe_overrides
from micl.cli import main
from micl.config import RecipeConfig, build_dataclass
from micl.data.collator import MultimodalCollator
from micl.data.dataset import EncodedTaskDataset
from micl.data.prompts import load_templates
from micl.data.tasks import get_task, load_task_split
from micl.errors import ConfigError
from micl.methods import METHODS, StepContext, build_methods
from micl.methods.ewc import EWC, EWCArgs, estimate_fisher
from micl.methods.replay import Replay, ReplayArgs, reservoir_sample, stratified_draw
from test_modeling import build


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# ---- settings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,name,key,value", [
    (EWCArgs, "ewc", "lambda_ewc", -1.0),
    (EWCArgs, "ewc", "fisher_samples", 0),
    (EWCArgs, "ewc", "mode", "elastic"),
    (EWCArgs, "ewc", "decay", 0.0),
    (EWCArgs, "ewc", "decay", 1.5),
    (ReplayArgs, "replay", "buffer_size", 0),
    (ReplayArgs, "replay", "replay_batch_size", 0),
    (ReplayArgs, "replay", "weight", -0.5),
])
def test_bad_settings_name_the_key(cls, name, key, value, monkeypatch):
    with pytest.raises(ConfigError, match=f"method_args.{name}.{key}"):
        build_dataclass(cls, {key: value}, "recipe.yaml", f"method_args.{name}.")
    # and through the registry, as a recipe would
    monkeypatch.setitem(METHODS, "ewc", EWC)
    monkeypatch.setitem(METHODS, "replay", Replay)
    config = RecipeConfig(method=["finetune", name], method_args={name: {key: value}})
    with pytest.raises(ConfigError, match=f"method_args.{name}.{key}"):
        build_methods(config, "recipe.yaml")


def test_defaults_and_null_fisher_samples(monkeypatch):
    monkeypatch.setitem(METHODS, "ewc", EWC)
    monkeypatch.setitem(METHODS, "replay", Replay)
    config = RecipeConfig(method=["ewc", "replay"], method_args={"ewc": {"fisher_samples": None, "mode": "separate"}})
    ewc, replay = build_methods(config)
    assert ewc.args == EWCArgs(fisher_samples=None, mode="separate")
    assert (ewc.args.lambda_ewc, ewc.args.decay) == (100.0, 1.0)
    assert replay.args == ReplayArgs(buffer_size=64, replay_batch_size=4, weight=1.0)


# ---- EWC penalty ------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_ewc_penalty_is_zero_at_the_anchor_and_matches_hand_computation():
    model = Tiny()
    ctx = SimpleNamespace(model=model)
    ewc = EWC(EWCArgs(lambda_ewc=3.0))
    assert ewc.extra_loss(model, {}, None, ctx) is None  # nothing learned yet
    fisher = {"a.weight": torch.rand(2, 3), "a.bias": torch.tensor([0.5, 0.0])}
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ewc.load_state_dict({"mode": "online", "terms": [{"task": "t0", "fisher": fisher, "anchor": anchor}]})
    at_anchor = ewc.extra_loss(model, {}, None, ctx)
    assert at_anchor.item() == 0.0

    with torch.no_grad():
        model.a.weight.add_(torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]]))
        model.a.bias.add_(torch.tensor([1.0, 2.0]))
    expected = 1.5 * (float((fisher["a.weight"] * (model.a.weight.detach() - anchor["a.weight"]) ** 2).sum())
                      + 0.5 * 1.0 ** 2 + 0.0 * 2.0 ** 2)
    penalty = ewc.extra_loss(model, {}, None, ctx)
    assert penalty.item() == pytest.approx(expected, rel=1e-6) and penalty.item() > 0
    penalty.backward()  # d/dtheta = lambda * F * (theta - theta*)
    assert torch.allclose(model.a.weight.grad, 3.0 * fisher["a.weight"] * (model.a.weight - anchor["a.weight"]))
    assert model.a.bias.grad.tolist() == pytest.approx([3.0 * 0.5 * 1.0, 0.0])

    # separate mode: one term per task, summed
    sep = EWC(EWCArgs(lambda_ewc=3.0, mode="separate"))
    other = {n: torch.zeros_like(p) for n, p in anchor.items()}
    sep.load_state_dict({"mode": "separate", "terms": [{"task": "t0", "fisher": fisher, "anchor": anchor},
                                                       {"task": "t1", "fisher": fisher, "anchor": other}]})
    second = 1.5 * float(sum((fisher[n] * dict(model.named_parameters())[n].detach() ** 2).sum() for n in fisher))
    assert sep.extra_loss(model, {}, None, ctx).item() == pytest.approx(expected + second, rel=1e-6)
    # lambda 0 switches the penalty off
    off = EWC(EWCArgs(lambda_ewc=0.0))
    off.load_state_dict(ewc.state_dict())
    assert off.extra_loss(model, {}, None, ctx) is None



def test_parameter_frozen_after_its_fisher_is_left_out_and_a_missing_one_is_an_error():
    """e.g. an expert frozen by moe_adapters after EWC estimated its Fisher: it cannot move any more."""
    model = Tiny()
    ctx = SimpleNamespace(model=model)
    ewc = EWC(EWCArgs(lambda_ewc=2.0))
    fisher = {"a.weight": torch.ones(2, 3), "a.bias": torch.ones(2)}
    anchor = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    ewc.load_state_dict({"mode": "online", "terms": [{"task": "t0", "fisher": fisher, "anchor": anchor}]})
    model.a.bias.requires_grad_(False)
    penalty = ewc.extra_loss(model, {}, None, ctx)
    assert penalty.item() == pytest.approx(float((model.a.weight.detach() ** 2).sum()), rel=1e-6)
    gone = EWC(EWCArgs())
    gone.load_state_dict({"mode": "online", "terms": [{"task": "t0", "fisher": {"b.weight": torch.ones(1)},
                                                       "anchor": {"b.weight": torch.zeros(1)}}]})
    with pytest.raises(RuntimeError, match="b.weight"):
        gone.extra_loss(model, {}, None, ctx)

def tiny_task_dataset(model, builder, synth_root, task_name, n=8):
    task = get_task(task_name)
    dims = model.media_dims
    samples = load_task_split(synth_root, task_name, "train", n)
    torch.manual_seed(1)
    features = [{task.modality: torch.randn(4, dims[task.modality])} for _ in samples]
    return task, EncodedTaskDataset(samples, features, builder, load_templates(), train=True, seed=0)


@pytest.fixture
def image_setup(tiny_models, synth_root, tmp_path):
    model, builder = build(tiny_models)
    with torch.no_grad():  # move LoRA B off zero, so LoRA A gets gradients too
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    task, dataset = tiny_task_dataset(model, builder, synth_root, "synth_image_caption")
    ctx = StepContext(step=0, task=task, seen_tasks=[], model=model, train_dataset=dataset, run_dir=str(tmp_path),
                      seed=0, collate_fn=MultimodalCollator(model.tokenizer.pad_token_id))
    return model, builder, ctx


def test_fisher_is_nonnegative_zero_without_gradient_and_state_round_trips(image_setup):
    model, builder, ctx = image_setup
    model.train()
    ewc = EWC(EWCArgs(fisher_samples=4, mode="online", decay=0.5))
    ewc.on_task_end(ctx)
    assert model.training  # train mode is restored
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind
    (term,) = ewc.terms
    fisher = term["fisher"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == set(term["anchor"]) == trainable
    assert all((f >= 0).all() and f.device.type == "cpu" for f in fisher.values())
    audio = [n for n in fisher if n.startswith("projectors.audio.")]
    image = [n for n in fisher if n.startswith("projectors.image.")]
    assert audio and all(not fisher[n].any() for n in audio)  # the image task never uses the audio projector
    assert sum(float(fisher[n].sum()) for n in image) > 0
    assert any(fisher[n].any() for n in fisher if "lora_A" in n)
    assert any(fisher[n].any() for n in fisher if "lora_B" in n)

    # at the anchor the penalty is exactly zero; away from it, positive
    assert ewc.extra_loss(model, {}, None, ctx).item() == 0.0
    lora_b = next(n for n in fisher if "lora_B" in n and fisher[n].any())
    saved = dict(model.named_parameters())[lora_b].detach().clone()
    with torch.no_grad():
        dict(model.named_parameters())[lora_b].add_(0.1)
    moved = ewc.extra_loss(model, {}, None, ctx)
    assert moved.item() > 0 and moved.requires_grad

    # deterministic, and online accumulation: F <- decay * F + F_task (same task, same weights -> 1.5 F)
    with torch.no_grad():
        dict(model.named_parameters())[lora_b].copy_(saved)
    first = {n: f.clone() for n, f in fisher.items()}
    subset = [0, 5]
    once = estimate_fisher(model, ctx.train_dataset, ctx.collate_fn, subset, batch_size=2)
    twice = estimate_fisher(model, ctx.train_dataset, ctx.collate_fn, subset, batch_size=2)
    assert all(torch.equal(once[n], twice[n]) for n in once)
    ewc.on_task_end(ctx)
    assert len(ewc.terms) == 1
    for n in first:
        assert torch.allclose(ewc.terms[0]["fisher"][n], 1.5 * first[n], rtol=1e-5, atol=1e-12)

    # state_dict -> torch.save -> load_state_dict: the penalty is the same
    with torch.no_grad():
        dict(model.named_parameters())[lora_b].add_(0.2)
    restored = EWC(EWCArgs(fisher_samples=4, mode="online", decay=0.5))
    restored.load_state_dict(roundtrip(ewc.state_dict()))
    expected = ewc.extra_loss(model, {}, None, ctx).item()
    assert expected > 0 and restored.extra_loss(model, {}, None, ctx).item() == pytest.approx(expected)
    with pytest.raises(ConfigError, match="method_args.ewc.mode"):
        EWC(EWCArgs(mode="separate")).load_state_dict(ewc.state_dict())


def test_separate_mode_keeps_one_term_per_task(image_setup):
    model, builder, ctx = image_setup
    ewc = EWC(EWCArgs(fisher_samples=4, mode="separate"))
    ewc.on_task_end(ctx)
    ctx.step = 1
    ewc.on_task_end(ctx)
    assert [t["task"] for t in ewc.terms] == ["synth_image_caption", "synth_image_caption"]
    assert ewc.extra_loss(model, {}, None, ctx).item() == 0.0


# ---- replay -----------------------------------------------------------------------------------------
def test_reservoir_sampling_is_deterministic_bounded_and_uniform():
    a = reservoir_sample(50, 8, random.Random("replay:0:1"))
    assert a == reservoir_sample(50, 8, random.Random("replay:0:1"))
    assert a != reservoir_sample(50, 8, random.Random("replay:1:1"))
    assert len(a) == len(set(a)) == 8 and all(0 <= i < 50 for i in a)
    assert reservoir_sample(5, 8, random.Random(0)) == [0, 1, 2, 3, 4]
    counts = [0] * 20
    for trial in range(2000):
        for i in reservoir_sample(20, 5, random.Random(trial)):
            counts[i] += 1
    assert all(400 < c < 600 for c in counts)  # 500 expected for each index


def fake_step(step, name, n, seed=0):
    return SimpleNamespace(step=step, task=SimpleNamespace(name=name), train_dataset=range(n), seed=seed, epoch=0)


def test_buffers_stay_bounded_per_task_and_round_trip():
    replay = Replay(ReplayArgs(buffer_size=5))
    for step, (name, n) in enumerate([("t0", 40), ("t1", 3), ("t2", 100), ("t3", 12)]):
        replay.on_task_end(fake_step(step, name, n))
    assert list(replay.buffers) == ["t0", "t1", "t2", "t3"]
    assert [len(b) for b in replay.buffers.values()] == [5, 3, 5, 5]
    assert replay.buffers["t1"] == [0, 1, 2]
    again = Replay(ReplayArgs(buffer_size=5))
    for step, (name, n) in enumerate([("t0", 40), ("t1", 3), ("t2", 100), ("t3", 12)]):
        again.on_task_end(fake_step(step, name, n))
    assert again.buffers == replay.buffers  # deterministic for a seed
    restored = Replay(ReplayArgs(buffer_size=5))
    restored.load_state_dict(roundtrip(replay.state_dict()))
    assert restored.buffers == replay.buffers and list(restored.buffers) == list(replay.buffers)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7])
def test_replay_draws_are_balanced_across_past_tasks(batch_size):
    buffers = {"t0": list(range(10)), "t1": list(range(10, 20)), "t2": [99]}  # t2's buffer is tiny
    totals = {t: 0 for t in buffers}
    for call in range(300):
        draw = stratified_draw(buffers, batch_size, random.Random(f"0:1:0:{call}"))
        assert len(draw) == batch_size
        counts = {t: sum(1 for task, _ in draw if task == t) for t in buffers}
        assert all(abs(c - batch_size / 3) < 1 for c in counts.values()), counts
        assert all(i in buffers[t] for t, i in draw)
        for t, c in counts.items():
            totals[t] += c
    assert max(totals.values()) - min(totals.values()) <= 0.15 * 300 * batch_size / 3 + 1
    assert stratified_draw(buffers, 4, random.Random(5)) == stratified_draw(buffers, 4, random.Random(5))
    assert stratified_draw({}, 4, random.Random(0)) == []


def replay_loss(replay, model, batch, ctx):
    """weight * mean CE of the replay mini-batch drawn for `batch`, the way the trainer gets it (None: empty)."""
    augmented = replay.augment_batch(batch, ctx)
    losses = list(replay.auxiliary_losses(model, augmented, ctx))
    return losses[0].value / replay.count_loss_items(augmented)["replay"] if losses else None


def test_replay_loss_is_deterministic_per_batch_not_per_call(tiny_models, synth_root, tmp_path):
    model, builder = build(tiny_models)
    model.eval()  # no dropout: equal draws give equal losses
    datasets = {}
    for name in ("synth_image_caption", "synth_audio_qa"):
        task, datasets[name] = tiny_task_dataset(model, builder, synth_root, name)
    collate = MultimodalCollator(model.tokenizer.pad_token_id)

    def ctx_for(step, task_name):
        return StepContext(step=step, task=get_task(task_name), seen_tasks=[get_task(n) for n in list(datasets)[:step]],
                           model=model, train_dataset=datasets[task_name], run_dir=str(tmp_path), seed=0,
                           dataset_fn=lambda spec, split: datasets[spec.name], collate_fn=collate)

    replay = Replay(ReplayArgs(buffer_size=3, replay_batch_size=2))
    first = ctx_for(0, "synth_image_caption")
    batch = collate([datasets["synth_image_caption"][i] for i in (0, 1)])
    replay.on_task_start(first)
    assert replay_loss(replay, model, batch, first) is None  # empty buffer
    replay.on_task_end(first)
    assert len(replay.buffers["synth_image_caption"]) == 3

    second = ctx_for(1, "synth_audio_qa")
    replay.on_task_start(second)
    batch = collate([datasets["synth_audio_qa"][i] for i in (2, 5)])
    loss = replay_loss(replay, model, batch, second)
    assert loss.ndim == 0 and loss.item() > 0 and loss.requires_grad
    other = collate([datasets["synth_audio_qa"][i] for i in (3, 4)])
    for _ in range(3):
        replay_loss(replay, model, other, second)
    # a fresh instance (as after a resume) draws the same replay samples for the same training batch
    resumed = Replay(ReplayArgs(buffer_size=3, replay_batch_size=2))
    resumed.load_state_dict(roundtrip(replay.state_dict()))
    resumed.on_task_start(second)
    replay_loss(resumed, model, other, second)  # a different number of calls before the same batch
    assert replay_loss(resumed, model, batch, second).item() == pytest.approx(loss.item(), rel=1e-6)
    assert datasets["synth_image_caption"].epoch == 0  # replay leaves the shared dataset's epoch alone


# ---- end to end -------------------------------------------------------------------------------------
def test_two_task_run_with_ewc_and_replay(tiny_models, synth_root, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "ewc", EWC)
    monkeypatch.setitem(METHODS, "replay", Replay)
    out = tmp_path / "run"
    assert main(["train", str(REPO / "recipes" / "finetune.yaml"), *tiny_recipe_overrides(tiny_models, synth_root, out),
                 "order=[synth_image_caption,synth_audio_qa]", "method=[finetune,ewc,replay]",
                 "method_args.ewc.fisher_samples=4", "method_args.replay.buffer_size=3",
                 "method_args.replay.replay_batch_size=2", "eval.forward_transfer=false"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    _, ewc0, replay0 = torch.load(out / "step_0_synth_image_caption" / "method_state.pt", weights_only=False)
    (term,) = ewc0["terms"]
    assert term["task"] == "synth_image_caption"
    fisher = term["fisher"]
    assert all(not f.any() for n, f in fisher.items() if n.startswith("projectors.audio."))
    assert any(f.any() for n, f in fisher.items() if n.startswith("projectors.image."))
    assert replay0 == {"buffers": [["synth_image_caption", replay0["buffers"][0][1]]]}
    _, ewc1, replay1 = torch.load(out / "step_1_synth_audio_qa" / "method_state.pt", weights_only=False)
    assert len(ewc1["terms"]) == 1 and ewc1["terms"][0]["task"] == "synth_audio_qa"  # online: one term
    assert any(f.any() for n, f in ewc1["terms"][0]["fisher"].items() if n.startswith("projectors.audio."))
    assert [t for t, _ in replay1["buffers"]] == ["synth_image_caption", "synth_audio_qa"]
    assert all(len(indices) == 3 for _, indices in replay1["buffers"])
