"""The preflight: everything about a run that can be checked before a model is loaded or a file is written.

`preflight(config, source, zero_stage)` runs the checks of CHECKS in order; the first that fails raises a
ConfigError (or DataError) naming the recipe key or the file and what is expected, which the CLI prints on
one line (exit code 2). `micl train` runs it in the command a user typed, before it starts any process
(micl/launch.py, with the ZeRO stage of the accelerate config it launches), and every run runs it first
(ContinualRun.run, with the stage of the launcher it runs under). docs/preflight.md lists the checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .config import LoraArgs, RecipeConfig, validate
from .errors import ConfigError, DataError
from .utils.io import looks_local

#: learning-rate schedules of transformers that need settings micl does not pass (evaluation during training,
#: lr_scheduler_kwargs): refused here rather than when the first Trainer builds its scheduler
SCHEDULERS_NEEDING_SETTINGS = ("reduce_lr_on_plateau", "greedy", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                               "warmup_stable_decay")


@dataclass
class Plan:
    """What the checks look at: the recipe, where it came from, and the DeepSpeed ZeRO stage it will run
    under (None without DeepSpeed)."""

    config: RecipeConfig
    source: str
    zero_stage: int | None

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    @cached_property
    def tasks(self) -> list:
        from .data.orders import resolve_order
        from .data.tasks import get_task, recipe_tasks, use_recipe_tasks

        use_recipe_tasks(recipe_tasks(self.config.tasks, self.source))  # the recipe's own tasks, by name
        return [get_task(name) for name in resolve_order(self.config.order)]

    @cached_property
    def methods(self) -> list:
        from .methods import build_methods

        # the launching parent knows DeepSpeed from the launch config, a launched process from its environment
        return build_methods(self.config, self.source, deepspeed=True if self.zero_stage is not None else None)

    def needed_splits(self) -> list[str]:
        """The splits a run reads: train, the evaluation split, and val for early stopping."""
        splits = ["train", self.config.data.eval_split]
        if self.config.train.early_stopping_patience is not None:
            splits.append("val")
        return list(dict.fromkeys(splits))


# ---- the recipe's values -------------------------------------------------------------------------------
def check_values(plan: Plan) -> None:
    """Ranges and choices of every key, hub_repo's form, the launch config (micl/config.py)."""
    validate(plan.config, plan.source)


def check_tuner_keys(plan: Plan) -> None:
    """A setting of another tuner than `lora.type` (e.g. lora.num_experts under lora.type: lora) would be
    ignored: refused when the recipe sets it, even at its default value (a config built in code, without
    `given_keys`: when it differs from the default)."""
    lora = plan.config.lora
    given = {key.removeprefix("lora.") for key in plan.config.given_keys if key.startswith("lora.")}
    for f in dataclasses.fields(LoraArgs):
        tuner = f.metadata.get("tuner")
        changed = getattr(lora, f.name) != getattr(LoraArgs(), f.name)
        if tuner is not None and tuner != lora.type and (f.name in given or changed):
            raise plan.error(f"'lora.{f.name}' is a setting of lora.type {tuner}, but lora.type is {lora.type}: "
                             f"remove it or set lora.type: {tuner}")


def check_tuner_values(plan: Plan) -> None:
    """The selected tuner's own ranges (checked by the PEFT configs only when the model is built)."""
    lora = plan.config.lora
    if lora.type == "moe_lora":
        if lora.num_experts < 1:
            raise plan.error(f"'lora.num_experts' must be an integer >= 1, got {lora.num_experts}")
        if not 1 <= lora.top_k <= lora.num_experts:
            raise plan.error(f"'lora.top_k' must be an integer between 1 and lora.num_experts ({lora.num_experts}), "
                             f"got {lora.top_k}")
    if lora.type == "gated_lora" and not 0.0 < lora.gate_init < 2.0:
        raise plan.error(f"'lora.gate_init' must be in (0, 2) (omega = 2 * sigmoid(gate)), got {lora.gate_init}")


