"""Samples with two media (a video and its sound) and the adaptive fusion module / method."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import Killed, crashing, REPO, extra_loss_survives_another_forward, tiny_recipe_overrides
from micl.adapters import build_peft_config
from micl.cli import main
from micl.config import LoraArgs
from micl.data.collator import MultimodalCollator
from micl.errors import ConfigError
from micl.evaluation.continual import mcil_metrics
from micl.methods import METHODS
from micl.methods.adaptive_fusion import (AdaptiveFusionArgs, AdaptiveFusionMethod, per_row_cross_entropy,
                                          row_representations, similarity_weights)
from micl.methods.base import TokenSum
from micl.modeling.fusion import (DECISIONS, GATE_SPACE, POOLED, AdaptiveFusion, TaskExperts, infonce,
                                  normalized_infonce_mi, pearson)
from micl.modeling.llm import load_llm
from micl.modeling.multimodal import MultimodalLM, model_inputs
from micl.modeling.prompting import PromptBuilder

RECIPE = str(REPO / "recipes" / "adaptive_fusion.yaml")
DIMS = {"image": 12, "video": 10, "audio": 6}


def tokens_with_correlation(r_target: float, dim: int = 32, tokens: int = 3, seed: int = 0):
    """Video and audio tokens [1, tokens, dim] whose token means have Pearson correlation r_target."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    a, b = a - a.mean(), b - b.mean()
    b = b - (a @ b) / (a @ a) * a  # orthogonal to a: correlation 0
    pooled_v, pooled_a = a, r_target * a / a.norm() + (1 - r_target ** 2) ** 0.5 * b / b.norm()
    noise = torch.randn(tokens, dim, generator=g)
    noise = noise - noise.mean(0)  # keeps the token means
    return (pooled_v + noise)[None], (pooled_a + noise)[None]


def identity_gate_space(fusion, task="t"):
    """The task's gate heads set to the identity, so r is the Pearson r of the pooled tokens themselves."""
    with torch.no_grad():
        for head in fusion.gate_of(task).heads:
            head.weight.copy_(torch.eye(head.weight.shape[0], head.weight.shape[1]))
    return fusion


def fusion_for(task="t", dim=32, **kwargs):
    return identity_gate_space(AdaptiveFusion(dim, tasks=[task], fusion_tasks=[task], gate_dim=dim, **kwargs), task)


def fuse_one(fusion, video, audio, task="t", aux=None):
    rows = {"video": torch.tensor([0]), "audio": torch.tensor([0])}
    return fusion({"video": video, "audio": audio}, rows, [task], aux)


def test_pearson_matches_numpy():
    x, y = torch.randn(4, 50), torch.randn(4, 50)
    y[1] = 2 * x[1] + 3
    expected = [np.corrcoef(a, b)[0, 1] for a, b in zip(x.numpy(), y.numpy())]
    assert torch.allclose(pearson(x, y), torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert pearson(x, y)[1].item() == pytest.approx(1.0, abs=1e-5)


def test_infonce_bounds_the_mutual_information():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g)
    independent = torch.randn(16, 32, generator=g)
    assert infonce(x, x + 0.1 * independent) < infonce(x, independent)  # matched pairs: a lower loss
    assert normalized_infonce_mi(x, x, temperature=0.05) == pytest.approx(1.0, abs=0.01)  # the ceiling log n
    assert normalized_infonce_mi(x, independent) < 0.15
    assert math.log(16) - float(infonce(x, x + 0.1 * independent)) > 1.0  # the lower bound itself, in nats


# ---- the incremental feature extractor --------------------------------------------------------------------
def test_task_experts_route_top_k_and_a_new_expert_starts_as_identity():
    torch.manual_seed(0)
    experts = TaskExperts(16, bottleneck=8, top_k=2)
    for _ in range(3):
        experts.add()
    x = torch.randn(5, 4, 16)
    assert torch.equal(experts(x, [0, 1, 2, None, 2]), x)  # zero-initialised up-projections
    gates = experts.gates(x.mean(1), 2)
    assert gates.shape == (5, 3) and ((gates > 0).sum(-1) == 2).all() and torch.allclose(gates.sum(-1), torch.ones(5))
    assert (gates[:, 2] > 0).all()  # the task's own expert is chosen at the start (router bias 1)
    with torch.no_grad():
        for expert in experts.experts:
            expert.up.weight.normal_()
    out = experts(x, [0, 1, 2, None, 2])
    assert torch.equal(out[3], x[3])  # no task: passed through
    for row, index in ((0, 0), (1, 1), (2, 2), (4, 2)):
        g = experts.gates(x[row:row + 1].mean(1), index)[0]
        expected = x[row] + sum(g[e] * experts.experts[e](x[row]) for e in range(index + 1))
        assert torch.allclose(out[row], expected, atol=1e-6)
        assert not torch.allclose(out[row], x[row])


