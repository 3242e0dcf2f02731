"""Transformers encoders by Hub id or local folder: the one loading path of the vision towers (registry.py) and
the audio models (Whisper in registry.py, CLAP and AutoModel audio in hf_audio.py).

Whatever goes wrong on the way -- a name that is no model here, a folder without a config.json or without weight
files, an unknown model type, custom code not allowed, weights that do not fit the architecture, a processor
missing, a model that does not take the media's inputs -- is a ConfigError naming the recipe key
(`model.image_encoder`, `model.video_encoder`, `model.audio_encoder`), what was given and, where the name is the
problem, what is valid. The CLI prints it on one line and exits 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ConfigError
from ...utils.io import looks_local

# weight files transformers loads (safetensors / PyTorch, sharded or not; TF / Flax checkpoints)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (transformers' errors run over many lines)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _is_auto_class(cls) -> bool:
    """AutoModel, AutoConfig, AutoImageProcessor, ...: the classes that may run a checkpoint's own code."""
    return cls.__module__.startswith("transformers.models.auto")


@dataclass(frozen=True)
class HubModel:
    """A transformers checkpoint named by the recipe key `key`: a Hub id or a local folder (`name`)."""

    name: str
    key: str
    trust_remote_code: bool = False
    embedded: tuple[str, ...] = ()  # the key's embedded names, listed when `name` is not valid

    # ---- errors -------------------------------------------------------------------------------------
    def error(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.key}: {self.name!r}: {problem}")

    @property
    def valid(self) -> str:
        embedded = f"an embedded name ({', '.join(self.embedded)}), " if self.embedded else ""
        return f"expected {embedded}a local folder with a config.json, or a Hub id available offline"

    def _remote(self, cls) -> dict:
        return {"trust_remote_code": self.trust_remote_code} if _is_auto_class(cls) else {}

    # ---- where it is ----------------------------------------------------------------------------------
    def local_folder(self) -> Path | None:
        path = Path(self.name).expanduser()
        return path if path.is_dir() else None

    def weights_location(self) -> Path:
        """The folder the weights load from on this machine: the local folder, or the snapshot of the Hub id in
        the Hugging Face cache (`.../snapshots/<commit>`), for the feature store's fingerprint."""
        folder = self.local_folder()
        if folder is not None:
            if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir() if p.is_file()):
                raise self.error(f"a folder without weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
            return folder
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.name, "config.json")
        if not isinstance(cached, str):  # its config was read, so it is there unless the cache moved meanwhile
            raise self.error(f"not in the Hugging Face cache of this machine; {self.valid}")
        return Path(cached).parent

    # ---- loading --------------------------------------------------------------------------------------
    def config(self):
        """Its transformers config (nothing else is read: no weights)."""
        from transformers import AutoConfig

        folder = self.local_folder()
        if folder is None and looks_local(self.name):
            raise self.error(f"no such folder; {self.valid}")
        if folder is not None and not (folder / "config.json").is_file():
            raise self.error(f"a folder without a config.json; {self.valid}")
        try:
            return AutoConfig.from_pretrained(self.name, trust_remote_code=self.trust_remote_code)
        except OSError as err:  # not on the Hub / not in the cache offline, no config.json in the repo
            raise self.error(f"not found ({first_line(err)}); {self.valid}") from err
        except Exception as err:  # unknown model type, custom code refused, a malformed config.json, ...
            reason = first_line(err)
            if "custom code" in str(err) and not self.trust_remote_code:
                reason += " (set model.trust_remote_code=true to run it)"
            raise self.error(f"cannot read its transformers config: {reason}") from err

    def model(self, cls, what: str, prefix: str = "", unused: tuple[str, ...] = ()):
        """`cls.from_pretrained` in float32, in eval mode. Refused when a weight under `prefix` (the part that
        runs) is not in the checkpoint, which from_pretrained would initialise at random; `unused`: prefixes
        (after `prefix`) of modules whose output is never read (a pooler)."""
        try:
            model, info = cls.from_pretrained(self.name, dtype=torch.float32, output_loading_info=True,
                                              **self._remote(cls))
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # no weight files, weights of another shape, an unreadable file, ...
            raise self.error(f"cannot load its weights as {cls.__name__}: {first_line(err)}") from err
        missing = sorted(k for k in info["missing_keys"]
                         if k.startswith(prefix) and not k[len(prefix):].startswith(unused))
        if missing:
            raise self.error(f"has no {what} weights ({len(missing)} missing, e.g. {missing[0]})")
        return model.eval()

    def processor(self, cls, what: str):
        """Its image processor / feature extractor (`what` names it in the error)."""
        try:
            return cls.from_pretrained(self.name, **self._remote(cls))
        except Exception as err:
            raise self.error(f"no {what} ({first_line(err)})") from err

    def states(self, model, media: str, **inputs) -> torch.Tensor:
        """The model's `last_hidden_state` on `inputs`; a model that does not take them (not an encoder of
        `media`) or whose output has no last_hidden_state is a ConfigError."""
        try:
            output = model(**inputs)
        except (TypeError, ValueError) as err:  # e.g. a language model given pixel_values
            raise self.error(f"{type(model).__name__} cannot encode {media} ({first_line(err)}); "
                             f"use an encoder of {media}") from err
        states = getattr(output, "last_hidden_state", None)
        if states is None and isinstance(output, dict):
            states = output.get("last_hidden_state")
        if not isinstance(states, torch.Tensor):
            raise self.error(f"the output of {type(model).__name__} ({type(output).__name__}) has no "
                             "last_hidden_state; use an encoder model whose output has one")
        return states


def config_dim(config, hub: HubModel) -> int:
    """Output width from a config: `hidden_size`, else the last of `hidden_sizes` (conv nets), else `d_model`."""
    if isinstance(getattr(config, "hidden_size", None), int):
        return config.hidden_size
    if getattr(config, "hidden_sizes", None):
        return int(config.hidden_sizes[-1])
    if isinstance(getattr(config, "d_model", None), int):
        return config.d_model
    raise hub.error(f"its config ({config.model_type}) names no hidden_size / hidden_sizes / d_model to size the "
                    "projector from")
