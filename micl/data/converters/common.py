"""Small helpers shared by the dataset converters: option checks, the deterministic split draw, JSON and CSV
reading with errors that name the file, and media lookup. Each converter keeps its own field checks and
messages; what is here behaves the same for all of them."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Callable

from ...errors import ConfigError, DataError

#: audio extensions, in order of preference when a clip exists in several
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")


def check_options(dataset: str, options: dict, valid: tuple[str, ...] = ()) -> None:
    """ConfigError naming the options of `options` not in `valid` (sorted)."""
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hint = f"valid: {', '.join(valid)}" if valid else f"{dataset} takes no option"
        raise ConfigError(f"{dataset}: unknown option(s) {', '.join(unknown)} ({hint})")


def fraction(dataset: str, options: dict, key: str, default: float) -> float:
    """Option `key` as a number in [0, 1) (`default` when not given); ConfigError otherwise."""
    value = options.get(key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{dataset} option {key}={options[key]!r}: expected a number in [0, 1)")
    return value


def unit(key: str) -> float:
    """A deterministic number in [0, 1) from the sha1 of `key` (not Python's salted hash)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) / 16 ** 40


def read_json(path: Path, encoding: str = "utf-8"):
    """The parsed content of `path`; DataError naming the file for invalid JSON."""
    try:
        with open(path, encoding=encoding) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def read_csv(path: Path, columns: tuple[str, ...], what: str) -> list[tuple[int, dict]]:
    """(line number, row) for each data row; DataError naming the file for a missing file or column."""
    if not path.is_file():
        raise DataError(f"{path}: file not found ({what} needs it, a CSV with header {','.join(columns)})")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected header "
                            f"{','.join(columns)}, got {','.join(header) or 'an empty file'})")
        reader.fieldnames = header
        return [(reader.line_num, {k: (v or "") for k, v in row.items() if k is not None}) for row in reader]


def option_folder(root: Path, dataset: str, key: str, value: str) -> Path:
    """The folder option `key` names (relative to `root` or absolute); ConfigError when it is not a folder."""
    folder = Path(value) if Path(value).is_absolute() else root / value
    if not folder.is_dir():
        raise ConfigError(f"{dataset} option {key}={value!r}: {folder} is not a folder")
    return folder


def media_finder(root: Path, dirs: tuple[str, ...], dataset: str, key: str, value: str | None,
                 missing: Path | None = None) -> Callable[[str], Path]:
    """file name -> path: in the folder of option `key` when given (`value`), else in the first of `dirs`
    (relative to `root`, in order) that holds it; when none does, under `missing` (default: the first of
    `dirs` that exists, else `root`), for the writer to report it missing."""
    if value is not None:
        folder = option_folder(root, dataset, key, value)
        return lambda name: folder / name
    folders = [root / d for d in dirs if (root / d).is_dir()]
    fallback = missing if missing is not None else (folders[0] if folders else root)

    def find(name: str) -> Path:
        for folder in folders:
            if (folder / name).is_file():
                return folder / name
        return fallback / name

    return find


def list_media(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """name stem -> file of `folder` (not recursive) with one of `exts` (case-insensitive), the earlier
    extension preferred when a stem has several; {} when `folder` is not a folder."""
    found: dict[str, Path] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            ext = p.suffix.lower()
            if ext in exts and p.is_file():
                best = found.get(p.stem)
                if best is None or exts.index(ext) < exts.index(best.suffix.lower()):
                    found[p.stem] = p
    return found
