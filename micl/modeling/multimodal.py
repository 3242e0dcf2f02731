"""MultimodalLM: any causal LM (LoRA through PEFT) + one trainable projector per modality.

Frozen encoders are not part of this module: their features are computed once and cached on disk
(`micl/modeling/feature_store.py`), so training and generation only see pooled feature tensors. This
keeps the trained module = LLM + adapters + projectors, which is what DeepSpeed/Accelerate wrap later.

Saved as a phase folder (its layout: micl/run_folder.py). `base_updates.safetensors` holds the low-rank
updates a method folded into the frozen base weights (`merge_low_rank`, micl/modeling/low_rank.py), replayed
on load in order; `media_modulator.safetensors` a module applied to the projected media tokens.
"""

from __future__ import annotations

import contextlib

import importlib
import inspect
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from .. import adapters  # noqa: F401  (registers micl's tuners with PEFT: a gated_lora/moe_lora phase loads)
from ..errors import MiclError
from ..run_folder import (ADAPTER_DIR, MODEL_CONFIG_FILE, MODULATOR_FILE, PROJECTORS_FILE, UPDATES_FILE, RunFolder,
                          adapter_folder, is_run_folder)
from .low_rank import (UPDATES_FORMAT, apply_low_rank_update, same_update, updates_from_tensors,
                       updates_to_tensors)
from .projectors import build_projectors
from .prompting import IGNORE_INDEX, MEDIA_ORDER
from transformers.utils import ModelOutput

#: the batch keys MultimodalLM.forward takes
MODEL_INPUTS = ("input_ids", "attention_mask", "media_mask", "media_features", "media_rows", "media_tasks", "labels",
                "media_masks", "logits_to_keep", "media_tokens")


@dataclass
class MultimodalOutput(ModelOutput):
    """What one MultimodalLM.forward computed; a hook reads it from its arguments (`extra_loss(..., outputs,
    ...)`) or from the forwards it runs itself, never from module attributes that the next forward overwrites.

    `logits` cover positions `logits_offset`.. of the batch. `media_tokens`: {modality: [n, T, d]} the
    projected media tokens as they enter the LLM (after the media modulator, in the projectors' dtype), None
    without media. `hidden_states`: the LLM's final hidden states [batch, length, d] (after its last norm: the
    LM head's input, at every position), only with `output_hidden_states=True`. `aux`: what the media
    modulator recorded for the methods in this forward (its keys are the modulator's, e.g.
    harmony's historical proxies)."""

    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    logits_offset: int | None = None
    media_tokens: dict | None = None
    hidden_states: torch.Tensor | None = None
    aux: dict | None = None


def label_window_of(labels) -> int:
    """`logits_to_keep` from a labels tensor (reads it back from the device: the collator works it out
    on the CPU instead)."""
    if labels is None:
        return 0
    targets = (labels[:, 1:] != IGNORE_INDEX).any(0)
    if not bool(targets.any()):
        return 0
    first = int(targets.nonzero()[0])  # the logit at `first` predicts the first target token
    return labels.shape[1] - first