def test_only_the_current_task_expert_and_router_learn(tiny_models):
    """The method's freezing: on task b's start only b's expert and router (and gate) require gradients, and a
    training step leaves task a's parts bit-identical while b's change."""
    model, _ = build(tiny_models)
    method = AdaptiveFusionMethod()

    class Ctx:
        def __init__(self, name, modality):
            self.model, self.task = model, type("Task", (), {"name": name, "modality": modality})()

    method.on_task_start(Ctx("a", "audio_video"))
    fusion = model.media_modulator
    with torch.no_grad():
        fusion.extractor.experts[0].up.weight.normal_()
    method.on_task_start(Ctx("b", "video"))
    trainable = {id(p) for p in fusion.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in fusion.task_parameters("b")} and trainable
    before = {k: v.clone() for k, v in fusion.state_dict().items()}
    tokens = torch.randn(2, 3, 64, requires_grad=False)
    out = fusion({"video": tokens}, {"video": torch.tensor([0, 1])}, ["a", "b"])["video"]
    out.pow(2).sum().backward()
    torch.optim.SGD([p for p in fusion.parameters() if p.requires_grad], lr=0.1).step()
    after = fusion.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if ".0." in k)  # task a's expert, router, gate
    assert not torch.equal(before["extractor.experts.1.up.weight"], after["extractor.experts.1.up.weight"])


# ---- the audio-visual gate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("r_target", [0.3, 0.8, 0.95])
def test_hard_gate_switches_at_the_threshold(r_target):
    video, audio = tokens_with_correlation(r_target)
    r = pearson(video.mean(1), audio.mean(1)).item()
    assert r == pytest.approx(r_target, abs=1e-4)
    fusion = fusion_for(threshold=0.8)
    with torch.no_grad():
        fusion.router("t").bias.copy_(torch.tensor([0.5, -0.5]))  # video weighs more: w = (0.731, 0.269)
    w = torch.softmax(torch.tensor([0.5, -0.5]), 0)

    fusion.threshold = r - 1e-4  # r at or above the threshold: both media, scaled by 2w
    aux = {}
    out = fuse_one(fusion, video, audio, aux=aux)
    assert bool(aux[DECISIONS]["fuse"][0]) and aux[DECISIONS]["r"][0].item() == pytest.approx(r, abs=1e-5)
    assert torch.allclose(out["video"], video * 2 * w[0]) and torch.allclose(out["audio"], audio * 2 * w[1])

    fusion.threshold = r + 1e-4  # below: the stronger medium (video) alone, the other zeroed
    out = fuse_one(fusion, video, audio, aux=aux)
    assert not bool(aux[DECISIONS]["fuse"][0])
    assert torch.equal(out["video"], video) and torch.equal(out["audio"], torch.zeros_like(audio))

    with torch.no_grad():  # the router decides which medium is the stronger one
        fusion.router("t").bias.copy_(torch.tensor([-0.5, 0.5]))
    out = fuse_one(fusion, video, audio)
    assert torch.equal(out["audio"], audio) and torch.equal(out["video"], torch.zeros_like(video))


def test_gate_reads_r_in_the_task_gate_space():
    """r is the correlation of head_v(p_v) and head_a(p_a), not of the pooled tokens: a pair uncorrelated in
    the token space is fused once the heads map both onto a common direction."""
    video, audio = tokens_with_correlation(0.1)
    fusion = fusion_for(threshold=0.8)
    aux = {}
    fuse_one(fusion, video, audio, aux=aux)
    assert not bool(aux[DECISIONS]["fuse"][0])
    with torch.no_grad():
        pv, pa = video.mean(1)[0], audio.mean(1)[0]
        direction = torch.randn(32)
        heads = fusion.gate_of("t").heads
        heads[0].weight.copy_(torch.outer(direction, pv) / pv.dot(pv))
        heads[1].weight.copy_(torch.outer(direction, pa) / pa.dot(pa))
    fuse_one(fusion, video, audio, aux=aux)
    assert bool(aux[DECISIONS]["fuse"][0]) and aux[DECISIONS]["r"][0].item() == pytest.approx(1.0, abs=1e-5)


