import shutil

import pytest
import torch

from micl.config import ModelArgs
from micl.errors import MediaError
from micl.modeling.encoders.registry import build_encoders
from micl.modeling.feature_cache import FeatureCache


@pytest.fixture()
def encoders(tiny_models):
    return build_encoders(ModelArgs(image_encoder=tiny_models["vit"], audio_encoder=tiny_models["whisper"],
                                    image_tokens=4, audio_tokens=3, video_frames=2, video_tokens_per_frame=1))


def media(synth_root, task, n=3):
    folder = synth_root / "media" / task / "train"
    return sorted(str(p) for p in folder.iterdir())[:n]


def test_tiny_encoders_shapes_and_sizes(encoders, synth_root, tmp_path):
    cache = FeatureCache(tmp_path)
    image = cache.features(encoders["image"], media(synth_root, "synth_image_caption"))
    audio = cache.features(encoders["audio"], media(synth_root, "synth_audio_qa"))
    video = cache.features(encoders["video"], media(synth_root, "synth_video_qa"))
    assert image[0].shape == (4, 32)  # 2x2 grid of the ViT's 4x4 patch map, CLS dropped
    assert audio[0].shape == (3, 32)
    assert video[0].shape == (2, 32)  # 2 frames x 1 token
    assert encoders["image"].output_dim == encoders["audio"].output_dim == 32


def test_each_item_encoded_once_then_cached(encoders, synth_root, tmp_path):
    paths = media(synth_root, "synth_image_qa", 4)
    first = FeatureCache(tmp_path)
    a = first.features(encoders["image"], paths + paths[:1])  # a duplicate is encoded once
    assert first.encoded == 4
    second = FeatureCache(tmp_path)  # a new run, same cache folder
    b = second.features(encoders["image"], paths)
    assert second.encoded == 0 and second.hits == 4
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cache_key_follows_content_and_encoder(encoders, synth_root, tmp_path):
    src = media(synth_root, "synth_image_qa", 2)
    copy = tmp_path / "copy.png"
    shutil.copy(src[0], copy)
    cache = FeatureCache(tmp_path / "cache")
    cache.features(encoders["image"], [str(copy)])
    cache.features(encoders["image"], [src[0]])  # same bytes elsewhere: a hit
    assert cache.encoded == 1
    shutil.copy(src[1], copy)  # new content under the old name
    cache.features(encoders["image"], [str(copy)])
    assert cache.encoded == 2


def test_missing_and_corrupt_media_name_the_file(encoders, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(MediaError, match="nope.png"):
        cache.features(encoders["image"], [str(tmp_path / "nope.png")])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....garbage")
    with pytest.raises(MediaError, match="bad.wav"):
        cache.features(encoders["audio"], [str(bad)])
