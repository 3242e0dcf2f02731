"""Task registry and split loading.

A task is named by a ``TaskSpec``; its data lives at ``<data_root>/<task>/<split>.jsonl``
with one schema row (``micl.data.schema``) per line and media paths relative to
``data_root``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from micl.data.schema import MODALITIES, TASK_TYPES, validate_sample
from micl.errors import DataError

METRICS = ("caption", "vqa_accuracy", "exact_match")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    modality: str  # one of MODALITIES
    task_type: str  # one of TASK_TYPES
    metric: str  # "caption" (CIDEr & co.) | "vqa_accuracy" | "exact_match"

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise DataError(f"task name must be a non-empty string, got {self.name!r}")
        if self.modality not in MODALITIES:
            raise DataError(f"task {self.name}: unknown modality {self.modality!r} "
                            f"(valid: {', '.join(MODALITIES)})")
        if self.task_type not in TASK_TYPES:
            raise DataError(f"task {self.name}: unknown task_type {self.task_type!r} "
                            f"(valid: {', '.join(TASK_TYPES)})")
        if self.metric not in METRICS:
            raise DataError(f"task {self.name}: unknown metric {self.metric!r} "
                            f"(valid: {', '.join(METRICS)})")


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, overwrite: bool = False) -> TaskSpec:
    if spec.name in _REGISTRY and not overwrite and _REGISTRY[spec.name] != spec:
        raise DataError(f"task {spec.name!r} is already registered with a different spec")
    _REGISTRY[spec.name] = spec
    return spec


def list_tasks() -> list[str]:
    return list(_REGISTRY)


def get_task(name: str) -> TaskSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown task {name!r} (known tasks: {', '.join(_REGISTRY)})") from None


# The synthetic benchmark (micl.data.synth). QA answers come with a list of acceptable
# aliases (e.g. ["2", "two"]), not ten annotator answers, so they are scored by exact
# match against any reference rather than by the VQA min(n/3, 1) formula.
# The paper's six datasets are converted from their official layouts by micl.data.converters (`micl data
# prepare <name>`); metrics as in the reference: CIDEr, VQA accuracy over OK-VQA's ten answers, exact match
# after VQA normalisation for MSVD-QA and Clotho-AQA.
for _name, _mod, _tt, _metric in (
    ("synth_image_caption", "image", "caption", "caption"),
    ("synth_image_qa", "image", "qa", "exact_match"),
    ("synth_audio_caption", "audio", "caption", "caption"),
    ("synth_audio_qa", "audio", "qa", "exact_match"),
    ("synth_video_caption", "video", "caption", "caption"),
    ("synth_video_qa", "video", "qa", "exact_match"),
    ("synth_av_caption", "audio_video", "caption", "caption"),
    ("flickr30k", "image", "caption", "caption"),
    ("okvqa", "image", "qa", "vqa_accuracy"),
    ("msrvtt", "video", "caption", "caption"),
    ("msvd_qa", "video", "qa", "exact_match"),
    ("audiocaps", "audio", "caption", "caption"),
    ("clotho_aqa", "audio", "qa", "exact_match"),
):
    register_task(TaskSpec(_name, _mod, _tt, _metric))

def split_path(data_root, task: str, split: str) -> Path:
    return Path(data_root) / task / f"{split}.jsonl"


def how_to_write(data_root, task: str) -> str:
    """The command that writes a task's split files into `data_root`."""
    from micl.data.converters import CONVERTERS

    if task.startswith("synth_"):
        return f"`micl data synth --out {data_root}` writes it (`micl train` does on first use)"
    if task in CONVERTERS:
        return (f"`micl data prepare {task} --root <the downloaded {task} dataset> --out {data_root}` writes it "
                f"(docs/reproducing_moincl.md)")
    return "write it in micl's dataset schema (micl/data/schema.py), or check data.root"


def _order_key(row_id: str) -> str:
    # A fixed pseudo-random order: subsets are representative even when the file is
    # sorted by answer, and every max_samples subset contains the smaller ones.
    return hashlib.sha1(row_id.encode("utf-8")).hexdigest()


def load_task_split(data_root, task: str, split: str, max_samples: int | None = None) -> list[dict]:
    """Read and validate ``<data_root>/<task>/<split>.jsonl``.

    Rows come back in file order. With ``max_samples`` the first N rows of a fixed
    order (sha1 of the row id) are kept -- deterministic, and nested (the 8-sample
    subset is inside the 16-sample one) -- and returned in file order.
    Raises ``DataError`` naming the file and line of the first bad row.
    """
    spec = get_task(task)
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 0):
        raise DataError(f"max_samples must be a non-negative integer or None, got {max_samples!r}")
    path = split_path(data_root, task, split)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (task {task!r}, split {split!r}); "
                        f"{how_to_write(data_root, task)}")
    rows: list[dict] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            src = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{src}: invalid JSON ({e.msg} at column {e.colno})") from None
            row = validate_sample(obj, src)
            if row["task"] != spec.name:
                raise DataError(f"{src}: row id={row['id']!r}: task {row['task']!r} does not "
                                f"match the file's task {spec.name!r}")
            if row["modality"] != spec.modality or row["task_type"] != spec.task_type:
                raise DataError(f"{src}: row id={row['id']!r}: modality/task_type "
                                f"{row['modality']}/{row['task_type']} does not match task "
                                f"{spec.name} ({spec.modality}/{spec.task_type})")
            if row["id"] in seen:
                raise DataError(f"{src}: row id={row['id']!r}: duplicate id "
                                f"(first seen on line {seen[row['id']]})")
            seen[row["id"]] = lineno
            rows.append(row)
    if max_samples is not None and max_samples < len(rows):
        keep = {r["id"] for r in sorted(rows, key=lambda r: _order_key(r["id"]))[:max_samples]}
        rows = [r for r in rows if r["id"] in keep]
    return rows