def test_alignment_loss_trains_the_gate_space_until_pairs_are_fused():
    """The method's 1 - r term: reaches the heads only (not the tokens), and minimising it takes held-out pairs
    of two independent media past r = 0.8 (fused), while a sound replaced by noise stays below (alone)."""
    torch.manual_seed(0)
    dim = 48
    mean_v, mean_a = torch.randn(dim), torch.randn(dim)

    def pairs(n):
        return (mean_v + torch.randn(n, 2, dim)), (mean_a + torch.randn(n, 2, dim))

    fusion = AdaptiveFusion(dim, threshold=0.8, tasks=["t"], fusion_tasks=["t"], gate_dim=16)
    method = AdaptiveFusionMethod(AdaptiveFusionArgs(similarity_weighting=False, mi_weight=0.0))
    optimizer = torch.optim.Adam([p for p in fusion.parameters()], lr=1e-2)
    test_v, test_a = pairs(16)
    rows = {"video": torch.arange(16), "audio": torch.arange(16)}
    aux = {}
    fusion({"video": test_v, "audio": test_a}, rows, ["t"] * 16, aux)
    assert aux[DECISIONS]["fuse"].float().mean() < 0.2
    for _ in range(60):
        v, a = pairs(8)
        v.requires_grad_(True)
        aux = {}
        fusion({"video": v, "audio": a}, {"video": torch.arange(8), "audio": torch.arange(8)}, ["t"] * 8, aux)
        loss = method.args.align_weight * (1 - pearson(*aux[GATE_SPACE][:2])).mean()
        optimizer.zero_grad()
        loss.backward()
        assert v.grad is None or v.grad.abs().sum() == 0  # the heads read the pooled tokens detached
        optimizer.step()
    aux = {}
    fusion({"video": test_v, "audio": test_a}, rows, ["t"] * 16, aux)
    assert aux[DECISIONS]["fuse"].all()
    noise = torch.randn(16, 2, dim) * 3
    fusion({"video": test_v, "audio": noise}, rows, ["t"] * 16, aux)
    assert aux[DECISIONS]["fuse"].float().mean() < 0.2


def test_soft_gate_interpolates_and_learns_its_centre():
    video, audio = tokens_with_correlation(0.6)
    fusion = fusion_for(threshold=0.8, gate="soft")
    with torch.no_grad():
        fusion.router("t").bias.copy_(torch.tensor([0.5, -0.5]))
    w = torch.softmax(torch.tensor([0.5, -0.5]), 0)
    g = torch.sigmoid(torch.tensor(10.0 * (0.6 - 0.8)))
    aux = {}
    out = fuse_one(fusion, video, audio, aux=aux)
    assert aux[DECISIONS]["share"][0].item() == pytest.approx(float(g), abs=1e-4)
    assert torch.allclose(out["video"], video * (g * 2 * w[0] + (1 - g)), atol=1e-5)
    assert torch.allclose(out["audio"], audio * g * 2 * w[1], atol=1e-5)
    (out["video"].sum() + 3 * out["audio"].sum()).backward()
    gate = fusion.gate_of("t")
    assert gate.center.grad.abs() > 0 and gate.log_sharpness.grad.abs() > 0
    assert gate.heads[0].weight.grad.abs().sum() > 0  # through r
    hard = fusion_for(threshold=0.8)
    fuse_one(hard, video, audio)["video"].sum().backward()
    assert not hasattr(hard.gate_of("t"), "center") and hard.gate_of("t").heads[0].weight.grad is None


def test_ablation_gates_fix_the_branch():
    video, audio = tokens_with_correlation(0.1)
    for gate, fused, kept in (("fuse", True, None), ("video", False, "video"), ("audio", False, "audio")):
        aux = {}
        out = fuse_one(fusion_for(threshold=0.8, gate=gate), video, audio, aux=aux)
        assert bool(aux[DECISIONS]["fuse"][0]) is fused
        if kept:
            other = "audio" if kept == "video" else "video"
            assert torch.equal(out[kept], {"video": video, "audio": audio}[kept])
            assert torch.equal(out[other], torch.zeros_like(out[other]))
        else:
            assert torch.allclose(out["video"], video) and torch.allclose(out["audio"], audio)
    with pytest.raises(ValueError, match="gate must be one of"):
        AdaptiveFusion(8, gate="image")


