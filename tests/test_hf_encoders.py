"""Frozen encoders by local folder (the same code path as a Hub id), with tiny random models saved to a temp dir
(no network): CLIP / SigLIP vision towers (alone and inside a full CLIPModel / SiglipModel), Whisper (WhisperModel
and encoder-only checkpoints), CLAP's audio tower (ClapAudioModel and a full ClapModel) and generic AutoModel audio
encoders (wav2vec2, AST). Checked: shapes, the pooling, output_dim = the config's width = the projector's input,
identities, and the ConfigErrors naming the recipe key (through `micl train` too: exit 2, one line)."""

from __future__ import annotations

import re
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from micl.adapters import build_peft_config
from micl.config import LoraArgs, ModelArgs
from micl.errors import ConfigError
from micl.modeling.encoders.hf_audio import ClapAudioTower, HFAudioEncoder
from micl.modeling.encoders.registry import (HFVisionBackbone, WhisperAudioEncoder, audio_encoder,
                                             build_encoders, pool_sequence)

# distinct widths, so a projector sized from the wrong encoder would show
DIMS = {"clip": 32, "siglip": 24, "whisper": 32, "clap": 48, "wav2vec2": 40, "ast": 16}
CLAP_SR = 48000  # the tiny extractor keeps CLAP's rate, with a 1 s window

REMOTE_CODE = '''
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class TinyAudioConfig(PretrainedConfig):
    model_type = "micl_tiny_remote_audio"

    def __init__(self, hidden_size=8, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class TinyAudioModel(PreTrainedModel):
    config_class = TinyAudioConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(1, config.hidden_size)
        self.post_init()

    def forward(self, input_values=None, **kwargs):
        return (self.proj(input_values[..., None]).mean(1),)  # a tuple: no last_hidden_state
'''


def _vision_kwargs(hidden):
    return dict(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=2 * hidden)