def model_inputs(batch: dict) -> dict:
    """The keys MultimodalLM.forward takes; hooks may add others to a batch (e.g. a pseudo-target batch)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def move_to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


class MultimodalLM(nn.Module):
    def __init__(self, llm, tokenizer, media_dims: dict[str, int], projector_hidden: int | None = None, settings=None):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.media_dims = dict(media_dims)
        self.settings = dict(settings or {})
        llm_dim = llm.get_input_embeddings().embedding_dim
        # trained from scratch: kept in float32 whatever the LLM's dtype (a bf16 weight does not move at small
        # learning rates); the compute runs in the LLM's dtype under autocast, or is cast in `embed`
        self.projectors = build_projectors(self.media_dims, llm_dim, projector_hidden)
        # optional: a module called in `embed` as modulator(projected, media_rows, media_tasks, aux), mapping
        # {modality: projected tokens [n, T, d]} to the same (media_rows / media_tasks as in the batch) and
        # putting what methods need from it into `aux` (a dict of this forward: MultimodalOutput.aux); it
        # must have `modulator_config()` -> JSON kwargs of its class, to be rebuilt from a phase folder
        self.media_modulator = None
        self.low_rank_updates: list[dict] = []  # folded into the base weights, in order (merge_low_rank)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def with_adapter(cls, llm, tokenizer, media_dims, peft_config, projector_hidden=None, settings=None):
        """The LLM frozen, wrapped by `get_peft_model` with any PEFT config (LoRA or a tuner registered by
        micl.adapters)."""
        for param in llm.parameters():
            param.requires_grad_(False)
        peft_llm = get_peft_model(llm, peft_config)
        model = cls(peft_llm, tokenizer, media_dims, projector_hidden, settings)
        model.upcast_trainable()
        return model

    def upcast_trainable(self) -> None:
        """Trainable parameters in float32 (an fp32 master copy, as DeepSpeed keeps one in its optimizer):
        AdamW on bf16 weights at lr 1e-5 leaves most of them unchanged, and fp16 gradients cannot be unscaled.
        PEFT already does this for its own adapters; this covers micl's tuners, projectors and modulators."""
        for param in self.parameters():
            if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()

    # ---- forward --------------------------------------------------------------------------------------
    def embed(self, input_ids, media_mask, media_features=None, media_rows=None, media_tasks=None, media_masks=None):
        """The input embeddings, media placeholders replaced by the projected media tokens."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if media_features:
            media_tokens = self.project_media(media_features, media_rows, media_tasks)
            embeds = self.place_media(embeds, media_mask, media_tokens, media_rows, media_masks)
        return embeds

    def project_media(self, media_features: dict, media_rows=None, media_tasks=None, aux: dict | None = None) -> dict:
        """{modality: projected tokens [n, T, d]}, through the media modulator if there is one (which may
        record into `aux`)."""
        projected = {}
        for modality, features in media_features.items():
            if modality not in self.projectors:
                raise MiclError(f"no projector for modality {modality!r}; known: {', '.join(self.projectors)}")
            projector = self.projectors[modality]
            projected[modality] = projector(features.to(projector.dtype))
        if self.media_modulator is not None:  # as trainable as the projectors: the same dtype
            projected = self.media_modulator(projected, media_rows, media_tasks, aux)
        return projected

    def place_media(self, embeds, media_mask, media_tokens: dict, media_rows=None, media_masks=None):
        """`embeds` with the media placeholders filled by `media_tokens` (cast to the embeddings' dtype)."""
        projected = {m: tokens.to(embeds.dtype) for m, tokens in media_tokens.items()}
        if media_masks is None:  # a batch not made by MultimodalCollator
            return self._scatter_by_rows(embeds, media_mask, projected, media_rows)
        # each modality's placeholders, filled in row-major order: one item per row and modality, in row order
        for modality, tokens in projected.items():
            mask = media_masks[modality].unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, tokens.reshape(-1, tokens.shape[-1]))
        return embeds

    @staticmethod
    def _scatter_by_rows(embeds, media_mask, projected, media_rows):
        pieces = []
        for modality, tokens in projected.items():
            slot = MEDIA_ORDER.index(modality)
            pieces.extend(((row, slot), t) for row, t in zip(media_rows[modality].tolist(), tokens))
        # masked_scatter fills the placeholders in row-major order, so the media go in by row, and within a
        # row (a video and its sound) in the prompt's MEDIA_ORDER.
        pieces.sort(key=lambda item: item[0])
        media = torch.cat([p for _, p in pieces], dim=0)
        expected = int(media_mask.sum())
        if media.shape[0] != expected:
            raise MiclError(f"batch has {expected} media placeholders but {media.shape[0]} media tokens")
        return embeds.masked_scatter(media_mask.unsqueeze(-1), media)

    @staticmethod
    def position_ids(attention_mask):
        # left padding: positions count real tokens only
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(self, input_ids, attention_mask, media_mask, media_features=None, media_rows=None, media_tasks=None,
                labels=None, media_masks=None, logits_to_keep=None, output_hidden_states: bool = False,
                media_tokens=None):
        """Logits of the last `logits_to_keep` positions only (0 = all; None = those that predict a target,
        worked out from `labels`): the LM head is a fifth of a 1B model's FLOPs and only the few target
        positions at the end of a left-padded row need it. With labels, the loss is the summed token
        cross-entropy (`loss_sum`, over `num_tokens` targets) and its mean (`loss`). Also returns the media
        tokens, the modulator's `aux` and, with `output_hidden_states`, the final hidden states
        (MultimodalOutput). `media_tokens` ({modality: [n, T, d]}, laid out as `media_features`) are media
        already in the LLM's input space (e.g. synthetic feature proxies): placed as they are, without the
        projectors or the media modulator."""
        embeds, aux = self.llm.get_input_embeddings()(input_ids), {}
        if media_tokens:
            embeds = self.place_media(embeds, media_mask, media_tokens, media_rows, media_masks)
        elif media_features:
            media_tokens = self.project_media(media_features, media_rows, media_tasks, aux)
            embeds = self.place_media(embeds, media_mask, media_tokens, media_rows, media_masks)
        if logits_to_keep is None:
            logits_to_keep = label_window_of(labels)
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep and self._keeps_logits else {}
        if output_hidden_states:
            kwargs["output_hidden_states"] = True
        with self._labels_for_the_tuner(labels):
            outputs = self.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                               position_ids=self.position_ids(attention_mask), **kwargs)
        logits = outputs.logits
        result = MultimodalOutput(logits=logits, logits_offset=input_ids.shape[1] - logits.shape[1],
                                  media_tokens=media_tokens, aux=aux)
        if output_hidden_states:
            result.hidden_states = outputs.hidden_states[-1]
        if labels is not None:
            targets = labels[:, result.logits_offset + 1:]
            result.loss_sum = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
            result.num_tokens = (targets != IGNORE_INDEX).sum()
            result.loss = result.loss_sum / result.num_tokens.clamp(min=1)
        return result

    def _labels_for_the_tuner(self, labels):
        """The LLM is called without labels (the loss is computed here, on the kept logits only); a tuner that
        reads them (moe_lora's sample routing pools the prompt) is given them this way."""
        give = getattr(getattr(self.llm, "base_model", None), "labels_for_routing", None)
        return give(labels) if give is not None and labels is not None else contextlib.nullcontext()

    @cached_property
    def _keeps_logits(self) -> bool:
        """Whether the LLM's forward takes `logits_to_keep` (transformers' causal LMs since 4.45)."""
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """`train.gradient_checkpointing` (the Trainer calls this): the LLM's decoder layers recompute their
        activations in the backward instead of keeping them; the small projectors keep theirs."""
        checkpoint_kwargs = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        # a tuner with per-call state (moe_lora's routing context) restores it for the recomputation
        context_fn = getattr(getattr(self.llm, "base_model", None), "checkpoint_context_fn", None)
        if context_fn is not None and checkpoint_kwargs.get("use_reentrant") is False:
            checkpoint_kwargs.setdefault("context_fn", context_fn)
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        else:  # older transformers
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """The name older Trainers call."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @torch.no_grad()
    def generate(self, batch, max_new_tokens=24, num_beams=1, repetition_penalty=1.0) -> list[str]:
        batch = move_to(batch, self.device)
        inputs_embeds = self.embed(batch["input_ids"], batch["media_mask"], batch.get("media_features"),
                                   batch.get("media_rows"), batch.get("media_tasks"), batch.get("media_masks"))
        output = self.llm.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    # ---- trainable state -----------------------------------------------------------------------------
    def saved_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters `save_pretrained` writes: the adapter's (frozen ones too, e.g. frozen MoE experts),
        the projectors and the media modulator; under ZeRO-3 they are gathered around a save."""
        prefix = getattr(getattr(self.llm, "base_model", None), "prefix", None)
        return [p for n, p in self.named_parameters()
                if p.requires_grad or not n.startswith("llm.") or (prefix and prefix in n)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().clone() for name, param in self.named_parameters() if param.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        missing = [name for name, p in own.items() if p.requires_grad and name not in state]
        unknown = [name for name in state if name not in own]
        if missing or unknown:
            raise MiclError(f"trainable state mismatch: missing {missing[:3]}, unexpected {unknown[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)

    # ---- base-weight updates and media modulator ------------------------------------------------------
    @torch.no_grad()
    def merge_low_rank(self, update: dict) -> None:
        """Folds {weight name in self.llm: (up, down, scale)} into the frozen base weights (W += up @ down *
        scale) and records it, so that saved phases replay it (micl/modeling/low_rank.py)."""
        update = {name: tuple(t.detach().cpu().clone() for t in factors) for name, factors in update.items()}
        apply_low_rank_update(self.llm, update)
        self.low_rank_updates.append(update)

    def _replay_low_rank(self, updates: list[dict], folder) -> None:
        done = self.low_rank_updates
        if len(done) > len(updates) or not all(same_update(a, b) for a, b in zip(done, updates)):
            raise MiclError(f"{folder}: this model's base weights already hold low-rank updates that this phase "
                            f"does not start with; load the phase into a freshly built model")
        for update in updates[len(done):]:
            self.merge_low_rank(update)

    def set_media_modulator(self, module) -> None:
        if module is not None:
            module.to(device=self.device, dtype=next(self.projectors.parameters()).dtype)
        self.media_modulator = module

    @staticmethod
    def _build_modulator(spec: dict):
        module_name, _, qualname = spec["class"].partition(":")
        if module_name.split(".")[0] != "micl":  # micl_model.json may come from the Hub: no arbitrary imports
            raise MiclError(f"media_modulator class {spec['class']!r} is not part of micl; refusing to import it")
        cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        return cls(**spec.get("config", {}))

    def _load_extras(self, folder: Path, settings: dict) -> None:
        """Base-weight updates and media modulator of a saved phase (absent files: nothing to do)."""
        updates_file = folder / UPDATES_FILE
        self._replay_low_rank(updates_from_tensors(load_file(str(updates_file))) if updates_file.is_file() else [],
                              folder)
        spec = settings.get("media_modulator")
        if spec is None:
            self.media_modulator = None
            return
        module = self._build_modulator(spec)
        module.load_state_dict(load_file(str(folder / MODULATOR_FILE)))
        self.set_media_modulator(module)

    # ---- save / load ---------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.llm.save_pretrained(folder / ADAPTER_DIR)
        projectors = {k: v.detach().contiguous().cpu() for k, v in self.projectors.state_dict().items()}
        tmp = folder / f".{PROJECTORS_FILE}.tmp"
        save_file(projectors, str(tmp))
        os.replace(tmp, folder / PROJECTORS_FILE)
        settings = {"media_dims": self.media_dims, **self.settings}
        if self.low_rank_updates:
            save_file(updates_to_tensors(self.low_rank_updates), str(folder / UPDATES_FILE),
                      metadata={"format": UPDATES_FORMAT, "count": str(len(self.low_rank_updates))})
        if self.media_modulator is not None:
            cls = type(self.media_modulator)
            settings["media_modulator"] = {"class": f"{cls.__module__}:{cls.__qualname__}",
                                           "config": self.media_modulator.modulator_config()}
            state = {k: v.detach().contiguous().cpu() for k, v in self.media_modulator.state_dict().items()}
            save_file(state, str(folder / MODULATOR_FILE))
        (folder / MODEL_CONFIG_FILE).write_text(json.dumps(settings, indent=2))

    def load_phase(self, folder: str | Path) -> None:
        """Loads a saved phase (adapter + projectors) into this model, in place."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        folder = Path(folder)
        adapter_weights = load_peft_weights(str(folder / ADAPTER_DIR), device="cpu")
        set_peft_model_state_dict(self.llm, adapter_weights)
        self.projectors.load_state_dict(load_file(str(folder / PROJECTORS_FILE)))
        self._load_extras(folder, json.loads((folder / MODEL_CONFIG_FILE).read_text()))

    @classmethod
    def from_pretrained(cls, folder: str | Path, llm=None, tokenizer=None, is_trainable: bool = False,
                        revision: str | None = None, token: str | None = None):
        """Rebuilds the wrapper from a saved phase folder, a run folder (its last finished phase), or from a
        Hub repo id pushed by `micl push`
        (`revision` = a branch `step-<k>-<task>`, default main; downloaded with snapshot_download, endpoint
        and token from huggingface_hub's environment unless `token` is given). The base LLM is loaded from
        the saved id unless given."""
        from .llm import load_llm

        if not Path(folder).exists() and isinstance(folder, str):
            from ..hub import download_phase, is_repo_id

            if is_repo_id(folder):
                folder = download_phase(folder, revision=revision, token=token)
        elif revision is not None:
            raise MiclError(f"{folder}: revision= only applies to a Hub repo id, not to a local folder")
        folder = Path(folder)
        if is_run_folder(folder):
            folder = RunFolder(folder).last_phase().folder
        config_file = folder / MODEL_CONFIG_FILE
        if not config_file.is_file():
            raise MiclError(f"{config_file}: not found; is {folder} a micl phase folder?")
        settings = json.loads(config_file.read_text())
        if llm is None:
            llm, tokenizer = load_llm(settings["llm"], settings.get("dtype", "float32"),
                                      settings.get("trust_remote_code", False))
        peft_llm = PeftModel.from_pretrained(llm, str(adapter_folder(folder)), is_trainable=is_trainable)
        media_dims = settings.pop("media_dims")
        modulator = settings.pop("media_modulator", None)
        model = cls(peft_llm, tokenizer, media_dims, settings.get("projector_hidden"), settings)
        model.projectors.load_state_dict(load_file(str(folder / PROJECTORS_FILE)))
        model._load_extras(folder, {"media_modulator": modulator})
        if not is_trainable:
            model.projectors.requires_grad_(False)
            if model.media_modulator is not None:
                model.media_modulator.requires_grad_(False)
        return model
