"""Stale features: the feature store's key holds the fingerprint of the encoder's weights and micl's preprocessing
version, beside the encoder's name and pooling. New weights under the same name (a local folder saved again, a new
Hub commit) or a new preprocessing version build a new store; unchanged, the store is reused without running the
encoder and without hashing the weights again; a store under the key of an older micl is left alone."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from micl.config import ModelArgs
from micl.data import media as media_io
from micl.modeling.encoders.registry import EfficientNetBackbone, WhisperAudioEncoder, build_encoders
from micl.modeling.feature_store import DATA, META, FeatureStores, is_complete

COMMITS = ("a" * 40, "b" * 40)


def save_vit(folder: Path, seed: int) -> str:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32), add_pooling_layer=False)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def image_encoder(name: str):
    encoder = build_encoders(ModelArgs(image_encoder=name, image_tokens=4))["image"]
    calls = []
    encode = encoder.encode
    encoder.encode = lambda items: calls.append(len(items)) or encode(items)  # counts the encoder's runs
    return encoder, calls


@pytest.fixture()
def images(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / "media" / f"image{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def rows(features) -> torch.Tensor:
    return torch.stack([features[i] for i in range(len(features))])


def test_new_weights_in_the_same_folder_build_a_new_store(tmp_path, images):
    folder = tmp_path / "vit"
    save_vit(folder, seed=0)
    stores = FeatureStores(tmp_path / "cache")
    encoder, calls = image_encoder(str(folder))
    before = stores.features(encoder, images)
    assert sum(calls) == 3 and stores.built == 1

    save_vit(folder, seed=1)  # the same name, other weights
    encoder, calls = image_encoder(str(folder))
    after = stores.features(encoder, images)
    assert sum(calls) == 3 and stores.built == 2
    assert after.store.folder != before.store.folder
    assert after.store.meta["identity"] == before.store.meta["identity"]  # name and pooling alike ...
    assert after.store.meta["weights"] != before.store.meta["weights"]  # ... the weights' fingerprint is not
    assert not torch.equal(rows(after), rows(before))  # and the features are the new weights'
    assert torch.equal(rows(after), encoder.encode([encoder.load(p) for p in images]))


def test_a_new_preprocessing_version_rebuilds(tmp_path, images, monkeypatch):
    name = save_vit(tmp_path / "vit", seed=0)
    stores = FeatureStores(tmp_path / "cache")
    encoder, calls = image_encoder(name)
    first = stores.features(encoder, images)
    monkeypatch.setattr(media_io, "PREPROCESSING_VERSION", media_io.PREPROCESSING_VERSION + 1)
    second = stores.features(encoder, images)
    assert sum(calls) == 6 and stores.built == 2 and second.store.folder != first.store.folder
    assert second.store.meta["preprocessing"] == first.store.meta["preprocessing"] + 1


def test_unchanged_encoder_reuses_the_store_without_encoding_or_hashing(tmp_path, images):
    name = save_vit(tmp_path / "vit", seed=0)
    first_run = FeatureStores(tmp_path / "cache")
    encoder, calls = image_encoder(name)
    first = rows(first_run.features(encoder, images))
    # config.json, model.safetensors, preprocessor_config.json: hashed once, memoised on disk
    assert sum(calls) == 3 and first_run.weights.hashed == 3
    assert len(json.loads((tmp_path / "cache" / "weight_digests.json").read_text())) == 3
    first_run.features(encoder, images)  # the same process again: nothing encoded, nothing hashed
    assert sum(calls) == 3 and first_run.weights.hashed == 3

    next_run = FeatureStores(tmp_path / "cache")  # another run: the digests come from weight_digests.json
    encoder, calls = image_encoder(name)
    again = next_run.features(encoder, images)
    assert calls == [] and next_run.encoded == next_run.built == next_run.weights.hashed == 0
    assert torch.equal(rows(again), first)
    assert "model" not in encoder.backbone.__dict__  # the weights were not even loaded


def _fake_hub_cache(root: Path, repo: str, commit: str, weights: Path) -> Path:
    """The Hugging Face cache layout of one downloaded revision (files copied, as on a filesystem without
    symlinks); refs/main names `commit`."""
    repo_folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / commit
    shutil.copytree(weights, snapshot)
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hub_id_is_fingerprinted_by_its_commit(tmp_path, images, monkeypatch):
    from huggingface_hub import constants

    hub_cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))  # offline: HF_HUB_OFFLINE=1 (conftest)
    first = _fake_hub_cache(hub_cache, "tiny-org/vit", COMMITS[0], Path(save_vit(tmp_path / "v0", seed=0)))
    stores = FeatureStores(tmp_path / "cache")
    encoder, calls = image_encoder("tiny-org/vit")
    assert encoder.weight_locations() == [first]
    old = stores.features(encoder, images)
    assert sum(calls) == 3 and stores.weights.hashed == 0  # a snapshot is its commit: nothing is read

    (first / "README.md").write_text("fetched later")  # the snapshot fills up: the key stays
    stores.features(encoder, images)
    assert sum(calls) == 3

    _fake_hub_cache(hub_cache, "tiny-org/vit", COMMITS[1], Path(save_vit(tmp_path / "v1", seed=1)))  # refs/main moves
    encoder, calls = image_encoder("tiny-org/vit")
    new = stores.features(encoder, images)
    assert sum(calls) == 3 and stores.built == 2 and new.store.folder != old.store.folder
    assert not torch.equal(rows(new), rows(old))


def test_embedded_encoders_fingerprint_their_packaged_weight_files():
    from micl.modeling.encoders.efficientnet_lite import default_weights_path
    from micl.modeling.encoders.whisper_ct2 import default_model_dir

    assert EfficientNetBackbone().weight_locations() == [default_weights_path()]
    assert WhisperAudioEncoder("whisper-tiny.en", 4).weight_locations() == [default_model_dir() / "model.bin"]


def test_a_store_under_an_older_key_is_left_alone_and_rebuilt(tmp_path, images):
    """A store written by the previous micl (key: identity, dtypes and items; meta.json without weights or
    preprocessing) is complete on disk, but under a key nothing looks up any more."""
    name = save_vit(tmp_path / "vit", seed=0)
    cache = tmp_path / "cache"
    encoder, calls = image_encoder(name)
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in images]
    old_key = "\n".join(["format1", encoder.identity, "compute=float32", "dtype=float32", *digests])
    old = cache / hashlib.sha256(old_key.encode()).hexdigest()
    old.mkdir(parents=True)
    (old / DATA).write_bytes(torch.zeros(3, 4, 16).numpy().tobytes())  # stale features
    (old / META).write_text(json.dumps({"format": 1, "identity": encoder.identity, "compute_dtype": "float32",
                                        "dtype": "float32", "items": 3, "tokens": 4, "dim": 16, "item_bytes": 256}))
    assert is_complete(old)
    features = FeatureStores(cache).features(encoder, images)
    assert features.store.folder != old and sum(calls) == 3
    assert rows(features).abs().sum() > 0 and is_complete(old)