def test_routers_learn_in_both_branches():
    video, audio = tokens_with_correlation(0.2)
    for threshold in (0.1, 0.9):  # fused, then alone (straight-through scale of value 1)
        fusion = fusion_for(threshold=threshold)
        out = fuse_one(fusion, video, audio)
        (out["video"].sum() * 3 + out["audio"].sum()).backward()
        assert fusion.router("t").weight.grad.abs().sum() > 0


def test_per_task_gates_and_single_medium_rows_in_one_batch():
    fusion = AdaptiveFusion(32, threshold=-1.0, tasks=["a", "b"], fusion_tasks=["a", "b"])  # always fuse
    with torch.no_grad():
        fusion.router("a").bias.copy_(torch.tensor([1.0, 0.0]))
        fusion.router("b").bias.copy_(torch.tensor([0.0, 1.0]))
    g = torch.Generator().manual_seed(1)
    # rows: 0 = task a (video+audio), 1 = image only, 2 = video only, 3 = task b (video+audio), 4 = unknown task
    video = torch.randn(4, 3, 32, generator=g)  # rows 0, 2, 3, 4
    audio = torch.randn(3, 2, 32, generator=g)  # rows 0, 3, 4
    image = torch.randn(1, 5, 32, generator=g)
    rows = {"video": torch.tensor([0, 2, 3, 4]), "audio": torch.tensor([0, 3, 4]), "image": torch.tensor([1])}
    aux = {}
    out = fusion({"video": video, "audio": audio, "image": image}, rows, ["a", "x", "v", "b", "new"], aux)
    wa, wb = torch.softmax(torch.tensor([1.0, 0.0]), 0), torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert torch.equal(out["image"], image)
    assert torch.equal(out["video"][1], video[1])  # a video without sound passes through
    assert torch.allclose(out["video"][0], video[0] * 2 * wa[0]) and torch.allclose(out["audio"][0], audio[0] * 2 * wa[1])
    assert torch.allclose(out["video"][2], video[2] * 2 * wb[0]) and torch.allclose(out["audio"][1], audio[1] * 2 * wb[1])
    assert torch.equal(out["video"][3], video[3]) and torch.equal(out["audio"][2], audio[2])  # no gate: as they are
    assert aux[DECISIONS]["rows"] == [0, 3]
    assert aux[GATE_SPACE][2] == [0, 1]  # the rows whose task has a gate space


@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_a_task_without_a_gate_keeps_both_media_at_the_paper_threshold(gate):
    """Before an audio-visual task is trained (its zero-shot score, forward transfer) it has no gate: no
    decision is made for it, and neither medium is dropped (r of raw tokens is below 0.8, so a gate with
    zero router logits would keep the first medium "alone" and zero the sound)."""
    fusion = fusion_for("trained", threshold=0.8, gate=gate)
    video, audio = tokens_with_correlation(0.1)
    aux = {}
    out = fuse_one(fusion, video, audio, task="untrained", aux=aux)
    assert torch.equal(out["video"], video) and torch.equal(out["audio"], audio)
    assert DECISIONS not in aux and POOLED not in aux and GATE_SPACE not in aux


# ---- the model and the method's losses ------------------------------------------------------------------
def build(tiny_models):
    torch.manual_seed(0)
    llm, tokenizer = load_llm(tiny_models["llm"])
    model = MultimodalLM.with_adapter(llm, tokenizer, DIMS, build_peft_config(LoraArgs(dropout=0.0)),
                                      settings={"llm": tiny_models["llm"]})
    return model.eval(), PromptBuilder(tokenizer, "")


TARGETS = ("a red circle moving up and to the left with a low rising tone, then a high steady one.", "two.",
           "a red circle.", "a low tone.")


