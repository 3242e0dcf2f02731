"""Samples with two media (a video and its sound) and the adaptive fusion module / method."""

import json

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
from micl.methods import METHODS
from micl.methods.adaptive_fusion import AdaptiveFusionArgs, AdaptiveFusionMethod
from micl.modeling.fusion import DECISIONS, AdaptiveFusion, paired_infonce, pearson
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


def fuse_one(fusion, video, audio, task="t", aux=None):
    rows = {"video": torch.tensor([0]), "audio": torch.tensor([0])}
    return fusion({"video": video, "audio": audio}, rows, [task], aux)


def test_pearson_matches_numpy():
    x, y = torch.randn(4, 50), torch.randn(4, 50)
    y[1] = 2 * x[1] + 3
    expected = [np.corrcoef(a, b)[0, 1] for a, b in zip(x.numpy(), y.numpy())]
    assert torch.allclose(pearson(x, y), torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert pearson(x, y)[1].item() == pytest.approx(1.0, abs=1e-5)


def test_paired_infonce_raises_the_correlation_the_gate_reads():
    torch.manual_seed(0)
    x, y = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    assert pearson(x, y).abs().max() < 0.8
    with torch.no_grad():  # matched pairs score a lower loss than mismatched ones
        assert paired_infonce(x + 0 * y, x + 0.1 * y) < paired_infonce(x, x.roll(1, 0) + 0.1 * y)
    optimizer = torch.optim.Adam([x, y], lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        paired_infonce(x, y, temperature=0.3).backward()  # the method's default temperature
        optimizer.step()
    assert pearson(x, y).min() > 0.8  # every pair would now be fused at the paper's threshold


@pytest.mark.parametrize("r_target", [0.3, 0.8, 0.95])
def test_gate_switches_at_the_threshold(r_target):
    video, audio = tokens_with_correlation(r_target)
    r = pearson(video.mean(1), audio.mean(1)).item()
    assert r == pytest.approx(r_target, abs=1e-4)
    fusion = AdaptiveFusion(32, threshold=0.8, tasks=["t"])
    with torch.no_grad():
        fusion.router("t").bias.copy_(torch.tensor([0.5, -0.5]))  # video weighs more: w = (0.731, 0.269)
    w = torch.softmax(torch.tensor([0.5, -0.5]), 0)

    fusion.threshold = r - 1e-4  # r at or above the threshold: both media, scaled by 2w
    aux = {}
    out = fuse_one(fusion, video, audio, aux=aux)
    assert bool(aux[DECISIONS]["fuse"][0])
    assert torch.allclose(out["video"], video * 2 * w[0]) and torch.allclose(out["audio"], audio * 2 * w[1])

    fusion.threshold = r + 1e-4  # below: the stronger medium (video) alone, the other zeroed
    out = fuse_one(fusion, video, audio, aux=aux)
    assert not bool(aux[DECISIONS]["fuse"][0])
    assert torch.equal(out["video"], video) and torch.equal(out["audio"], torch.zeros_like(audio))

    with torch.no_grad():  # the router decides which medium is the stronger one
        fusion.router("t").bias.copy_(torch.tensor([-0.5, 0.5]))
    out = fuse_one(fusion, video, audio)
    assert torch.equal(out["audio"], audio) and torch.equal(out["video"], torch.zeros_like(video))


def test_routers_learn_in_both_branches():
    video, audio = tokens_with_correlation(0.2)
    for threshold in (0.1, 0.9):  # fused, then alone (straight-through scale of value 1)
        fusion = AdaptiveFusion(32, threshold=threshold, tasks=["t"])
        out = fuse_one(fusion, video, audio)
        (out["video"].sum() * 3 + out["audio"].sum()).backward()
        assert fusion.router("t").weight.grad.abs().sum() > 0


def test_per_task_routers_and_single_medium_rows_in_one_batch():
    fusion = AdaptiveFusion(32, threshold=-1.0, tasks=["a", "b"])  # always fuse
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
    assert torch.allclose(out["video"][3], video[3]) and torch.allclose(out["audio"][2], audio[2])  # no router: 1/2 each
    assert aux[DECISIONS]["rows"] == [0, 3, 4]


def build(tiny_models):
    torch.manual_seed(0)
    llm, tokenizer = load_llm(tiny_models["llm"])
    model = MultimodalLM.with_adapter(llm, tokenizer, DIMS, build_peft_config(LoraArgs(dropout=0.0)),
                                      settings={"llm": tiny_models["llm"]})
    return model.eval(), PromptBuilder(tokenizer, "")


def two_media_batch(model, builder):
    g = torch.Generator().manual_seed(2)
    items = []
    for media, task in (({"video": 4, "audio": 3}, "synth_av_caption"), ({"image": 2}, "synth_image_qa"),
                        ({"video": 4, "audio": 3}, "synth_av_caption"), ({}, "text")):
        features = {m: torch.randn(n, DIMS[m], generator=g) for m, n in media.items()}
        encoded = builder.encode("describe the video and its sound.", media, "a red circle with a low tone.")
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


def test_mutual_information_loss_comes_with_the_main_forward_not_the_last_one(tiny_models):
    """A teacher's forward (LwF listed first) between the main forward and the method's extra_loss changes
    nothing: the pooled pairs come with the main forward's outputs."""
    model, builder = build(tiny_models)
    model.set_media_modulator(AdaptiveFusion(64, tasks=["synth_av_caption"]))
    _, batch = two_media_batch(model, builder)
    outputs, expected, again = extra_loss_survives_another_forward(AdaptiveFusionMethod(), model, batch)
    assert outputs.aux[DECISIONS]["rows"] == [0, 2]
    assert expected is not None and expected.item() > 0
    assert torch.equal(again, expected)


def test_modulator_saved_and_reloaded_with_its_routers(tiny_models, tmp_path):
    model, builder = build(tiny_models)
    fusion = AdaptiveFusion(64, threshold=-1.0, tasks=["synth_av_caption"])
    with torch.no_grad():
        fusion.router("synth_av_caption").weight.normal_(0, 0.05)
    model.set_media_modulator(fusion)
    _, batch = two_media_batch(model, builder)
    with torch.no_grad():
        expected = model(**model_inputs(batch)).logits
        plain = MultimodalLM.forward(model, **{k: v for k, v in model_inputs(batch).items() if k != "media_tasks"})
    assert not torch.allclose(expected, plain.logits)  # the routers changed the media tokens
    model.save_pretrained(tmp_path / "phase")
    reloaded = MultimodalLM.from_pretrained(tmp_path / "phase", *load_llm(tiny_models["llm"]))
    assert isinstance(reloaded.media_modulator, AdaptiveFusion)
    assert reloaded.media_modulator.tasks == ["synth_av_caption"]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**model_inputs(batch)).logits, expected)


