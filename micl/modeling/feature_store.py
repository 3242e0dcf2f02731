"""Feature store: the frozen-encoder features of one task split and media stream in ONE file on disk, each
distinct media item once, read lazily item by item.

Layout, in the machine-local cache (`cache_root()/feature_store/<key>/`):
    features.bin       [items, tokens, dim] in the store dtype, C order (bfloat16 / float16 as raw 2-byte words,
                       read back with `.view(torch.bfloat16)`: numpy has no bfloat16)
    meta.json          its key's fields (encoder identity, weights fingerprint, preprocessing version, dtypes),
                       shape, item count; written last: a store is complete iff it is there (and features.bin
                       has its size)
    features.partial   the file a build writes; renamed to features.bin once every item is in
    lock               flock'ed by the process that builds the store (two runs of one machine never build it twice)

Items are the distinct media files of the split by content (sha256), in the order they first appear; `index`
maps each row (sample) to its item, so the 5 captions of one image share one stored item. The key is the
sha256 of the encoder identity (name, pooling), the fingerprint of its weights (micl/modeling/fingerprint.py),
micl's preprocessing version (`micl.data.media.PREPROCESSING_VERSION`), the compute dtype, the store dtype and
the items' digests: a rerun, a resumed run or another run on the same split reuses the store, and any change
of content, encoder, weights, preprocessing or dtype gets a new one (a store under an older key is never
looked up again).

Reading uses positional reads (`os.preadv`): nothing is memory-mapped, so the process's RSS holds only the
items in use (each a small tensor of its own), whatever the store's size; the file descriptor is reopened in
a forked process (DataLoader workers). The ranks of one machine share the file: each encodes its share of the
items into features.partial, then the machine's first process renames it and writes meta.json.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..data import media as media_io
from ..errors import MediaError, MiclError
from ..utils.distributed import (all_processes_agree, barrier, is_main_process, local_rank, local_world_size)
from ..utils.io import atomic_write_json
from ..utils.progress import progress_bar
from .encoders.registry import MediaEncoder
from .fingerprint import WeightDigests, file_digest

FORMAT = 1
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WORDS = {4: torch.int32, 2: torch.int16}  # raw words of each item size, reinterpreted as the store dtype
DATA, PARTIAL, META, LOCK = "features.bin", "features.partial", "meta.json", "lock"
WEIGHT_DIGESTS = "weight_digests.json"  # beside the stores: the memo of the encoders' weight-file digests
LOADER_THREADS = 4  # media decoding of the next batch overlaps the encoder's forward


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _meta(folder: Path) -> dict | None:
    """The store's meta.json when the store is complete, else None."""
    try:
        meta = json.loads((folder / META).read_text())
        size = (folder / DATA).stat().st_size
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or size != meta["items"] * meta["item_bytes"]:
        return None
    return meta


def is_complete(folder: str | Path) -> bool:
    return _meta(Path(folder)) is not None


class FeatureStore:
    """A complete store opened for reading: `store[i]` -> features [tokens, dim] of item i (a new tensor)."""

    def __init__(self, folder: str | Path):
        self._fd: int | None = None
        self._pid: int | None = None
        self.folder = Path(folder)
        meta = _meta(self.folder)
        if meta is None:
            raise MiclError(f"{self.folder}: not a complete feature store (no {META}, or {DATA} is not its size); "
                            "it is rebuilt by the next run that needs it")
        self.items = meta["items"]
        self.shape = (meta["tokens"], meta["dim"])
        self.dtype = STORE_DTYPES[meta["dtype"]]
        self.item_bytes = meta["item_bytes"]
        self.meta = meta

    def __len__(self) -> int:
        return self.items

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked process opens its own descriptor
            self._fd, self._pid = os.open(self.folder / DATA, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, item: int) -> torch.Tensor:
        if not 0 <= item < self.items:
            raise IndexError(f"{self.folder}: item {item} out of range (store of {self.items})")
        buffer = bytearray(self.item_bytes)
        read = os.preadv(self._file(), [buffer], item * self.item_bytes)
        if read != self.item_bytes:
            raise MiclError(f"{self.folder / DATA}: short read of item {item} ({read} of {self.item_bytes} bytes)")
        words = torch.frombuffer(buffer, dtype=_WORDS[self.dtype.itemsize])
        return words.view(self.dtype).view(self.shape)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):
        self.close()

    def __getstate__(self) -> dict:  # pickled into spawned workers without the descriptor
        return {**self.__dict__, "_fd": None, "_pid": None}