def two_media_batch(model, builder, tasks=("synth_av_caption", "synth_image_qa", "synth_av_caption", "text")):
    g = torch.Generator().manual_seed(2)
    items = []
    for media, task, target in zip(({"video": 4, "audio": 3}, {"image": 2}, {"video": 4, "audio": 3}, {}), tasks,
                                   TARGETS):
        features = {m: torch.randn(n, DIMS[m], generator=g) for m, n in media.items()}
        encoded = builder.encode("describe the video and its sound.", media, target)
        items.append({"input_ids": encoded.input_ids, "labels": encoded.labels, "media_mask": encoded.media_mask,
                      "media": features, "task": task})
    return items, MultimodalCollator(model.tokenizer.pad_token_id)(items)


def test_prompt_and_embedding_place_both_media_in_order(tiny_models):
    model, builder = build(tiny_models)
    encoded = builder.encode("describe.", {"audio": 3, "video": 4})
    mask = encoded.media_mask
    first = mask.index(True)
    assert mask[first:first + 4] == [True] * 4 and not mask[first + 4]  # video block first (MEDIA_ORDER)
    second = mask.index(True, first + 4)
    assert mask[second:second + 3] == [True] * 3 and sum(mask) == 7
    tok = model.tokenizer
    assert tok.decode(encoded.input_ids[:first]).endswith("video: ")
    assert tok.decode(encoded.input_ids[first + 4:second]) == " audio: "

    items, batch = two_media_batch(model, builder)
    assert batch["media_rows"]["video"].tolist() == [0, 2] and batch["media_rows"]["audio"].tolist() == [0, 2]
    assert batch["media_tasks"] == ["synth_av_caption", "synth_image_qa", "synth_av_caption", "text"]
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["media_mask"], batch["media_features"], batch["media_rows"])
        for row in (0, 2):
            positions = batch["media_mask"][row].nonzero().flatten()
            video = model.projectors["video"](items[row]["media"]["video"])
            audio = model.projectors["audio"](items[row]["media"]["audio"])
            assert torch.allclose(embeds[row, positions], torch.cat([video, audio]), atol=1e-6)
    assert model(**model_inputs(batch)).loss.isfinite()
    one_medium = MultimodalCollator(model.tokenizer.pad_token_id)([items[1]])
    assert one_medium["media_tasks"] == ["synth_image_qa"]  # per-task adapters need the task of every row


