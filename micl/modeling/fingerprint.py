"""Fingerprints of encoder weights, part of the feature store's key: an encoder name that stays the same while its
weights change (a local folder saved again, a newer Hub revision, another release of an embedded package) gets
new features instead of stale ones.

An encoder lists where its weights are (`MediaEncoder.weight_locations()`: files or folders):
- a folder in the Hugging Face cache (`.../models--owner--name/snapshots/<commit>`) counts as its commit. Nothing
  is read, and the key does not change as the snapshot fills with the files transformers downloads later;
- any other folder counts as every file at its top level (weights, config.json, processor configs, custom code),
  each by name and the sha256 of its bytes; a file (an embedded package's weights) by the sha256 of its bytes.
  Digests are memoised in a JSON file of the feature store (`weight_digests.json`) by (real path, size, mtime,
  ctime): a file is hashed once per machine and version of the file, later runs only stat it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

from ..utils.io import atomic_write_json

_COMMIT = re.compile(r"[0-9a-f]{40}")


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def snapshot_commit(folder: Path) -> str | None:
    """`models--owner--name@<commit>` when `folder` is a snapshot in a Hugging Face cache, else None."""
    repo, snapshots = folder.parent.parent, folder.parent
    if snapshots.name == "snapshots" and _COMMIT.fullmatch(folder.name) and repo.name.startswith("models--"):
        return f"{repo.name}@{folder.name}"
    return None


class WeightDigests:
    """sha256 of weight files, memoised in this process and in the JSON file `path` (shared by the runs and
    processes of a machine: each merges its new digests into what is on disk; a lost race only hashes again)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._memo: dict[str, dict] | None = None
        self.hashed = 0  # files this process read to hash

    @staticmethod
    def _stamp(path: Path) -> tuple[str, dict]:
        stat = os.stat(path)
        return os.path.realpath(path), {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                        "ctime_ns": stat.st_ctime_ns}

    def _read(self) -> dict[str, dict]:
        try:
            memo = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: digests are computed again
            return {}
        return memo if isinstance(memo, dict) else {}

    def digest(self, path: Path) -> str:
        real, stamp = self._stamp(path)
        if self._memo is None:
            self._memo = self._read()
        known = self._memo.get(real)
        if isinstance(known, dict) and {k: known.get(k) for k in stamp} == stamp and "sha256" in known:
            return known["sha256"]
        entry = {**stamp, "sha256": file_digest(path)}
        self.hashed += 1
        self._memo = {**self._memo, **self._read(), real: entry}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self._memo)
        return entry["sha256"]

    def fingerprint(self, locations: Iterable[str | Path]) -> str:
        """One sha256 over the weights at `locations` ("none" for an encoder without weights)."""
        parts = []
        for location in map(Path, locations):
            commit = snapshot_commit(location) if location.is_dir() else None
            if commit is not None:
                parts.append(f"hub {commit}")
            elif location.is_dir():
                files = sorted(p for p in location.iterdir() if p.is_file() and not p.name.startswith("."))
                parts.extend(f"{p.name} {self.digest(p)}" for p in files)
            else:
                parts.append(f"file {self.digest(location)}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest() if parts else "none"