def run(tiny_models, synth_root, out, *extra):
    return main(["train", RECIPE, *tiny_recipe_overrides(tiny_models, synth_root, out), "eval.forward_transfer=false",
                 "lora.dropout=0.0", *extra])


def test_two_task_run_trains_a_router_per_task_and_freezes_it(tiny_models, synth_root, tmp_path):
    out = tmp_path / "run"
    # threshold -1: every sample fused, so the router gets the full gradient of the LM loss
    assert run(tiny_models, synth_root, out, "order=[synth_av_caption,synth_video_qa]",
               "method_args.adaptive_fusion.threshold=-1.0") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["matrix"]) == 2
    first = out / "step_0_synth_av_caption"
    second = out / "step_1_synth_video_qa"
    config = json.loads((first / "micl_model.json").read_text())["media_modulator"]
    assert config["class"] == "micl.modeling.fusion:AdaptiveFusion"
    assert config["config"]["tasks"] == ["synth_av_caption"] and config["config"]["threshold"] == -1.0
    before, after = load_file(str(first / "media_modulator.safetensors")), load_file(str(second / "media_modulator.safetensors"))
    assert before["routers.0.weight"].abs().sum() > 0  # trained from its zero start
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen after its task
    stats = json.loads((out / "adaptive_fusion" / "step_0_synth_av_caption.json").read_text())
    assert stats["samples"] == 8 and stats["fused_share"] == 1.0
    assert sum(stats["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert not (out / "adaptive_fusion" / "step_1_synth_video_qa.json").exists()  # one medium: no router


def test_killed_run_resumes_mid_task_to_the_same_router(tiny_models, synth_root, tmp_path, monkeypatch):
    # the modulator comes from step 0's phase folder, the audio-visual task's router from the checkpoint
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
    phase = "step_1_synth_av_caption"
    a = load_file(str(reference / phase / "media_modulator.safetensors"))
    b = load_file(str(killed / phase / "media_modulator.safetensors"))
    assert a.keys() == b.keys() == {"routers.0.weight", "routers.0.bias"}
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_refuses_a_second_media_modulator_and_bad_threshold(tiny_models, synth_root, tmp_path, capsys):
    assert run(tiny_models, synth_root, tmp_path / "x", "method=[harmony,adaptive_fusion]", "lora.type=gated_lora") == 2
    assert "lists harmony and adaptive_fusion; each installs a media modulator" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="threshold"):
        AdaptiveFusionArgs(threshold=1.5)
    with pytest.raises(ConfigError, match="mi_temperature"):
        AdaptiveFusionArgs(mi_temperature=0)