def test_similarity_weights():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    omega = similarity_weights(z)
    assert omega.mean().item() == pytest.approx(1.0)
    # rows 0-2 alike (w = 1 among them, 0 to row 3): omega = 3 * 1/3 for them and 1 for row 3 (only itself)
    assert torch.allclose(omega, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # w: 1 among 0-1, 1/2 to row 2
    w = torch.tensor([[1, 1, .5], [1, 1, .5], [.5, .5, 1]])
    assert torch.allclose(similarity_weights(z), (w / w.sum(1, keepdim=True)).sum(0))
    assert similarity_weights(z)[2] < 1 < similarity_weights(z)[0]  # the odd one out weighs less


def test_losses_weighted_cross_entropy_mutual_information_and_alignment(tiny_models):
    model, builder = build(tiny_models)
    model.set_media_modulator(AdaptiveFusion(64, threshold=-1.0, tasks=["synth_av_caption"],
                                             fusion_tasks=["synth_av_caption"]))
    _, batch = two_media_batch(model, builder)
    method = AdaptiveFusionMethod()
    model.train()
    outputs = model(**model_inputs(batch))
    cw, mi, align = method.extra_loss(model, batch, outputs, None)

    per_row = per_row_cross_entropy(outputs.logits, batch["labels"], outputs.logits_offset)
    assert per_row.sum().item() == pytest.approx(outputs.loss_sum.item(), rel=1e-5)
    z, has_media = row_representations(outputs.media_tokens, batch["media_rows"], 4)
    assert has_media.tolist() == [True, True, True, False]
    omega = torch.ones(4)
    omega[:3] = similarity_weights(z[:3].detach())
    assert not torch.allclose(omega, torch.ones(4))  # the weighting changes the loss
    assert isinstance(cw, TokenSum) and cw.items == "labels"
    # the trainer adds the LM loss (sum_j CE_j): with this term the total is 0.7 sum_j omega_j CE_j
    total = outputs.loss_sum + cw.value
    weighted, unweighted = (0.7 * omega * per_row).sum().item(), 0.7 * outputs.loss_sum.item()
    assert abs(weighted - unweighted) > 1e-3 * unweighted  # rows of different lengths and similarities
    assert total.item() == pytest.approx(weighted, rel=1e-5)
    plain = AdaptiveFusionMethod(AdaptiveFusionArgs(similarity_weighting=False)).extra_loss(model, batch, outputs, None)[0]
    assert (outputs.loss_sum + plain.value).item() == pytest.approx(0.7 * outputs.loss_sum.item(), rel=1e-5)

    pooled = outputs.aux[POOLED]
    expected = 0.3 * (infonce(pooled["fused"], pooled["video"]) + infonce(pooled["fused"], pooled["audio"]))
    assert mi.item() == pytest.approx(expected.item(), rel=1e-5) and mi.item() > 0
    assert align.item() == pytest.approx((1 - pearson(*outputs.aux[GATE_SPACE][:2])).mean().item(), rel=1e-5)
    projector = model.projectors["video"].fc2.weight
    (grad_mi,) = torch.autograd.grad(mi, projector, retain_graph=True)
    assert grad_mi.abs().sum() > 0  # L_MI shapes the representations
    heads = model.media_modulator.gate_of("synth_av_caption").heads[0].weight
    grad_align = torch.autograd.grad(align, [projector, heads], allow_unused=True, retain_graph=True)
    assert grad_align[0] is None and grad_align[1].abs().sum() > 0  # alignment reaches the heads only


def test_mutual_information_loss_comes_with_the_main_forward_not_the_last_one(tiny_models):
    """A teacher's forward (LwF listed first) between the main forward and the method's extra_loss changes
    nothing: the pooled pairs come with the main forward's outputs."""
    model, builder = build(tiny_models)
    model.set_media_modulator(AdaptiveFusion(64, tasks=["synth_av_caption"], fusion_tasks=["synth_av_caption"]))
    _, batch = two_media_batch(model, builder)
    outputs, expected, again = extra_loss_survives_another_forward(AdaptiveFusionMethod(), model, batch)
    assert outputs.aux[DECISIONS]["rows"] == [0, 2]
    assert len(expected) == 3 and expected[1].item() > 0
    assert torch.equal(again[0].value, expected[0].value)
    assert all(torch.equal(a, b) for a, b in zip(again[1:], expected[1:]))


def test_the_teacher_fuses_as_the_previous_model_did(tiny_models):
    """A teacher method with adaptive fusion (LwF, MoInCL): its modulator is a frozen copy without the parts
    of the task the step trains for the first time (its expert, router and gate), and it does not move with
    the student's modulator."""
    from micl.methods.teacher import PreviousModelTeacher

    model, builder = build(tiny_models)
    fusion = AdaptiveFusion(64, threshold=0.8, tasks=["synth_image_qa", "synth_video_qa"],
                            fusion_tasks=["synth_video_qa"], finished_tasks=["synth_image_qa", "synth_video_qa"])
    with torch.no_grad():
        for param in fusion.parameters():
            param.normal_(0, 0.2)
    model.set_media_modulator(fusion)
    _, batch = two_media_batch(model, builder, tasks=("synth_video_qa", "synth_image_qa", "synth_av_caption",
                                                      "text"))
    inputs = model_inputs(batch)
    with torch.no_grad():
        previous = model(**inputs).logits
        fusion.add_task("synth_av_caption")  # the new task's step starts (adaptive fusion's on_task_start)
        fusion.add_fusion_task("synth_av_caption")
        for param in fusion.task_parameters("synth_av_caption"):
            param.normal_(0, 0.5)
        assert not torch.allclose(model(**inputs).logits, previous, atol=1e-4)
    teacher = PreviousModelTeacher(model)
    torch.testing.assert_close(teacher.logits(batch), previous)
    with torch.no_grad():  # the student's modulator trains on
        for param in fusion.parameters():
            param.add_(0.3)
    torch.testing.assert_close(teacher.logits(batch), previous)
    assert model.media_modulator is fusion  # swapped back after each teacher forward
    teacher.remove()


def test_modulator_saved_and_reloaded_with_its_experts_and_gates(tiny_models, tmp_path):
    model, builder = build(tiny_models)
    fusion = AdaptiveFusion(64, threshold=-1.0, tasks=["synth_image_qa", "synth_av_caption"],
                            fusion_tasks=["synth_av_caption"], gate="soft")
    with torch.no_grad():
        fusion.router("synth_av_caption").weight.normal_(0, 0.05)
        for expert in fusion.extractor.experts:
            expert.up.weight.normal_(0, 0.05)
    model.set_media_modulator(fusion)
    _, batch = two_media_batch(model, builder)
    with torch.no_grad():
        expected = model(**model_inputs(batch)).logits
        plain = MultimodalLM.forward(model, **{k: v for k, v in model_inputs(batch).items() if k != "media_tasks"})
    assert not torch.allclose(expected, plain.logits)  # the experts and routers changed the media tokens
    model.save_pretrained(tmp_path / "phase")
    reloaded = MultimodalLM.from_pretrained(tmp_path / "phase", *load_llm(tiny_models["llm"]))
    assert isinstance(reloaded.media_modulator, AdaptiveFusion)
    assert reloaded.media_modulator.modulator_config() == fusion.modulator_config()
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**model_inputs(batch)).logits, expected)


