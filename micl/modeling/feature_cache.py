"""Disk cache of frozen-encoder features: each media item is encoded once, keyed by the encoder's
identity (name + pooling) and the file's content hash, then reused across epochs, steps and runs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import MediaError
from .encoders.registry import MediaEncoder


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.encoded = 0  # items run through an encoder by this cache object
        self.hits = 0
        self._digests: dict[tuple, str] = {}

    def _digest(self, path: str) -> str:
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._digests:
            self._digests[key] = file_digest(path)
        return self._digests[key]

    def _entry(self, encoder: MediaEncoder, path: str) -> Path:
        key = hashlib.sha256(f"{encoder.identity}\n{self._digest(path)}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.safetensors"

    def features(self, encoder: MediaEncoder, paths: list[str], desc: str | None = None) -> list[torch.Tensor]:
        """Features [tokens, dim] for each path, encoding only the ones not cached yet."""
        for path in paths:
            if not os.path.isfile(path):
                raise MediaError(path, "media file not found")
        entries = [self._entry(encoder, p) for p in paths]
        missing = sorted({i for i, e in enumerate(entries) if not e.is_file()}, key=lambda i: paths[i])
        todo = list(dict.fromkeys(paths[i] for i in missing))
        if todo:
            with tqdm(total=len(todo), desc=desc or f"encoding {encoder.modality}", unit="item", leave=False) as bar:
                for start in range(0, len(todo), encoder.batch_size):
                    chunk = todo[start:start + encoder.batch_size]
                    tensors = encoder.encode([encoder.load(p) for p in chunk])
                    for path, tensor in zip(chunk, tensors):
                        self._store(self._entry(encoder, path), tensor)
                    self.encoded += len(chunk)
                    bar.update(len(chunk))
        self.hits += len(paths) - len(todo)
        return [load_file(str(e))["features"] for e in entries]

    @staticmethod
    def _store(entry: Path, tensor: torch.Tensor) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp{os.getpid()}")
        save_file({"features": tensor.detach().float().contiguous().cpu()}, str(tmp))
        os.replace(tmp, entry)
