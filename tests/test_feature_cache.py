"""The tiny real encoders through the feature store: shapes, each item encoded once and reused by a new run,
the key following the media's content, errors naming the media file."""

import shutil

import pytest
import torch

from micl.config import ModelArgs
from micl.errors import MediaError
from micl.modeling.encoders.registry import build_encoders
from micl.modeling.feature_store import FeatureStores


@pytest.fixture()
def encoders(tiny_models):
    return build_encoders(ModelArgs(image_encoder=tiny_models["vit"], audio_encoder=tiny_models["whisper"],
                                    image_tokens=4, audio_tokens=3, video_frames=2, video_tokens_per_frame=1))


def media(synth_root, task, n=3):
    folder = synth_root / "media" / task / "train"
    return sorted(str(p) for p in folder.iterdir())[:n]


def rows(features):
    return [features[i] for i in range(len(features))]


def test_tiny_encoders_shapes_and_sizes(encoders, synth_root, tmp_path):
    stores = FeatureStores(tmp_path)
    image = stores.features(encoders["image"], media(synth_root, "synth_image_caption"))
    audio = stores.features(encoders["audio"], media(synth_root, "synth_audio_qa"))
    video = stores.features(encoders["video"], media(synth_root, "synth_video_qa"))
    assert image[0].shape == (4, 32)  # 2x2 grid of the ViT's 4x4 patch map, CLS dropped
    assert audio[0].shape == (3, 32)
    assert video[0].shape == (2, 32)  # 2 frames x 1 token
    assert image[0].dtype == torch.float32
    assert encoders["image"].output_dim == encoders["audio"].output_dim == 32


def test_stored_features_are_the_encoders_own(encoders, synth_root, tmp_path):
    paths = media(synth_root, "synth_image_qa", 4)
    stored = rows(FeatureStores(tmp_path).features(encoders["image"], paths))
    direct = encoders["image"].encode([encoders["image"].load(p) for p in paths])
    assert torch.equal(torch.stack(stored), direct)


def test_each_item_encoded_once_then_reused(encoders, synth_root, tmp_path):
    paths = media(synth_root, "synth_image_qa", 4)
    first = FeatureStores(tmp_path)
    a = rows(first.features(encoders["image"], paths + paths[:1]))  # a duplicate is encoded once
    assert first.encoded == 4 and first.built == 1
    assert torch.equal(a[0], a[4])
    second = FeatureStores(tmp_path)  # a new run, same cache folder
    b = rows(second.features(encoders["image"], paths + paths[:1]))
    assert second.encoded == 0 and second.built == 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_store_key_follows_content_and_encoder(encoders, synth_root, tmp_path):
    src = media(synth_root, "synth_image_qa", 2)
    copy = tmp_path / "copy.png"
    shutil.copy(src[0], copy)
    stores = FeatureStores(tmp_path / "cache")
    stores.features(encoders["image"], [str(copy)])
    stores.features(encoders["image"], [src[0]])  # same bytes elsewhere: the same store
    assert stores.encoded == 1
    shutil.copy(src[1], copy)  # new content under the old name
    stores.features(encoders["image"], [str(copy)])
    assert stores.encoded == 2
    other = build_encoders(ModelArgs(image_encoder=encoders["image"].backbone.name, image_tokens=1))
    stores.features(other["image"], [src[0]])  # another pooling: another store
    assert stores.encoded == 3


def test_missing_and_corrupt_media_name_the_file(encoders, tmp_path):
    stores = FeatureStores(tmp_path / "cache")
    with pytest.raises(MediaError, match="nope.png"):
        stores.features(encoders["image"], [str(tmp_path / "nope.png")])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....garbage")
    with pytest.raises(MediaError, match="bad.wav"):
        stores.features(encoders["audio"], [str(bad)])
