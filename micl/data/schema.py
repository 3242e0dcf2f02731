"""The unified sample schema shared by every task (synthetic or real).

One sample is one row of a ``datasets.Dataset`` (or one JSON object per line of a
``<task>/<split>.jsonl`` file)::

    id          str        unique within its file
    task        str        registered task name (``micl.data.tasks``)
    modality    str        one of MODALITIES; ``audio_video`` = a video together with a sound
    task_type   str        one of TASK_TYPES
    media       str        path of the media file, relative to the dataset root and inside it
                           (empty string for text-only samples; the video for ``audio_video``)
    instruction str        QA: the question; captioning: "" (the prompt comes from
                           ``prompts/templates.yaml``)
    target      str        the training target
    references  list[str]  all reference answers / captions used for scoring

Optional key (filled with its default when absent):

    audio       str        ``audio_video`` only: path of the sound when it is a separate file; empty
                           (the default) = the audio track of the ``media`` video

``media_streams`` lists the media of a sample, one (stream modality, path) per encoder input, in the
order the prompt shows them.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Iterable, Mapping

from micl.errors import DataError

MODALITIES = ("image", "audio", "video", "audio_video", "text")
TASK_TYPES = ("caption", "qa")

#: key -> python type of the value
FIELDS: dict[str, type] = {
    "id": str,
    "task": str,
    "modality": str,
    "task_type": str,
    "media": str,
    "instruction": str,
    "target": str,
    "references": list,
}
#: optional key -> default value
OPTIONAL_FIELDS: dict[str, str] = {"audio": ""}
#: modality of a sample -> the modalities of its media streams, in prompt order (each has its own
#: encoder and projector; micl.modeling.prompting.MEDIA_ORDER is the same order)
STREAMS: dict[str, tuple[str, ...]] = {
    "image": ("image",), "audio": ("audio",), "video": ("video",), "audio_video": ("video", "audio"), "text": (),
}


def media_streams(row: Mapping) -> list[tuple[str, str]]:
    """(stream modality, media path relative to the dataset root) for each medium of a sample."""
    paths = {"image": row["media"], "video": row["media"], "audio": row["media"]}
    if row["modality"] == "audio_video":
        paths["audio"] = row.get("audio") or row["media"]
    return [(stream, paths[stream]) for stream in STREAMS[row["modality"]]]


_DRIVE = re.compile(r"[A-Za-z]:")  # C:/... is absolute on Windows


def inside_root(path: str) -> bool:
    """A relative path that stays inside the folder it is relative to (no leading /, no escaping '..').
    Decided on the text alone: a dataset file from elsewhere must not make micl read files outside the data
    root, whatever exists on this machine."""
    normal = posixpath.normpath(path.replace("\\", "/"))
    return not (normal.startswith("/") or _DRIVE.match(normal) or normal == ".." or normal.startswith("../"))


def validate_sample(row: Any, source: str) -> dict:
    """Check one row against the schema and return it.

    ``source`` names where the row came from (a file, ``file:line``); it is put at the
    start of every error message together with the row id. Raises ``DataError``.
    """
    if not isinstance(row, Mapping):
        raise DataError(f"{source}: expected a JSON object per sample, got {type(row).__name__}")
    rid = row.get("id")
    where = f"{source}: row id={rid!r}" if isinstance(rid, str) and rid else f"{source}"

    missing = [k for k in FIELDS if k not in row]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)} "
                        f"(a sample needs: {', '.join(FIELDS)})")
    for key, typ in FIELDS.items():
        if not isinstance(row[key], typ):
            raise DataError(f"{where}: key '{key}' must be {typ.__name__}, "
                            f"got {type(row[key]).__name__}")
    for key, default in OPTIONAL_FIELDS.items():
        if key not in row:
            row = {**row, key: default}
        elif not isinstance(row[key], str):
            raise DataError(f"{where}: key '{key}' must be str, got {type(row[key]).__name__}")
    if row["audio"] and row["modality"] != "audio_video":
        raise DataError(f"{where}: key 'audio' is only for 'audio_video' samples (modality is {row['modality']!r})")
    if not row["id"].strip():
        raise DataError(f"{where}: empty id")
    if not row["task"].strip():
        raise DataError(f"{where}: empty task")
    if row["modality"] not in MODALITIES:
        raise DataError(f"{where}: unknown modality {row['modality']!r} "
                        f"(valid: {', '.join(MODALITIES)})")
    if row["task_type"] not in TASK_TYPES:
        raise DataError(f"{where}: unknown task_type {row['task_type']!r} "
                        f"(valid: {', '.join(TASK_TYPES)})")
    if row["modality"] != "text" and not row["media"].strip():
        raise DataError(f"{where}: empty media path for a {row['modality']} sample")
    for key in ("media", "audio"):
        if row[key] and not inside_root(row[key]):
            raise DataError(f"{where}: {key} path {row[key]!r} leaves the data root (media paths are relative to "
                            f"the data root and stay inside it)")
    if row["task_type"] == "qa" and not row["instruction"].strip():
        raise DataError(f"{where}: empty instruction (a QA sample needs its question there)")
    if not row["target"].strip():
        raise DataError(f"{where}: empty target")
    refs = row["references"]
    if not refs:
        raise DataError(f"{where}: empty references (need at least one reference answer/caption)")
    for i, ref in enumerate(refs):
        if not isinstance(ref, str) or not ref.strip():
            raise DataError(f"{where}: references[{i}] must be a non-empty string, got {ref!r}")
    return dict(row)


def features():
    """``datasets.Features`` for the schema (imports ``datasets`` lazily)."""
    from datasets import Features, Sequence, Value

    feats = {k: Value("string") for k in (*FIELDS, *OPTIONAL_FIELDS) if k != "references"}
    feats["references"] = Sequence(Value("string"))
    return Features(feats)


def rows_to_dataset(rows: Iterable[Mapping]):
    """Build a ``datasets.Dataset`` with the schema's features from validated rows."""
    from datasets import Dataset

    rows = list(rows)
    keys = (*FIELDS, *OPTIONAL_FIELDS)
    return Dataset.from_list([{k: r.get(k, OPTIONAL_FIELDS.get(k)) for k in keys} for r in rows],
                             features=features())