def check_optimizer(plan: Plan) -> None:
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    value = plan.config.train.optim
    if value not in names:
        close = difflib.get_close_matches(value, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise plan.error(f"'train.optim' must be an optimizer name of transformers, got {value!r}{hint}; valid: "
                         f"{', '.join(names)}")


def check_lr_scheduler(plan: Plan) -> None:
    from transformers import SchedulerType

    usable = [s.value for s in SchedulerType if s.value not in SCHEDULERS_NEEDING_SETTINGS]
    value = plan.config.train.lr_scheduler
    if value in SCHEDULERS_NEEDING_SETTINGS:
        raise plan.error(f"'train.lr_scheduler' {value!r} needs settings micl does not pass (evaluation during "
                         f"training or lr_scheduler_kwargs); use one of {', '.join(usable)}")
    if value not in usable:
        raise plan.error(f"'train.lr_scheduler' must be one of {', '.join(usable)}, got {value!r}")


def check_attention(plan: Plan) -> None:
    if plan.config.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise plan.error("'model.attn_implementation' flash_attention_2 needs the flash-attn package (pip install "
                         "flash-attn), or use sdpa")


# ---- methods and the launcher --------------------------------------------------------------------------
def check_order(plan: Plan) -> None:
    """`order` names an order of eval/orders.yaml or known tasks."""
    plan.tasks


def check_methods(plan: Plan) -> None:
    """Method names, method_args, and what each method declares against the recipe (micl/methods)."""
    plan.methods


def check_zero3(plan: Plan) -> None:
    """Under ZeRO-3 the weights are shards on every rank: methods that read or change them outside the
    Trainer's forward (`supports_zero3 = False`) and early stopping (it keeps the best epoch's weights) are
    refused, instead of failing or deadlocking after the first evaluations."""
    if plan.zero_stage != 3:
        return
    refused = [m.name for m in plan.methods if not m.supports_zero3]
    if refused:
        raise plan.error(f"method {', '.join(refused)} is not supported under DeepSpeed ZeRO-3 (weights partitioned "
                         f"across processes); use ZeRO-2 or DDP (launch.config=zero2 or ddp, docs/distributed.md)")
    if plan.config.train.early_stopping_patience is not None:
        raise plan.error("'train.early_stopping_patience' is not supported under DeepSpeed ZeRO-3 (the best epoch's "
                         "weights would be shards); use ZeRO-2 or DDP, or set it to null")


# ---- files and models ----------------------------------------------------------------------------------
def check_output_dir(plan: Plan) -> None:
    """output_dir is a folder (a run to resume) or can be created."""
    out = Path(plan.config.output_dir)
    if out.exists() and not out.is_dir():
        raise plan.error(f"'output_dir' {str(out)!r} is a file; expected a folder (a new one, or a run to resume)")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise plan.error(f"'output_dir' {str(out)!r} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise plan.error(f"'output_dir' {str(out)!r}: no permission to write in {existing}")


def check_model_source(plan: Plan, key: str, value: str, embedded: list[str]) -> None:
    """An embedded name, an existing local folder, or a Hub id OWNER/NAME (only the form: nothing is loaded)."""
    from .hub import is_repo_id

    if value in embedded:
        return
    path = Path(value).expanduser()
    if looks_local(value):
        if not path.exists():
            raise plan.error(f"'{key}': the local folder {value!r} does not exist")
        if not path.is_dir():
            raise plan.error(f"'{key}': {value!r} is a file; expected a model folder")
        return
    if path.is_dir() or is_repo_id(value) or in_hub_cache(value):
        return
    raise plan.error(f"'{key}' must be an embedded name ({', '.join(embedded)}), a local folder or a Hub id "
                     f"OWNER/NAME, got {value!r} (an owner-less Hub name such as gpt2 is accepted once it is in "
                     f"the Hugging Face cache; else write its OWNER/NAME, e.g. openai-community/gpt2)")


def in_hub_cache(name: str) -> bool:
    """An owner-less Hub name (gpt2, bert-base-uncased) already in this machine's Hugging Face cache: unlike a
    typo of an embedded name, it loads."""
    if "/" in name:
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo name
        return False


def check_llm(plan: Plan) -> None:
    from .modeling.llm import EMBEDDED_ALIASES, EMBEDDED_LLMS

    check_model_source(plan, "model.llm", plan.config.model.llm, [*EMBEDDED_LLMS, *EMBEDDED_ALIASES])


def check_encoders(plan: Plan) -> None:
    from .modeling.encoders.registry import EMBEDDED_AUDIO, EMBEDDED_IMAGE

    model = plan.config.model
    check_model_source(plan, "model.image_encoder", model.image_encoder, list(EMBEDDED_IMAGE))
    if model.video_encoder is not None:
        check_model_source(plan, "model.video_encoder", model.video_encoder, list(EMBEDDED_IMAGE))
    check_model_source(plan, "model.audio_encoder", model.audio_encoder, list(EMBEDDED_AUDIO))


def check_templates(plan: Plan) -> None:
    from .data.prompts import load_templates

    load_templates(plan.config.data.templates)


def check_task_files(plan: Plan) -> None:
    """Every split a real task needs exists, validates (schema, task, ids, media paths inside the data root)
    and has samples. Synthetic tasks (eval/tasks.yaml `synthetic`) are generated on first use: their split sizes must be >= 1."""
    from .data.tasks import how_to_write, load_task_split, split_path

    data = plan.config.data
    root = data.root
    for task in plan.tasks:
        if task.synthetic:
            for split in plan.needed_splits():
                if getattr(data, f"synth_{split}") < 1:
                    raise plan.error(f"'data.synth_{split}' must be >= 1: the run reads split {split} of {task.name}")
            continue
        for split in plan.needed_splits():
            path = split_path(root, task.name, split)
            if not path.is_file():
                raise DataError(f"{path}: not found (split {split} of task {task.name}, data.root {root}); "
                                f"{how_to_write(root, task.name)}")
            if not load_task_split(root, task.name, split):
                raise DataError(f"{path}: no samples (split {split} of task {task.name} is needed by the run)")


def check_hub_token(plan: Plan) -> None:
    """push_to_hub needs a token: found missing after the first step otherwise."""
    if not plan.config.push_to_hub:
        return
    from huggingface_hub.utils import get_token

    if get_token() is None:
        raise plan.error("'push_to_hub' needs a Hugging Face token: set HF_TOKEN or run `hf auth login` (a token "
                         "with write access)")


CHECKS = (
    check_values,
    check_tuner_keys,
    check_tuner_values,
    check_optimizer,
    check_lr_scheduler,
    check_attention,
    check_order,
    check_methods,
    check_zero3,
    check_output_dir,
    check_llm,
    check_encoders,
    check_templates,
    check_task_files,
    check_hub_token,
)


def preflight(config: RecipeConfig, source: str = "recipe", zero_stage: int | None = None) -> None:
    """Runs every check of CHECKS; raises the first failure (a MiclError naming the key or the file)."""
    plan = Plan(config, source, zero_stage)
    for check in CHECKS:
        check(plan)
