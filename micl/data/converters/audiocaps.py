"""AudioCaps (Kim et al., 2019), audio captioning, from its official CSVs and downloaded audio.

Expected layout under ``--root``::

    train.csv  val.csv  test.csv
        header ``audiocap_id,youtube_id,start_time,caption`` (more columns are ignored); one row per
        caption: train has one caption per clip, val and test five
    the audio clips (10 s cut from ``youtube_id`` at ``start_time``), named after the downloader used.

A clip (media item) is ``youtube_id`` + ``start_time``: its media id is ``<youtube_id>_<start_time>`` (start
time written as in the CSV, ``30.0`` read as ``30``). Its audio file is looked for under these names, in
this order (the first one found wins; the start-time names come first because a YouTube video can give
several clips)::

    <youtube_id>_<start_time>.<ext>        e.g. --6ohD1XKBY_30.wav
    Y<youtube_id>_<start_time>.<ext>
    <audiocap_id>.<ext>                    each audiocap_id of the clip's rows, in CSV order
    <youtube_id>.<ext>
    Y<youtube_id>.<ext>                    AudioSet style

with ``<ext>`` one of wav, flac, mp3, ogg, m4a (preferred in that order when a name has several), in these
folders, in this order for a name found in several: ``<split>/``, ``audio/<split>/``, ``audio/``, the root
(``<split>`` = train, val or test). Each folder is listed once (no recursion).

Splits: the official ones (train.csv -> train, val.csv -> val, test.csv -> test).

Rows (captioning convention shared by the converters): train -> one row per (clip, caption), id
``<media id>#<k>`` (k = the caption's index among the clip's rows of the CSV, from 0), target = that caption,
references = all the clip's captions; val/test -> one row per clip, id = the media id, target = its first
(non-empty) caption, references = all its captions (five in the official release, for CIDEr).

Reported as skipped (never dropped silently): a clip without audio file (every caption row of it in train,
the clip in val/test), an empty caption (in val/test as ``<media id>#<k>``; the clip is kept with its other
captions), a row with an empty youtube_id or start_time.

Errors (``DataError``): a missing CSV, a CSV without one of the columns audiocap_id, youtube_id, start_time,
caption.

Options: none.
"""

from __future__ import annotations

from pathlib import Path

from .common import AUDIO_EXTS, check_options, list_media, read_csv
from .writer import DatasetWriter

TASK = "audiocaps"

SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def _start_names(raw: str) -> list[str]:
    """The start time as written in media ids ("30.0" -> "30"), then as in the CSV if different."""
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        return [text]
    norm = str(int(value)) if value.is_integer() else text
    return [norm] if norm == text else [norm, text]


class AudioIndex:
    """Audio files by name stem, each folder listed once."""

    def __init__(self, root: Path):
        self.root = root
        self._listings: dict[Path, dict[str, Path]] = {}

    def folders(self, split: str) -> list[Path]:
        return [self.root / split, self.root / "audio" / split, self.root / "audio", self.root]

    def _listing(self, folder: Path) -> dict[str, Path]:
        if folder not in self._listings:
            self._listings[folder] = list_media(folder, AUDIO_EXTS)
        return self._listings[folder]

    def split_index(self, split: str) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for folder in self.folders(split):
            for stem, p in self._listing(folder).items():
                index.setdefault(stem, p)
        return index


def candidate_names(youtube_id: str, start_time: str, audiocap_ids: list[str]) -> list[str]:
    starts = _start_names(start_time)
    names = [f"{youtube_id}_{s}" for s in starts] + [f"Y{youtube_id}_{s}" for s in starts]
    names += [a for a in audiocap_ids if a]
    names += [youtube_id, f"Y{youtube_id}"]
    return list(dict.fromkeys(names))


def convert(root: Path, writer: DatasetWriter, **options) -> None:
    check_options(TASK, options)
    root = Path(root)
    tables = {split: read_csv(root / name, COLUMNS, "AudioCaps") for split, name in SPLIT_FILES.items()}
    audio = AudioIndex(root)
    for split, rows in tables.items():
        # clip -> [(audiocap_id, caption)], in CSV order
        clips: dict[tuple[str, str], list[tuple[str, str]]] = {}
        raw_starts: dict[tuple[str, str], str] = {}
        for lineno, row in rows:
            youtube_id, start = row["youtube_id"].strip(), row["start_time"].strip()
            acid = row["audiocap_id"].strip()
            if not youtube_id or not start:
                empty = "youtube_id" if not youtube_id else "start_time"
                writer.skip(split, acid or f"{SPLIT_FILES[split]}:{lineno}", f"empty {empty}")
                continue
            key = (youtube_id, _start_names(start)[0])
            raw_starts.setdefault(key, start)
            clips.setdefault(key, []).append((acid, row["caption"].strip()))
        index = audio.split_index(split)
        where = ", ".join(f"{f.relative_to(root)}/" if f != root else "the root" for f in audio.folders(split))
        for (youtube_id, start), captions in clips.items():
            media_id = f"{youtube_id}_{start}"
            names = candidate_names(youtube_id, raw_starts[(youtube_id, start)], [a for a, _ in captions])
            path = next((index[n] for n in names if n in index), None)
            references = [c for _, c in captions if c]
            samples = [f"{media_id}#{k}" for k in range(len(captions))] if split == "train" else [media_id]
            if path is None:
                reason = (f"missing media file for clip {media_id} (looked for {', '.join(names)} "
                          f"with extension {'/'.join(e[1:] for e in AUDIO_EXTS)} in {where})")
                for sample in samples:
                    writer.skip(split, sample, reason)
                continue
            if split == "train":
                for sample, (_, caption) in zip(samples, captions):
                    writer.add(split, sample, path, caption, references)
            else:
                if references:
                    for k, (_, caption) in enumerate(captions):
                        if not caption:
                            writer.skip(split, f"{media_id}#{k}", "empty caption")
                writer.add(split, media_id, path, references[0] if references else "", references)
