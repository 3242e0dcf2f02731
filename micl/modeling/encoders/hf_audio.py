"""Audio encoders by Hub id or local folder other than Whisper (see `registry.audio_encoder`, which dispatches on
the config's model_type): CLAP's audio tower, and any AutoModel whose output has `last_hidden_state` [B, T, C].

Both read the sampling rate from the checkpoint's feature extractor (48 kHz for CLAP, 16 kHz for AST / wav2vec2 /
HuBERT) and pool over time to `num_tokens` tokens by adaptive averaging; the pooling scheme is part of `identity`.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch

from ...data import media as media_io
from .hub_models import HubModel, config_dim
from .registry import AUDIO_KEY, EMBEDDED_AUDIO, MediaEncoder, pool_sequence

CLAP_MODEL_TYPES = ("clap", "clap_audio_model")  # ClapModel (audio + text) / ClapAudioModel folders


class ClapAudioTower(MediaEncoder):
    """CLAP's HTSAT audio tower (a ClapAudioModel, or the `audio_model` of a full ClapModel: no text inputs).

    Its `last_hidden_state` is a map [B, C, F, T]: C = patch_embeds_hidden_size * 2**(stages - 1) (= the audio
    config's hidden_size in released checkpoints), F frequency bins and T time steps in order (the extractor's
    max_length_s window; the Swin "image" folds time into 4 chunks, which the model already puts back in order).
    Frequency is averaged, as CLAP's own pooler does, then time is adaptively pooled to `tokens`, over the steps
    covering the real clip only: the extractor repeats a short clip to fill the window ("repeatpad"), and pooling the
    first copy keeps the clip's own time order. A clip longer than the window is cut by the extractor (a random
    crop; "fusion" checkpoints add a global view), with numpy's generator seeded per clip so features are
    reproducible; `is_longer` is set from the clip's real length (the extractor would flag a random one).
    """

    modality = "audio"

    def __init__(self, name_or_path: str, tokens: int, config):
        self.name = name_or_path
        self.num_tokens = tokens
        self.hub = HubModel(name_or_path, AUDIO_KEY, embedded=tuple(EMBEDDED_AUDIO))
        self.full_model = config.model_type == "clap"
        audio = config.audio_config if self.full_model else config
        self.fusion = bool(getattr(audio, "enable_fusion", False))
        self.output_dim = int(audio.patch_embeds_hidden_size * 2 ** (len(audio.depths) - 1))
        self.identity = f"audio|{name_or_path}|clap-freqmean|time{tokens}"
        self.feature_extractor  # read now: a folder without one fails at setup, not at its first task

    def weight_locations(self) -> list:
        return [self.hub.weights_location()]

    @cached_property
    def model(self):
        from transformers import ClapAudioModel, ClapModel

        if self.full_model:
            return self.placed(self.hub.model(ClapModel, "CLAP audio", prefix="audio_model.").audio_model)
        return self.placed(self.hub.model(ClapAudioModel, "CLAP audio"))

    @cached_property
    def feature_extractor(self):
        from transformers import ClapFeatureExtractor

        return self.hub.processor(ClapFeatureExtractor, "CLAP feature extractor")

    def load(self, path):
        return media_io.load_audio(path, sampling_rate=self.feature_extractor.sampling_rate)

    def _features(self, waveform: np.ndarray) -> torch.Tensor:
        extractor = self.feature_extractor
        state = np.random.get_state()
        try:
            np.random.seed(0)  # the extractor crops long clips at random
            features = extractor(waveform, sampling_rate=extractor.sampling_rate, return_tensors="pt",
                                 truncation="fusion" if self.fusion else "rand_trunc", padding="repeatpad")
        finally:
            np.random.set_state(state)
        return features["input_features"][0].float()

    @torch.no_grad()
    def encode(self, items):
        waveforms = [np.asarray(w, dtype=np.float32) for w in items]
        window = self.feature_extractor.nb_max_samples
        features = torch.stack([self._features(w) for w in waveforms])
        is_longer = torch.tensor([[len(w) > window] for w in waveforms])
        states = self.hub.states(self.model, "audio", input_features=self.inputs(features),
                                 is_longer=self.inputs(is_longer))
        if states.dim() != 4 or states.shape[1] != self.output_dim:
            raise self.hub.error(f"the CLAP audio tower returned last_hidden_state {tuple(states.shape)}, "
                                 f"expected [B, {self.output_dim}, F, T]")
        sequence = states.mean(dim=2).transpose(1, 2)  # [B, T, C]
        steps = sequence.shape[1]
        pooled = []
        for waveform, state in zip(waveforms, sequence):
            covered = math.ceil(min(len(waveform), window) / window * steps)
            frames = min(steps, max(self.num_tokens, covered))
            pooled.append(pool_sequence(state[None, :frames], self.num_tokens)[0])
        return torch.stack(pooled)


class HFAudioEncoder(MediaEncoder):
    """Any audio AutoModel + AutoFeatureExtractor whose output has `last_hidden_state` [B, T, C] (AST, wav2vec2,
    HuBERT, WavLM, ...); `output_dim` is the config's hidden_size (or d_model).

    Clips are encoded one at a time, so no batch padding enters the states, and the whole sequence is adaptively
    average-pooled to `tokens` (time for wav2vec2-like models; for AST the sequence is its CLS / distillation tokens
    followed by the frequency x time patches, pooled in that order).
    """

    modality = "audio"

    def __init__(self, name_or_path: str, tokens: int, config, trust_remote_code: bool = False):
        self.name = name_or_path
        self.num_tokens = tokens
        self.hub = HubModel(name_or_path, AUDIO_KEY, trust_remote_code, tuple(EMBEDDED_AUDIO))
        self.output_dim = config_dim(config, self.hub)
        self.identity = f"audio|{name_or_path}|sequence|time{tokens}"
        self.feature_extractor  # read now: a folder without one fails at setup, not at its first task

    def weight_locations(self) -> list:
        return [self.hub.weights_location()]

    @cached_property
    def model(self):
        from transformers import AutoModel

        # masked_spec_embed: wav2vec2 / HuBERT's SpecAugment mask, used in training only
        return self.placed(self.hub.model(AutoModel, "audio", unused=("pooler.", "masked_spec_embed")))

    @cached_property
    def feature_extractor(self):
        from transformers import AutoFeatureExtractor

        return self.hub.processor(AutoFeatureExtractor, "feature extractor")

    @property
    def sampling_rate(self) -> int:
        return int(getattr(self.feature_extractor, "sampling_rate", None) or 16000)

    def load(self, path):
        return media_io.load_audio(path, sampling_rate=self.sampling_rate)

    @torch.no_grad()
    def encode(self, items):
        pooled = []
        for waveform in items:
            inputs = self.feature_extractor(np.asarray(waveform, dtype=np.float32), sampling_rate=self.sampling_rate,
                                            return_tensors="pt")
            inputs = {k: self.inputs(v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
            states = self.hub.states(self.model, "audio", **inputs)
            if states.dim() != 3 or states.shape[-1] != self.output_dim:
                raise self.hub.error(f"returned last_hidden_state {tuple(states.shape)}, "
                                     f"expected [B, T, {self.output_dim}]")
            pooled.append(pool_sequence(states[:1], self.num_tokens)[0])
        return torch.stack(pooled)
