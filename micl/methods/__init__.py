"""Continual-learning methods, one module each, registered by name."""

from __future__ import annotations

from ..config import RecipeConfig, build_dataclass
from ..errors import ConfigError
from .adaptive_fusion import AdaptiveFusionMethod
from .base import ContinualMethod, StepContext
from .ewc import EWC
from .finetune import Finetune
from .harmony import Harmony
from .lwf import LwF
from .moe_adapters import MoeAdapters
from .moincl import MoInCL
from .replay import Replay

METHODS: dict[str, type[ContinualMethod]] = {
    cls.name: cls for cls in (Finetune, LwF, EWC, Replay, MoInCL, MoeAdapters, Harmony, AdaptiveFusionMethod)
}


def register_method(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    METHODS[cls.name] = cls
    return cls


def build_methods(config: RecipeConfig, source: str = "recipe") -> list[ContinualMethod]:
    methods = []
    for key in config.method_args:
        if key not in config.methods:
            raise ConfigError(f"{source}: 'method_args.{key}' given but '{key}' is not in 'method' {config.methods}")
    for name in config.methods:
        if name not in METHODS:
            raise ConfigError(f"{source}: 'method' has unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
        cls = METHODS[name]
        values = config.method_args.get(name) or {}
        if cls.Args is None:
            if values:
                raise ConfigError(f"{source}: method {name!r} takes no settings, got 'method_args.{name}'")
            methods.append(cls())
        else:
            methods.append(cls(build_dataclass(cls.Args, values, source, f"method_args.{name}.")))
    for method in methods:
        method.check_recipe(config, source)
    return methods


__all__ = ["ContinualMethod", "StepContext", "METHODS", "register_method", "build_methods"]
