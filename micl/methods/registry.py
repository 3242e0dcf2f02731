"""Where methods come from: a method class registers itself with `@register`, in a module of this package
(found by walking the package, so a new method is one new file) or of another package that names it in
the `micl.methods` entry-point group, e.g. in its pyproject.toml:

    [project.entry-points."micl.methods"]
    my_method = "my_package.my_method"      # a module whose classes use @register, or a class

The core never names a method: it reads the capabilities a class declares (micl/methods/base.py).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "micl.methods"
METHODS: dict[str, type] = {}
PLUGIN_ERRORS: dict[str, str] = {}  # entry point name -> why it did not load (reported when a recipe asks for it)
_NOT_METHODS = {"base", "registry", "distill", "teacher", "pseudo_targets"}


def register(cls: type) -> type:
    """Class decorator: makes `cls` available to recipes as `method: <cls.name>`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "base":
        raise TypeError(f"{cls.__qualname__}: a registered method needs a class attribute `name`")
    known = METHODS.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise TypeError(f"method name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    METHODS[name] = cls
    return cls


def discover() -> dict[str, type]:
    """Imports micl's method modules and the `micl.methods` entry points once; returns the registry."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_METHODS and not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = point.load()
        except Exception as err:  # a broken plugin must not break micl's own methods
            PLUGIN_ERRORS[point.name] = f"entry point {point.value!r} failed to load: {type(err).__name__}: {err}"
            logger.warning("micl.methods entry point %s: %s", point.name, PLUGIN_ERRORS[point.name])
            continue
        if isinstance(loaded, type):
            register(loaded)
    return METHODS
