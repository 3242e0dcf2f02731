"""The one writer every dataset converter uses: it checks each sample (media file present, non-empty
target and references, unique id), records every skipped sample with its reason instead of dropping it
silently, and writes `<out>/<task>/<split>.jsonl` (micl's unified schema, micl/data/schema.py) with media
paths relative to `<out>`, the data root a recipe names in `data.root`.

Media paths never leave the data root (micl refuses rows whose paths do): the media stay where they are, and
a media folder outside `<out>` is reached through a link `<out>/<task>/media/<folder name>` to it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import DataError
from ..schema import validate_sample
from ..tasks import SPLITS, get_task, split_path
from ...utils.io import atomic_write_text


MEDIA_LINKS = "media"  # <out>/<task>/media/<name>: links to the media folders outside the data root


@dataclass
class Skipped:
    split: str
    sample: str
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.split}/{self.sample}: {self.reason}"


@dataclass
class PrepareReport:
    task: str
    out: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{split} {self.counts.get(split, 0)}" for split in SPLITS)
        return f"{self.task}: {counts} -> {Path(self.out) / self.task}; {len(self.skipped)} skipped"


class DatasetWriter:
    def __init__(self, out: str | Path, task: str):
        self.out = Path(out)
        self._out_resolved = self.out.resolve()  # media paths are written relative to it
        self.task = get_task(task)
        self.rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
        self.skipped: list[Skipped] = []
        self._ids: set[str] = set()
        self._links: dict[Path, str] = {}  # media folder outside `out` -> its link's name under <task>/media/

    def skip(self, split: str, sample: str, reason: str) -> None:
        self.skipped.append(Skipped(split, str(sample), reason))

    def add(self, split: str, sample: str, media: str | Path | None, target: str, references: list[str],
            instruction: str = "", audio: str | Path | None = None) -> bool:
        """One sample (`media`: absolute or cwd-relative path; None for text). False, with the reason
        recorded, when it cannot be used."""
        if split not in self.rows:
            raise DataError(f"{self.task.name}: unknown split {split!r} (valid: {', '.join(SPLITS)})")
        sample = str(sample)
        if sample in self._ids:
            self.skip(split, sample, "duplicate sample id")
            return False
        references = [r.strip() for r in references if isinstance(r, str) and r.strip()]
        target = (target or "").strip()
        if not target or not references:
            kind = "caption" if self.task.task_type == "caption" else "answer"
            self.skip(split, sample, f"empty {kind}")
            return False
        if self.task.task_type == "qa" and not (instruction or "").strip():
            self.skip(split, sample, "empty question")
            return False
        paths = {}
        for key, path in (("media", media), ("audio", audio)):
            if path is None:
                continue
            if not Path(path).is_file():
                self.skip(split, sample, f"missing media file {path}")
                return False
            paths[key] = self._path_in_root(Path(path).resolve())
        row = {"id": sample, "task": self.task.name, "modality": self.task.modality, "task_type": self.task.task_type,
               "media": paths.get("media", ""), "instruction": (instruction or "").strip(), "target": target,
               "references": references}
        if "audio" in paths:
            row["audio"] = paths["audio"]
        self.rows[split].append(validate_sample(row, f"{self.task.name}/{split}"))
        self._ids.add(sample)
        return True

    def _path_in_root(self, media: Path) -> str:
        """`media` relative to the data root: as it is inside it, else through the link to its folder."""
        try:
            return media.relative_to(self._out_resolved).as_posix()
        except ValueError:
            pass
        name = self._links.get(media.parent)
        if name is None:
            base = name = media.parent.name or "root"
            count = 1
            while name in self._links.values():  # two folders of the same name
                count += 1
                name = f"{base}-{count}"
            self._links[media.parent] = name
        return f"{self.task.name}/{MEDIA_LINKS}/{name}/{media.name}"

    def _write_links(self) -> None:
        folder = self.out / self.task.name / MEDIA_LINKS
        for target, name in self._links.items():
            link = folder / name
            if link.exists() and not link.is_symlink():
                raise DataError(f"{link}: exists and is not a link; the media folder {target} is linked there")
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp, target_is_directory=True)
            os.replace(tmp, link)  # atomic: a rerun switches a link to another folder in one step

    def write(self) -> PrepareReport:
        """Writes every split (atomically; an empty split is written too, so the layout is complete) and the
        links to the media folders outside the data root."""
        if not any(self.rows.values()):
            raise DataError(f"{self.task.name}: no usable sample found ({len(self.skipped)} skipped"
                            + (f", first: {self.skipped[0]}" if self.skipped else "") + ")")
        self._write_links()
        for split, rows in self.rows.items():
            atomic_write_text(split_path(self.out, self.task.name, split),
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return PrepareReport(self.task.name, str(self.out), {s: len(r) for s, r in self.rows.items()}, self.skipped)
