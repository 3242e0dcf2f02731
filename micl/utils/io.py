"""Atomic file writes: write a temp file in the destination folder, fsync, then ``os.replace``.

A reader (or a crash) never sees a half-written file: it sees the old content or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "json_default", "read_yaml_mapping",
           "yaml_error_line"]


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _default_mode()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = _MODE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def json_default(obj: Any):
    """JSON fallback for numpy scalars/arrays, paths, sets and dataclasses."""
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=json_default)
    return atomic_write_text(path, text + "\n")


def read_yaml_mapping(path: str | os.PathLike, expected: str) -> dict:
    """A non-empty YAML mapping from `path`; ConfigError naming the file and `expected` otherwise."""
    import yaml

    from ..errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found (expected {expected})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {yaml_error_line(e)}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{p}: expected {expected}")
    return data


def safe_torch_load(path):
    """A torch file of tensors and plain containers (a method's state); anything else (a pickled object,
    which could run code on load: a run folder may come from someone else) is refused with the file named."""
    import pickle

    import torch

    from ..errors import MiclError

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise MiclError(f"{path}: holds objects other than tensors, numbers, strings, lists and dicts; refusing "
                        f"to load it ({str(err).splitlines()[0][:120]})") from err


def yaml_error_line(err) -> str:
    """A YAML parser error on one line: `line L, column C: problem` (PyYAML's own text spans several lines,
    with a copy of the offending line)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    context = getattr(err, "context", None)
    text = f"{problem} ({context})" if context else problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}" if mark is not None else text


def looks_local(name: str) -> bool:
    """A model name meant as a folder, not a Hub id (`name` or `owner/name`): absolute, ./ ../ ~, or more
    than one '/'."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
