"""Converters from the official layouts of the real MICL datasets to micl's unified dataset, one module
per dataset, all writing through `DatasetWriter` (writer.py):

    micl data prepare flickr30k --root path/to/flickr30k --out data/micl

`--out` is the data root: the converter writes `<out>/<task>/{train,val,test}.jsonl` with media paths
relative to it (the media stay where they are). Each converter's docstring describes the layout it
expects; `micl data prepare NAME --help` shows it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ...errors import DataError
from .writer import DatasetWriter, PrepareReport, Skipped

#: dataset name -> module under micl.data.converters that defines `TASK` and `convert(root, writer, **options)`
CONVERTERS = {
    "flickr30k": "flickr30k",
    "okvqa": "okvqa",
    "msrvtt": "msrvtt",
    "msvd_qa": "msvd_qa",
    "audiocaps": "audiocaps",
    "clotho_aqa": "clotho_aqa",
}


def converter_module(name: str):
    if name not in CONVERTERS:
        raise DataError(f"unknown dataset {name!r} (valid: {', '.join(CONVERTERS)})")
    return importlib.import_module(f"{__name__}.{CONVERTERS[name]}")


def prepare_dataset(name: str, root: str | Path, out: str | Path, **options) -> PrepareReport:
    """Converts dataset `name` from its official layout under `root` into `<out>/<task>/`."""
    module = converter_module(name)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (--root must be the downloaded {name} dataset)")
    writer = DatasetWriter(out, module.TASK)
    module.convert(root, writer, **options)
    return writer.write()


__all__ = ["CONVERTERS", "DatasetWriter", "PrepareReport", "Skipped", "converter_module", "prepare_dataset"]