# ---- M1 / M2 --------------------------------------------------------------------------------------------
def test_mcil_metrics_by_hand():
    R = [[50.0, None, None], [40.0, 60.0, None], [30.0, 50.0, 80.0]]
    initial, pre = [10.0, 20.0, 30.0], [10.0, 25.0, 35.0]
    sim = [1.0, 0.6, 0.8]
    out = mcil_metrics(R, sim, [0.5, 0.3], initial, pre)
    acc = (50 + 50 + 160 / 3) / 3
    forgetting = [0.0, 10.0, (20 + 10) / 2]
    assert out["forgetting_per_step"] == pytest.approx(forgetting)
    assert out["m1"] == pytest.approx(acc / 2 + np.mean([(1 - s) * (100 - f) for s, f in zip(sim, forgetting)]) / 2)
    bwt = [0.0, -10.0, (-20 - 10) / 2]
    fwt = [0.0, 25 - 20, ((25 - 20) + (35 - 30)) / 2]
    assert out["bwt_per_step"] == pytest.approx(bwt) and out["fwt_per_step"] == pytest.approx(fwt)
    transfer = np.mean([b + f for b, f in zip(bwt, fwt)])
    assert out["m2"] == pytest.approx((acc / 100 / 2 + transfer / 100 / 2) / 2 + (0.5 + 0.3) / 4)
    assert mcil_metrics(R, sim, [0.5, 0.3])["m2"] is None  # FWT unknown without the initial scores
    assert mcil_metrics(R, sim, None)["m2"] is None and mcil_metrics(R, sim, None)["m1"] == out["m1"]
    with pytest.raises(ValueError, match="one task similarity per step"):
        mcil_metrics(R, [1.0])


# ---- runs -----------------------------------------------------------------------------------------------
def run(tiny_models, synth_root, out, *extra):
    return main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), "eval.forward_transfer=false",
                 "lora.dropout=0.0", *extra])