class StreamFeatures:
    """One stream's features for every row of a split: `features[row]` = store[index[row]]."""

    def __init__(self, store: FeatureStore, index: np.ndarray):
        self.store = store
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int) -> torch.Tensor:
        return self.store[int(self.index[row])]


class SampleFeatures:
    """Per sample {stream modality: features [tokens, dim]} ({} for a text-only task), read on access:
    what `EncodedTaskDataset.features[i]` is."""

    def __init__(self, streams: dict[str, StreamFeatures], rows: int):
        if any(len(s) != rows for s in streams.values()):
            raise ValueError("every stream needs one index entry per row")
        self.streams = streams
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if row < 0:
            row += self.rows
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range ({self.rows} rows)")
        return {stream: features[row] for stream, features in self.streams.items()}

    def token_counts(self, row: int) -> dict[str, int]:
        """{stream: media tokens} of a row, without reading its features."""
        return {stream: features.store.shape[0] for stream, features in self.streams.items()}


class _Lock:
    """An exclusive flock on the store's lock file (released by the kernel if the process dies)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class FeatureStores:
    """The stores under one folder: `features(encoder, paths, dtype)` finds the store of these media files or
    builds it (encoding each distinct item once, shared out among the processes of this machine)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.encoded = 0  # items run through an encoder by this process
        self.built = 0  # stores this process completed
        self._digests: dict[tuple, str] = {}
        self.weights = WeightDigests(self.root / WEIGHT_DIGESTS)

    def digest(self, path: str) -> str:
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._digests:
            self._digests[key] = file_digest(path)
        return self._digests[key]

    def key(self, encoder: MediaEncoder, dtype: torch.dtype) -> dict:
        """What the store's features depend on, besides the items: written to meta.json, hashed into the key."""
        return {"format": FORMAT, "identity": encoder.identity,
                "weights": self.weights.fingerprint(encoder.weight_locations()),
                "preprocessing": media_io.PREPROCESSING_VERSION,
                "compute_dtype": dtype_name(encoder.compute_dtype), "dtype": dtype_name(dtype)}

    def folder(self, key: dict, items: list[str]) -> Path:
        text = "\n".join([*(f"{name}={value}" for name, value in key.items()), *items])
        return self.root / hashlib.sha256(text.encode()).hexdigest()

    def features(self, encoder: MediaEncoder, paths: list[str], dtype: torch.dtype = torch.float32,
                 desc: str | None = None, shared: bool = True) -> StreamFeatures:
        """The features of each of `paths` (a row each), from the store, built first when missing.

        `shared`: every process of the launch calls this together (a collective): a missing store is
        encoded by the processes of each machine, each its share. Otherwise (a process on its own, e.g.
        reopening a released split) a missing store is built by this process alone, under the store's lock.
        """
        if dtype not in STORE_DTYPES.values():
            raise MiclError(f"feature store dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype}")
        for path in paths:
            if not os.path.isfile(path):
                raise MediaError(path, "media file not found")
        digests = [self.digest(p) for p in paths]
        position: dict[str, int] = {}
        item_paths: list[str] = []
        for path, digest in zip(paths, digests):
            if digest not in position:
                position[digest] = len(item_paths)
                item_paths.append(path)
        index = np.fromiter((position[d] for d in digests), dtype=np.int64, count=len(digests))
        key = self.key(encoder, dtype)
        folder = self.folder(key, list(position))
        meta = {**key, "items": len(item_paths), "tokens": encoder.num_tokens, "dim": encoder.output_dim,
                "item_bytes": encoder.num_tokens * encoder.output_dim * dtype.itemsize}
        if shared:
            if not all_processes_agree(is_complete(folder)):
                self._build_shared(folder, encoder, item_paths, meta, desc)
        elif not is_complete(folder):
            self._build_alone(folder, encoder, item_paths, meta, desc)
        return StreamFeatures(FeatureStore(folder), index)

    # ---- building -----------------------------------------------------------------------------------
    @staticmethod
    def _start(folder: Path, meta: dict) -> None:
        """A fresh features.partial of the store's size (a killed build's leftover is discarded)."""
        partial = folder / PARTIAL
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.ftruncate(fd, meta["items"] * meta["item_bytes"])
        finally:
            os.close(fd)

    def _finish(self, folder: Path, meta: dict) -> None:
        os.replace(folder / PARTIAL, folder / DATA)
        atomic_write_json(folder / META, meta)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.built += 1

    def _build_alone(self, folder, encoder, item_paths, meta, desc) -> None:
        lock = _Lock(folder)
        try:
            if is_complete(folder):  # built meanwhile by another process of this machine
                return
            self._start(folder, meta)
            self._encode(folder, encoder, item_paths, range(len(item_paths)), meta, desc)
            self._finish(folder, meta)
        finally:
            lock.release()

    def _build_shared(self, folder, encoder, item_paths, meta, desc) -> None:
        """Every process: the machine's first one locks the store and starts features.partial; each process
        of the machine encodes its contiguous share of the items into it; the first one completes it.
        Every process passes the same collectives whatever its machine has to do (another may be complete)."""
        first = is_main_process(local=True)
        lock = None
        error: BaseException | None = None
        try:
            if first:
                lock = _Lock(folder)
                if not is_complete(folder):
                    self._start(folder, meta)
        except BaseException as err:  # reported after the collectives, which every process must pass
            error = err
        barrier()
        building = error is None and not is_complete(folder)  # stable: the lock holder alone completes it
        if building:
            count, ranks, rank = len(item_paths), local_world_size(), local_rank()
            share = range(count * rank // ranks, count * (rank + 1) // ranks)
            try:
                self._encode(folder, encoder, item_paths, share, meta, desc, show=first)
            except BaseException as err:
                error = err
        everyone_ok = all_processes_agree(error is None)
        try:
            if first and building and everyone_ok:
                self._finish(folder, meta)
        except BaseException as err:
            error = error or err
        finally:
            if lock is not None:
                lock.release()
        everyone_ok = all_processes_agree(everyone_ok and error is None)
        if error is not None:
            raise error
        if not everyone_ok:
            raise MiclError(f"{folder}: another process failed while encoding this feature store (see its error)")

    def _encode(self, folder: Path, encoder: MediaEncoder, item_paths: list[str], share: range, meta: dict,
                desc: str | None, show: bool = True) -> None:
        """Encodes items `share` in batches of `encoder.batch_size`, writing each batch at its offset."""
        expected = (meta["tokens"], meta["dim"])
        dtype = STORE_DTYPES[meta["dtype"]]
        size = max(1, encoder.batch_size)
        batches = [share[i:i + size] for i in range(0, len(share), size)]
        fd = os.open(folder / PARTIAL, os.O_WRONLY)
        try:
            with ThreadPoolExecutor(LOADER_THREADS) as pool, \
                    progress_bar(total=len(share), desc=desc or f"encoding {encoder.modality}", unit="item",
                                 leave=False, disable=not show) as bar:
                load = lambda batch: [pool.submit(encoder.load, item_paths[i]) for i in batch]  # noqa: E731
                pending = load(batches[0]) if batches else []
                for k, batch in enumerate(batches):
                    loaded = [future.result() for future in pending]
                    pending = load(batches[k + 1]) if k + 1 < len(batches) else []
                    tensors = encoder.encode(loaded)
                    if tuple(tensors.shape) != (len(batch), *expected):
                        raise MiclError(f"encoder {encoder.identity!r} returned features {tuple(tensors.shape)}, "
                                        f"expected {(len(batch), *expected)}")
                    data = tensors.detach().to(dtype).cpu().contiguous()
                    _pwrite_all(fd, memoryview(data.view(torch.uint8).numpy()).cast("B"),
                                batch.start * meta["item_bytes"])
                    self.encoded += len(batch)
                    bar.update(len(batch))
            os.fsync(fd)
        finally:
            os.close(fd)
