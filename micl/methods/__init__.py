"""Continual-learning methods: one module each, registered with `@register` (see registry.py)."""

from __future__ import annotations

from ..config import RecipeConfig, build_dataclass
from ..errors import ConfigError
from ..utils.distributed import deepspeed_requested
from .base import SCHEDULES, ContinualMethod, StepContext, TokenSum
from .registry import METHODS, PLUGIN_ERRORS, discover, register


def get_method(name: str, source: str = "recipe") -> type[ContinualMethod]:
    if name not in METHODS:
        if name in PLUGIN_ERRORS:
            raise ConfigError(f"{source}: method {name!r}: {PLUGIN_ERRORS[name]}")
        raise ConfigError(f"{source}: 'method' has unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_capabilities(classes: list[type[ContinualMethod]], config: RecipeConfig, source: str,
                       deepspeed: bool | None = None) -> None:
    """What the methods of a recipe declare, against the recipe and against each other. `deepspeed`: the run
    will use DeepSpeed (None: this process runs under a DeepSpeed launcher)."""
    for cls in classes:
        if cls.requires_tuner is not None and config.lora.type != cls.requires_tuner:
            raise ConfigError(f"{source}: method {cls.name!r} needs 'lora.type: {cls.requires_tuner}', "
                              f"got 'lora.type: {config.lora.type}'")
    unsupported = [cls.name for cls in classes if not cls.supports_deepspeed]
    if unsupported and (deepspeed_requested() if deepspeed is None else deepspeed):
        raise ConfigError(f"{source}: method {', '.join(unsupported)} is not supported under DeepSpeed (e.g. it "
                          f"reads the gradients in .grad, which DeepSpeed keeps in its own buffers); launch with "
                          f"DDP (recipes/accelerate/ddp.yaml, docs/distributed.md)")
    for cls in classes:
        if cls.schedule not in SCHEDULES:
            raise ConfigError(f"{source}: method {cls.name!r} declares schedule {cls.schedule!r}; valid: "
                              f"{', '.join(SCHEDULES)}")
    scheduled = [cls.name for cls in classes if cls.schedule != "sequential"]
    if scheduled and len(classes) > 1:
        raise ConfigError(f"{source}: 'method' lists {', '.join(cls.name for cls in classes)}; {scheduled[0]!r} "
                          f"sets what each step trains on and is a recipe's only method")
    modulators = [cls.name for cls in classes if cls.uses_media_modulator]
    if len(modulators) > 1:
        raise ConfigError(f"{source}: 'method' lists {' and '.join(modulators)}; each installs a media modulator "
                          f"on the model and only one can be used")


def build_methods(config: RecipeConfig, source: str = "recipe", deepspeed: bool | None = None) -> list[ContinualMethod]:
    for key in config.method_args:
        if key not in config.methods:
            raise ConfigError(f"{source}: 'method_args.{key}' given but '{key}' is not in 'method' {config.methods}")
    classes = [get_method(name, source) for name in config.methods]
    check_capabilities(classes, config, source, deepspeed)
    methods = []
    for cls in classes:
        values = config.method_args.get(cls.name) or {}
        if cls.Args is None:
            if values:
                raise ConfigError(f"{source}: method {cls.name!r} takes no settings, got 'method_args.{cls.name}'")
            methods.append(cls())
        else:
            methods.append(cls(build_dataclass(cls.Args, values, source, f"method_args.{cls.name}.")))
    for method in methods:
        method.check_recipe(config, source)
    return methods


discover()

__all__ = ["ContinualMethod", "StepContext", "TokenSum", "METHODS", "register", "get_method", "check_capabilities",
           "build_methods", "discover"]