def test_two_task_run_trains_per_task_parts_freezes_them_and_reports_m1_m2(tiny_models, synth_root, tmp_path):
    out = tmp_path / "run"
    # threshold -1: every sample fused, so the router gets the full gradient of the LM loss
    assert run(tiny_models, synth_root, out, "order=[synth_av_caption,synth_video_qa]",
               "method_args.adaptive_fusion.threshold=-1.0", "eval.forward_transfer=true") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 2
    first = out / "step_0_synth_av_caption"
    second = out / "step_1_synth_video_qa"
    config = json.loads((first / "micl_model.json").read_text())["media_modulator"]
    assert config["class"] == "micl.modeling.fusion:AdaptiveFusion"
    assert config["config"]["fusion_tasks"] == ["synth_av_caption"] and config["config"]["threshold"] == -1.0
    before, after = load_file(str(first / "media_modulator.safetensors")), load_file(str(second / "media_modulator.safetensors"))
    assert before["gates.0.router.weight"].abs().sum() > 0  # trained from its zero start
    assert before["extractor.experts.0.up.weight"].abs().sum() > 0  # the task's adapter too
    assert before["gates.0.heads.0.weight"].abs().sum() > 0
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen after its task
    assert after["extractor.experts.1.up.weight"].abs().sum() > 0  # the video QA task's own adapter learned
    assert json.loads((second / "micl_model.json").read_text())["media_modulator"]["config"]["tasks"] == \
        ["synth_av_caption", "synth_video_qa"]
    stats = json.loads((out / "adaptive_fusion" / "step_0_synth_av_caption.json").read_text())
    assert stats["samples"] == 8 and stats["fused_share"] == 1.0
    assert sum(stats["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert not (out / "adaptive_fusion" / "step_1_synth_video_qa.json").exists()  # one medium: no gate
    steps = [s["method_metrics"]["adaptive_fusion"] for s in results["steps"]]
    assert steps[0]["task_similarity"] == 1.0 and 0 < steps[1]["task_similarity"] < 1
    assert set(steps[1]["nmi"]) == {"video", "audio"} and all(0 <= v <= 1 for v in steps[1]["nmi"].values())
    expected = mcil_metrics(results["matrix"], [s["task_similarity"] for s in steps], list(steps[1]["nmi"].values()),
                            results["initial_scores"], results["pre_step_scores"])
    assert results["mcil"]["m1"] == pytest.approx(expected["m1"]) and results["mcil"]["m2"] == pytest.approx(expected["m2"])
    assert results["mcil"]["m2"] is not None


def test_fusion_is_used_on_the_audio_visual_task_at_the_paper_threshold(tiny_models, synth_root, tmp_path):
    """At r >= 0.8 in the learned gate space the training samples of synth_av_caption are fused by the end of
    the task; without the alignment term (align_weight 0) r stays near 0 and none is."""
    stats = {}
    for align in ("1.0", "0.0"):
        out = tmp_path / f"align_{align}"
        assert run(tiny_models, synth_root, out, "order=[synth_av_caption]", "train.epochs=6", "train.lr=3e-3",
                   f"method_args.adaptive_fusion.align_weight={align}") == 0
        stats[align] = json.loads((out / "adaptive_fusion" / "step_0_synth_av_caption.json").read_text())
    assert stats["1.0"]["threshold"] == 0.8 and stats["1.0"]["fused_share"] == 1.0 and stats["1.0"]["min_r"] >= 0.8
    assert stats["0.0"]["fused_share"] == 0.0 and stats["0.0"]["max_r"] < 0.8


def test_killed_run_resumes_mid_task_to_the_same_modulator(tiny_models, synth_root, tmp_path, monkeypatch):
    # the modulator comes from step 0's phase folder, the audio-visual task's parts from the checkpoint
    order = ("order=[synth_video_qa,synth_av_caption]", "method_args.adaptive_fusion.threshold=-1.0")
    reference = tmp_path / "reference"
    assert run(tiny_models, synth_root, reference, *order) == 0
    killed = tmp_path / "killed"
    monkeypatch.setitem(METHODS, "adaptive_fusion", crashing(AdaptiveFusionMethod, "augment_batch"))
    with pytest.raises(Killed):
        run(tiny_models, synth_root, killed, *order)
    assert not (killed / "step_1_synth_av_caption").exists()
    monkeypatch.setitem(METHODS, "adaptive_fusion", AdaptiveFusionMethod)
    assert run(tiny_models, synth_root, killed, *order) == 0
    resumed = json.loads((killed / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert resumed["steps"][1]["resumed_from"] == "checkpoint-1"
    assert resumed["matrix"] == expected["matrix"]
    assert resumed["mcil"]["m1"] == pytest.approx(expected["mcil"]["m1"], abs=1e-6)
    assert [s["method_metrics"] for s in resumed["steps"]] == [s["method_metrics"] for s in expected["steps"]]
    phase = "step_1_synth_av_caption"
    a = load_file(str(reference / phase / "media_modulator.safetensors"))
    b = load_file(str(killed / phase / "media_modulator.safetensors"))
    assert a.keys() == b.keys() and {"gates.0.router.weight", "extractor.experts.1.up.weight"} <= a.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_refuses_a_second_media_modulator_and_bad_settings(tiny_models, synth_root, tmp_path, capsys):
    assert run(tiny_models, synth_root, tmp_path / "x", "method=[harmony,adaptive_fusion]", "lora.type=gated_lora") == 2
    assert "lists harmony and adaptive_fusion; each installs a media modulator" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="threshold"):
        AdaptiveFusionArgs(threshold=1.5)
    with pytest.raises(ConfigError, match="mi_temperature"):
        AdaptiveFusionArgs(mi_temperature=0)
    with pytest.raises(ConfigError, match="method_args.adaptive_fusion.gate: one of hard, soft, fuse, video, audio"):
        AdaptiveFusionArgs(gate="sometimes")
    with pytest.raises(ConfigError, match="top_k"):
        AdaptiveFusionArgs(top_k=0)
