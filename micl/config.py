"""Typed recipe configuration: YAML file + dotted `key=value` overrides -> dataclasses.

Unknown keys and values of the wrong type are `ConfigError`s naming the key, the file and what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .data.schema import MODALITIES, TASK_TYPES
from .errors import ConfigError
from .utils.io import yaml_error_line

FEATURE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelArgs:
    llm: str = field(default="smollm2-135m-instruct", metadata={"help": "embedded name, Hub id or local folder",
                                                                "path": True})
    image_encoder: str = field(default="efficientnet-lite0", metadata={"help": "embedded name, Hub id or folder",
                                                                       "path": True})
    audio_encoder: str = field(default="whisper-tiny.en", metadata={"help": "embedded name, Hub id or folder",
                                                                    "path": True})
    video_encoder: str | None = field(default=None, metadata={"help": "frame encoder; null = image_encoder",
                                                              "path": True})
    image_tokens: int = field(default=9, metadata={"help": "pooled media tokens per image (a square number)"})
    audio_tokens: int = field(default=8, metadata={"help": "pooled media tokens per audio clip"})
    video_frames: int = field(default=4, metadata={"help": "frames sampled per video"})
    video_tokens_per_frame: int = field(default=4, metadata={"help": "pooled tokens per frame (square number)"})
    projector_hidden: int | None = field(default=None, metadata={"help": "projector width; null = LLM width"})
    system_prompt: str | None = field(default="", metadata={"help": "system message; null = template default"})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16", "float16"]})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "the LLM's attention: eager, sdpa, flash_attention_2 (needs flash-attn), ...; null = transformers' "
                "default"})
    trust_remote_code: bool = False
    feature_dtype: str | None = field(default=None, metadata={
        "help": "dtype of the stored media features (float32, bfloat16, float16); null = model.dtype"})
    encoder_batch_size: int = field(default=64, metadata={"help": "media items per encoder forward"})


@dataclass
class LoraArgs:
    type: str = field(default="lora", metadata={
        "choices": ["lora", "gated_lora", "moe_lora"],
        "help": "PEFT tuner: plain LoRA, Harmony's gated LoRA (micl/adapters/gated_lora), routed LoRA experts "
                "(micl/adapters/moe_lora)"})
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # settings of one tuner only (`tuner`): refused under another lora.type (micl/preflight.py)
    num_experts: int = field(default=10, metadata={"tuner": "moe_lora", "help": "LoRA experts per adapted module"})
    top_k: int = field(default=2, metadata={"tuner": "moe_lora", "help": "experts routed to per token (or sample)"})
    routing: str = field(default="token", metadata={"tuner": "moe_lora", "choices": ["token", "sample"],
                                                    "help": "routing unit"})
    gate_init: float = field(default=1.0, metadata={"tuner": "gated_lora",
                                                    "help": "omega = 2 * sigmoid(gate) at initialisation, in (0, 2); "
                                                            "1.0 = plain LoRA's scale"})


@dataclass
class DataArgs:
    root: str = field(default="data/synth", metadata={"help": "dataset root (jsonl per task and split)", "path": True})
    synth_seed: int = field(default=0, metadata={"help": "seed of micl-synth, generated on first use"})
    synth_train: int = 64
    synth_val: int = 48
    synth_test: int = 96
    max_train_samples: int | None = field(default=None, metadata={"help": "cap per task; null = all"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "cap per task; null = all"})
    eval_split: str = field(default="test", metadata={"choices": ["train", "val", "test"]})
    templates: str | None = field(default=None, metadata={"help": "prompt templates YAML; null = prompts/",
                                                          "path": True})


@dataclass
class TrainArgs:
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = field(default=3e-4, metadata={"help": "learning rate of the LoRA weights"})
    projector_lr: float | None = field(
        default=1e-3, metadata={"help": "learning rate of the projectors (trained from scratch); null = lr"}
    )
    weight_decay: float = 0.0
    optim: str = field(default="adamw_torch", metadata={
        "help": "optimizer, by its transformers name (adamw_torch, adamw_torch_fused, sgd, adafactor, ...)"})
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    save_steps: int = field(default=25, metadata={"help": "checkpoint every N optimizer steps within a task"})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "stop a task after this many epochs without a better validation score, keeping the best "
                "epoch's weights (train.epochs is then the maximum); null = train every epoch"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0 = no clipping"})
    ddp_timeout: float = field(default=1800, metadata={
        "help": "seconds a collective may wait for the other processes before the job fails"})
    logging_steps: int = 5
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the LLM's layer activations in the backward (less memory, more compute)"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loading worker processes per process"})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "page-locked batches (faster GPU copies)"})
    num_threads: int | None = field(default=None, metadata={"help": "torch threads on CPU; null = torch default"})
    tensorboard: bool = field(default=True, metadata={"help": "log to TensorBoard when it is installed"})


@dataclass
class EvalArgs:
    batch_size: int = 16
    max_new_tokens: int = 24
    num_beams: int = 1
    repetition_penalty: float = 1.0
    forward_transfer: bool = field(
        default=True, metadata={"help": "also score each task before it is learned (needed for FWT)"}
    )


@dataclass
class LaunchArgs:
    config: str | None = field(default=None, metadata={
        "help": "`micl train` starts the processes itself with this accelerate config: ddp, zero2, zero3, "
                "zero3_offload, cpu (recipes/accelerate/) or a config file; null = one process. Ignored under a "
                "launcher (accelerate launch, torchrun)"})
    num_processes: int | None = field(default=None, metadata={
        "help": "null = one per visible GPU (without GPUs: the accelerate config's num_processes)"})
    main_process_port: int | None = field(default=None, metadata={
        "help": "port of the processes' rendezvous; null = the config's, else Accelerate's default (29500)"})


@dataclass
class TaskArgs:
    """One task of the recipe's own (`tasks:`), next to micl's (eval/tasks.yaml); README "Your own dataset"."""
    name: str = field(metadata={"help": "the task's name, as in `order` and the `task` of its rows"})
    modality: str = field(metadata={"choices": list(MODALITIES)})
    task_type: str = field(metadata={"choices": list(TASK_TYPES)})
    metric: str | None = field(default=None, metadata={
        "help": "caption: caption (CIDEr), bleu_4, meteor, ...; qa: vqa_accuracy, exact_match; null = caption / "
                "vqa_accuracy"})
    data: str | None = field(default=None, metadata={
        "help": "folder of its {train,val,test}.jsonl under data.root; null = the name"})


@dataclass
class RecipeConfig:
    #: the dotted keys the recipe file and the overrides set (`load_recipe`), defaults left out
    given_keys: ClassVar[frozenset[str]] = frozenset()

    output_dir: str = field(default="runs/finetune", metadata={"path": True})
    order: Any = field(default="order1", metadata={"help": "name in eval/orders.yaml or a list of task names"})
    tasks: list[TaskArgs] = field(default_factory=list, metadata={
        "help": "tasks of the recipe's own: a list of {name, modality, task_type, metric, data}"})
    seed: int = 0
    method: Any = field(default="finetune", metadata={"help": "method name or list of names (hooks compose)"})
    method_args: dict = field(default_factory=dict, metadata={"help": "per-method settings, keyed by method"})
    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    launch: LaunchArgs = field(default_factory=LaunchArgs)
    push_to_hub: bool = field(
        default=False, metadata={"help": "push each finished phase to the Hugging Face Hub (docs/hub.md)"}
    )
    hub_repo: str | None = field(default=None, metadata={"help": "OWNER/NAME of the Hub repo; needed by push_to_hub"})
    hub_private: bool = field(default=False, metadata={"help": "create the Hub repo as private"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)


def _type_name(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, key: str, source: str):
    """Checks `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):  # an entry of a list of sections (`tasks`)
        return build_dataclass(tp, value, source, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build_dataclass(cls, values: dict, source: str, prefix: str = ""):
    """Builds `cls` from a mapping, strictly: unknown keys and wrong types are errors naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key '{full}'{hint}; valid keys"
                f"{' under ' + repr(prefix.rstrip('.')) if prefix else ''}: {', '.join(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value or {}, source, f"{full}.")
            continue
        coerced = _coerce(value, tp, full, source)
        choices = fields[key].metadata.get("choices")
        if choices and coerced not in choices:
            raise ConfigError(f"{source}: '{full}' must be one of {', '.join(choices)}, got {coerced!r}")
        kwargs[key] = coerced
    missing = [name for name, f in fields.items() if name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: '{prefix}{missing[0]}' is required (give {', '.join(missing)})")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value (e.g. train.epochs=2)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value: {yaml_error_line(err)}") from None
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return values


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_line(err)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(values).__name__}")
    values = apply_overrides(values, list(overrides or []))
    config = build_dataclass(RecipeConfig, values, str(path))
    expand_home(config)
    config.given_keys = frozenset(_dotted_keys(values, RecipeConfig))
    validate(config, str(path))
    return config


def _dotted_keys(values: dict, cls, prefix: str = ""):
    """The keys of `values` (a mapping `build_dataclass` accepted), sections' keys as section.key."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            yield from _dotted_keys(value, hints[key], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def expand_home(config) -> None:
    """A leading ~ of the path settings (`path` metadata) becomes the home folder: the loaders
    (transformers, pathlib) would take it literally."""
    for section in (config, *(getattr(config, f.name) for f in dataclasses.fields(config)
                              if dataclasses.is_dataclass(getattr(config, f.name)))):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.metadata.get("path") and isinstance(value, str) and value.startswith("~"):
                setattr(section, f.name, os.path.expanduser(value))


def validate(config: RecipeConfig, source: str) -> None:
    checks = [
        ("seed", config.seed >= 0, "a non-negative integer"),
        ("train.epochs", config.train.epochs >= 1, "an integer >= 1"),
        ("train.batch_size", config.train.batch_size >= 1, "an integer >= 1"),
        ("train.grad_accum", config.train.grad_accum >= 1, "an integer >= 1"),
        ("train.lr", config.train.lr > 0, "a positive number"),
        ("train.projector_lr", config.train.projector_lr is None or config.train.projector_lr > 0,
         "null or a positive number"),
        ("train.save_steps", config.train.save_steps >= 1, "an integer >= 1"),
        ("train.warmup_ratio", 0 <= config.train.warmup_ratio < 1, "a number in [0, 1)"),
        ("train.max_grad_norm", config.train.max_grad_norm >= 0, "a number >= 0"),
        ("train.ddp_timeout", config.train.ddp_timeout > 0, "a positive number of seconds"),
        ("train.early_stopping_patience",
         config.train.early_stopping_patience is None or config.train.early_stopping_patience >= 1,
         "null or an integer >= 1"),
        ("train.dataloader_num_workers", config.train.dataloader_num_workers >= 0, "an integer >= 0"),
        ("train.logging_steps", config.train.logging_steps >= 1, "an integer >= 1"),
        ("train.weight_decay", config.train.weight_decay >= 0, "a number >= 0"),
        ("train.num_threads", config.train.num_threads is None or config.train.num_threads >= 1,
         "null or an integer >= 1"),
        ("eval.repetition_penalty", config.eval.repetition_penalty > 0, "a positive number"),
        ("model.projector_hidden", config.model.projector_hidden is None or config.model.projector_hidden >= 1,
         "null or an integer >= 1"),
        ("eval.batch_size", config.eval.batch_size >= 1, "an integer >= 1"),
        ("eval.max_new_tokens", config.eval.max_new_tokens >= 1, "an integer >= 1"),
        ("eval.num_beams", config.eval.num_beams >= 1, "an integer >= 1"),
        ("lora.r", config.lora.r >= 1, "an integer >= 1"),
        ("lora.dropout", 0 <= config.lora.dropout < 1, "a number in [0, 1)"),
        ("model.image_tokens", _is_square(config.model.image_tokens), "a square number (4, 9, 16, ...)"),
        ("model.video_tokens_per_frame", _is_square(config.model.video_tokens_per_frame), "a square number"),
        ("model.audio_tokens", config.model.audio_tokens >= 1, "an integer >= 1"),
        ("model.video_frames", config.model.video_frames >= 1, "an integer >= 1"),
        ("model.feature_dtype", config.model.feature_dtype in (None, *FEATURE_DTYPES),
         f"null or one of {', '.join(FEATURE_DTYPES)}"),
        ("model.encoder_batch_size", config.model.encoder_batch_size >= 1, "an integer >= 1"),
    ]
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(config.data, key)
        checks.append((f"data.{key}", value is None or value >= 1, "null or an integer >= 1"))
    launch = config.launch
    checks += [
        ("launch.num_processes", launch.num_processes is None or launch.num_processes >= 1, "null or an integer >= 1"),
        ("launch.main_process_port", launch.main_process_port is None or 0 < launch.main_process_port < 65536,
         "null or a port number (1-65535)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{source}: '{key}' must be {expected}")
    if not isinstance(config.order, (str, list)) or (isinstance(config.order, list) and not config.order):
        raise ConfigError(f"{source}: 'order' must be an order name from eval/orders.yaml or a non-empty list of tasks")
    if not isinstance(config.method, (str, list)):
        raise ConfigError(f"{source}: 'method' must be a method name or a list of names")
    from .data.tasks import recipe_tasks

    recipe_tasks(config.tasks, source)
    _validate_launch(config.launch, source)
    if config.push_to_hub and not config.hub_repo:
        raise ConfigError(f"{source}: 'hub_repo' is required when 'push_to_hub' is true (e.g. hub_repo: OWNER/NAME)")
    if config.hub_repo is not None and not _is_hub_repo(config.hub_repo):
        raise ConfigError(f"{source}: 'hub_repo' must look like OWNER/NAME (letters, digits, '.', '_', '-'), "
                          f"got {config.hub_repo!r}")


def _validate_launch(launch: LaunchArgs, source: str) -> None:
    if launch.config is None:
        given = [k for k in ("num_processes", "main_process_port") if getattr(launch, k) is not None]
        if given:
            raise ConfigError(f"{source}: 'launch.{given[0]}' needs 'launch.config' (e.g. launch.config=ddp)")
        return
    from .launch import resolved_config

    resolved_config(launch.config, source)  # the config exists and names a DeepSpeed JSON that does


def _is_hub_repo(text: str) -> bool:
    from .hub import is_repo_id

    return is_repo_id(text)


def _is_square(n: int) -> bool:
    return n >= 1 and int(round(n**0.5)) ** 2 == n