def _text_kwargs():
    return dict(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict:
    import transformers as tf
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    root = tmp_path_factory.mktemp("hf_encoders")
    torch.manual_seed(0)
    paths = {}

    def save(name, model, *processors):
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        for processor in processors:
            processor.save_pretrained(paths[name])

    clip_processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip_vision = tf.CLIPVisionConfig(**_vision_kwargs(DIMS["clip"]))
    save("clip_vision", tf.CLIPVisionModel(clip_vision), clip_processor)
    save("clip_full", tf.CLIPModel(tf.CLIPConfig(vision_config=clip_vision.to_dict(), projection_dim=8,
                                                 text_config=_text_kwargs())), clip_processor)
    siglip_processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    siglip_vision = tf.SiglipVisionConfig(**_vision_kwargs(DIMS["siglip"]))
    save("siglip_vision", tf.SiglipVisionModel(siglip_vision), siglip_processor)
    save("siglip_full", tf.SiglipModel(tf.SiglipConfig(vision_config=siglip_vision.to_dict(),
                                                       text_config=_text_kwargs())), siglip_processor)

    whisper = tf.WhisperModel(tf.WhisperConfig(
        d_model=DIMS["whisper"], encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=100,
        max_target_positions=16, vocab_size=99, pad_token_id=0, bos_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    whisper_extractor = tf.WhisperFeatureExtractor(feature_size=80)
    save("whisper_model", whisper, whisper_extractor)
    encoder_only = WhisperEncoder(whisper.config)
    encoder_only.load_state_dict(whisper.encoder.state_dict())
    save("whisper_encoder", encoder_only, whisper_extractor)

    clap_audio = tf.ClapAudioConfig(  # 2 Swin stages: 24 -> 48 channels
        spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=4, depths=[1, 1], num_attention_heads=[2, 2],
        window_size=4, patch_embeds_hidden_size=DIMS["clap"] // 2, hidden_size=DIMS["clap"], projection_dim=8)
    clap_extractor = tf.ClapFeatureExtractor(feature_size=16, sampling_rate=CLAP_SR, hop_length=480, max_length_s=1)
    clap = tf.ClapAudioModel(clap_audio)
    save("clap_audio", clap, clap_extractor)
    clap_full = tf.ClapModel(tf.ClapConfig(audio_config=clap_audio.to_dict(), projection_dim=8,
                                           text_config=dict(_text_kwargs(), max_position_embeddings=24)))
    clap_full.audio_model.load_state_dict(clap.state_dict())  # the same tower: the same features
    save("clap_full", clap_full, clap_extractor)

    save("wav2vec2", tf.Wav2Vec2Model(tf.Wav2Vec2Config(
        hidden_size=DIMS["wav2vec2"], num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2)), tf.Wav2Vec2FeatureExtractor(sampling_rate=16000))
    save("ast", tf.ASTModel(tf.ASTConfig(
        hidden_size=DIMS["ast"], num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_mel_bins=32,
        max_length=64, patch_size=16, frequency_stride=16, time_stride=16)),
        tf.ASTFeatureExtractor(num_mel_bins=32, max_length=64))
    return paths


def _write_wav(path, seconds, rate, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    from micl.data.synth import _save_mp4

    root = tmp_path_factory.mktemp("hf_media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "image.png")
    _save_mp4([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)], root / "clip.mp4")
    return {
        "image": str(root / "image.png"),
        "video": str(root / "clip.mp4"),
        "wav16_short": _write_wav(root / "short16.wav", 0.5, 16000),
        "wav16_long": _write_wav(root / "long16.wav", 1.5, 16000, freq=220.0),
        "wav48_quarter": _write_wav(root / "quarter48.wav", 0.25, CLAP_SR),
        "wav48_full": _write_wav(root / "full48.wav", 1.0, CLAP_SR, freq=880.0),
    }


def _encoders(image, audio, **kw):
    return build_encoders(ModelArgs(image_encoder=image, audio_encoder=audio, **kw))


# ---- vision --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls_token", [("clip_vision", True), ("clip_full", True), ("siglip_vision", False),
                                             ("siglip_full", False)])
def test_vision_towers_shapes_and_pooling(hf_models, media, name, cls_token):
    encoders = _encoders(hf_models[name], hf_models["whisper_model"], image_tokens=4, video_frames=2,
                         video_tokens_per_frame=1)
    image, video = encoders["image"], encoders["video"]
    backbone = image.backbone
    assert isinstance(backbone, HFVisionBackbone) and video.backbone is backbone
    dim = DIMS[name.split("_")[0]]
    assert image.output_dim == video.output_dim == dim
    assert not hasattr(backbone.model, "text_model")  # full CLIP/SigLIP folders: the vision tower only

    picture = image.load(media["image"])
    features = image.encode([picture, picture])
    assert features.shape == (2, 4, dim)  # 2 x 2 grid of the 4 x 4 patch map
    pixels = backbone.processor(images=[picture], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = backbone.model(pixel_values=pixels).last_hidden_state[0]
    assert states.shape[0] == 16 + cls_token
    patches = states[1:] if cls_token else states  # CLS dropped; SigLIP has none
    grid = patches.reshape(4, 4, dim)
    expected = torch.stack([grid[r:r + 2, c:c + 2].mean(dim=(0, 1)) for r in (0, 2) for c in (0, 2)])
    torch.testing.assert_close(features[0], expected, rtol=1e-4, atol=1e-5)

    frames = video.load(media["video"])
    clip_features = video.encode([frames])
    assert clip_features.shape == (1, 2, dim)  # 2 frames x 1 token
    torch.testing.assert_close(clip_features[0, 0], image.encode([frames[0]])[0].mean(0), rtol=1e-4, atol=1e-5)


# ---- audio ---------------------------------------------------------------------------------------------------
def test_whisper_model_and_encoder_only_checkpoints(hf_models, media):
    model = audio_encoder(hf_models["whisper_model"], 3)
    encoder_only = audio_encoder(hf_models["whisper_encoder"], 3)
    assert isinstance(model, WhisperAudioEncoder) and isinstance(encoder_only, WhisperAudioEncoder)
    assert model.output_dim == encoder_only.output_dim == DIMS["whisper"]
    clips = [model.load(media["wav16_short"]), model.load(media["wav16_long"])]
    a, b = model.encode(clips), encoder_only.encode(clips)
    assert a.shape == (2, 3, DIMS["whisper"])
    torch.testing.assert_close(a, b)  # the encoder-only checkpoint loads the same weights (not a random init)


def test_whisper_folder_without_encoder_weights(hf_models, tmp_path):
    from transformers import CLIPVisionModel

    broken = tmp_path / "broken"
    shutil.copytree(hf_models["whisper_model"], broken)
    CLIPVisionModel.from_pretrained(hf_models["clip_vision"]).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", broken / "model.safetensors")
    encoder = audio_encoder(str(broken), 3)
    with pytest.raises(ConfigError, match="model.audio_encoder.*no Whisper encoder weights"):
        encoder.encoder


@pytest.mark.parametrize("name", ["clap_audio", "clap_full"])
def test_clap_audio_tower(hf_models, media, name):
    encoder = audio_encoder(hf_models[name], 4)
    assert isinstance(encoder, ClapAudioTower)
    assert encoder.output_dim == DIMS["clap"]  # = patch_embeds_hidden_size * 2**(stages-1) = audio hidden_size
    assert encoder.feature_extractor.sampling_rate == CLAP_SR
    assert len(encoder.load(media["wav16_short"])) == pytest.approx(CLAP_SR // 2, abs=64)  # resampled to 48 kHz
    quarter, full = encoder.load(media["wav48_quarter"]), encoder.load(media["wav48_full"])
    features = encoder.encode([quarter, full])
    assert features.shape == (2, 4, DIMS["clap"])

    # the real map: [B, C, F, T]; frequency averaged, time pooled over the steps covering the clip
    inputs = torch.stack([encoder._features(quarter), encoder._features(full)])
    with torch.no_grad():
        states = encoder.model(input_features=inputs).last_hidden_state
    assert states.dim() == 4 and states.shape[1] == DIMS["clap"]
    steps = states.shape[3]
    sequence = states.mean(2).transpose(1, 2)
    torch.testing.assert_close(features[1], pool_sequence(sequence[1:], 4)[0], rtol=1e-4, atol=1e-5)
    covered = steps // 4  # a 0.25 s clip in the 1 s window (repeated by the extractor)
    torch.testing.assert_close(features[0], pool_sequence(sequence[:1, :covered], 4)[0], rtol=1e-4, atol=1e-5)
    # reproducible, and independent of the batch it is encoded in
    torch.testing.assert_close(encoder.encode([full])[0], features[1], rtol=1e-5, atol=1e-6)


def test_clap_full_model_uses_the_audio_tower(hf_models, media):
    tower, full = audio_encoder(hf_models["clap_audio"], 2), audio_encoder(hf_models["clap_full"], 2)
    clip = tower.load(media["wav48_full"])
    torch.testing.assert_close(tower.encode([clip]), full.encode([clip]))
    assert tower.identity != full.identity


@pytest.mark.parametrize("name", ["wav2vec2", "ast"])
def test_generic_audio_automodel(hf_models, media, name):
    encoder = audio_encoder(hf_models[name], 3)
    assert isinstance(encoder, HFAudioEncoder) and encoder.output_dim == DIMS[name]
    clips = [encoder.load(media["wav16_short"]), encoder.load(media["wav16_long"])]
    assert len(clips[0]) == 8000  # the extractor's 16 kHz
    features = encoder.encode(clips)
    assert features.shape == (2, 3, DIMS[name])
    single = audio_encoder(hf_models[name], 1)  # one token = the mean over the whole sequence
    inputs = single.feature_extractor(clips[1], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        states = single.model(**inputs).last_hidden_state
    torch.testing.assert_close(single.encode([clips[1]])[0, 0], states[0].mean(0), rtol=1e-4, atol=1e-5)


# ---- identity, projectors, errors ----------------------------------------------------------------------------
def test_identities_follow_model_and_pooling(hf_models):
    a = _encoders(hf_models["clip_vision"], hf_models["clap_audio"], image_tokens=4, audio_tokens=4)
    b = _encoders(hf_models["siglip_vision"], hf_models["wav2vec2"], image_tokens=4, audio_tokens=4)
    c = _encoders(hf_models["clip_vision"], hf_models["clap_audio"], image_tokens=1, audio_tokens=8,
                  video_tokens_per_frame=1)
    same = _encoders(hf_models["clip_vision"], hf_models["clap_audio"], image_tokens=4, audio_tokens=4)
    for modality in ("image", "video", "audio"):
        assert a[modality].identity == same[modality].identity
        assert a[modality].identity != b[modality].identity
        assert a[modality].identity != c[modality].identity


def test_projectors_sized_from_encoder_configs(hf_models, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from micl.modeling.multimodal import MultimodalLM

    encoders = build_encoders(ModelArgs(image_encoder=hf_models["siglip_full"], video_encoder=hf_models["clip_full"],
                                        audio_encoder=hf_models["clap_full"]))
    dims = {m: e.output_dim for m, e in encoders.items()}
    assert dims == {"image": DIMS["siglip"], "video": DIMS["clip"], "audio": DIMS["clap"]}
    llm = AutoModelForCausalLM.from_pretrained(tiny_models["llm"])
    model = MultimodalLM.with_adapter(llm, AutoTokenizer.from_pretrained(tiny_models["llm"]), dims,
                                      build_peft_config(LoraArgs(dropout=0.0)))
    for modality, dim in dims.items():
        assert model.projectors[modality].fc1.in_features == dim
        assert model.projectors[modality].norm.normalized_shape == (dim,)
    other = _encoders(hf_models["clip_vision"], hf_models["wav2vec2"])
    assert (other["image"].output_dim, other["audio"].output_dim) == (DIMS["clip"], DIMS["wav2vec2"])


@pytest.fixture()
def remote_model(tmp_path):
    """A model with custom code (auto_map) whose forward returns a plain tuple."""
    import sys

    from transformers import Wav2Vec2FeatureExtractor

    code = tmp_path / "code"
    code.mkdir()
    (code / "modeling_tiny_remote.py").write_text(REMOTE_CODE)
    sys.path.insert(0, str(code))
    try:
        from modeling_tiny_remote import TinyAudioConfig, TinyAudioModel
    finally:
        sys.path.remove(str(code))
        sys.modules.pop("modeling_tiny_remote", None)
    folder = tmp_path / "remote"
    auto_map = {"AutoConfig": "modeling_tiny_remote.TinyAudioConfig", "AutoModel": "modeling_tiny_remote.TinyAudioModel"}
    TinyAudioModel(TinyAudioConfig(auto_map=auto_map)).save_pretrained(folder)
    shutil.copy(code / "modeling_tiny_remote.py", folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(folder)
    return str(folder)


def test_trust_remote_code_only_when_set_and_missing_last_hidden_state(remote_model, hf_models):
    assert ModelArgs().trust_remote_code is False
    with pytest.raises(ConfigError, match=r"model\.audio_encoder.*trust_remote_code"):
        _encoders(hf_models["clip_vision"], remote_model)
    encoder = _encoders(hf_models["clip_vision"], remote_model, trust_remote_code=True)["audio"]
    assert isinstance(encoder, HFAudioEncoder) and encoder.output_dim == 8
    with pytest.raises(ConfigError, match=r"model\.audio_encoder.*no last_hidden_state"):
        encoder.encode([np.zeros(1600, dtype=np.float32)])


def test_unreadable_encoder_names_the_key(hf_models, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model\.image_encoder"):
        _encoders(str(tmp_path / "empty"), hf_models["whisper_model"])
    with pytest.raises(ConfigError, match=r"model\.video_encoder"):
        build_encoders(ModelArgs(image_encoder=hf_models["clip_vision"], video_encoder=str(tmp_path / "empty"),
                                 audio_encoder=hf_models["whisper_model"]))
    with pytest.raises(ConfigError, match=r"model\.audio_encoder"):
        _encoders(hf_models["clip_vision"], str(tmp_path / "empty"))


def _without(folder: str, target, *names: str) -> str:
    """A copy of `folder` without the files `names`."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(*names))
    return str(target)


VALID = r"; expected an embedded name \({}\), a local folder with a config\.json, or a Hub id available offline$"


@pytest.mark.parametrize("key, given, problem", [
    ("image_encoder", "nonexistent/thing", r"not found \(.*\)" + VALID.format("efficientnet-lite0")),
    ("audio_encoder", "nonexistent/thing", r"not found \(.*\)" + VALID.format("whisper-tiny.en")),
    # a missing local folder is refused by the preflight, before any model loads (micl/preflight.py)
    ("video_encoder", "{tmp}/no/such/folder", None),
    ("image_encoder", "{tmp}", "a folder without a config.json" + VALID.format("efficientnet-lite0")),
    ("audio_encoder", "{no_weights}", r"a folder without weight files \(\*\.safetensors, "),
    ("audio_encoder", "{llm}", r"no feature extractor \("),
    ("image_encoder", "{llm}", r"no image processor \("),
])
def test_bad_encoder_exits_2_with_one_line(hf_models, tiny_models, synth_root, tmp_path, capsys, key, given, problem):
    """`micl train` with an encoder that is no encoder: exit 2, one line naming the key, what was given and what
    is valid (or what the folder lacks), before anything is encoded or trained."""
    from conftest import REPO, tiny_recipe_overrides
    from micl.cli import main

    given = given.format(tmp=tmp_path, llm=tiny_models["llm"],
                         no_weights=_without(hf_models["wav2vec2"], tmp_path / "no_weights", "*.safetensors"))
    task = "synth_audio_qa" if key == "audio_encoder" else "synth_video_qa" if key == "video_encoder" else \
        "synth_image_caption"
    capsys.readouterr()
    rc = main(["train", str(REPO / "recipes" / "finetune.yaml"),
               *tiny_recipe_overrides(tiny_models, synth_root, tmp_path / "run"), f"order=[{task}]",
               f"model.{key}={given}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    if problem is None:
        assert re.match(rf"micl: error: .*: 'model\.{key}': the local folder {re.escape(repr(given))} does not exist$",
                        err.strip()), err
    else:
        assert re.match(rf"micl: error: model\.{key}: {re.escape(repr(given))}: {problem}", err.strip()), err
    assert not (tmp_path / "run" / "results.json").exists()


def test_loading_errors_name_the_key(hf_models, tiny_models, media, tmp_path):
    """Failures once the weights load or run: weights of another architecture (missing from the checkpoint,
    which from_pretrained would initialise at random), and a model that does not take images."""
    mismatched = _without(hf_models["clip_vision"], tmp_path / "mismatched", "*.safetensors")
    shutil.copy(Path(hf_models["wav2vec2"]) / "model.safetensors", mismatched)
    backbone = _encoders(mismatched, hf_models["whisper_model"])["image"].backbone
    with pytest.raises(ConfigError, match=r"^model\.image_encoder: '.*mismatched': has no vision weights \(\d+ "
                                          r"missing, e\.g\. embeddings\."):
        backbone.model

    language_model = tmp_path / "language_model"
    shutil.copytree(tiny_models["llm"], language_model)
    shutil.copy(Path(hf_models["clip_vision"]) / "preprocessor_config.json", language_model)
    image = _encoders(str(language_model), hf_models["whisper_model"])["image"]
    with pytest.raises(ConfigError, match=r"^model\.image_encoder: '.*language_model': LlamaModel cannot encode "
                                          r"images \(.*\); use an encoder of images$"):
        image.encode([image.load(media["image"])])
