"""MSVD-QA (Xu et al., 2017), video QA, from its official release.

Expected layout under ``--root``::

    train_qa.json  val_qa.json  test_qa.json
        each a JSON list of {"question": str, "answer": str, "video_id": int, "id": int};
        ``video_id`` is the N of ``vid<N>`` in the mapping ("vid<N>" or "<N>" strings are accepted too)
    youtube_mapping.txt
        one line per clip: ``<clip name> vid<N>``, e.g. ``-4wsuPCjDBc_5_15 vid1``
    YouTubeClips/<clip name>.avi
        the MSVD clips; they may also lie in ``videos/`` or directly under the root. Searched in that
        order of folders; ``.avi`` is preferred, then ``.mp4``, ``.mkv``, ``.webm`` (re-encoded copies).

Splits: the official ones, file for file (train_qa.json -> train, val_qa.json -> val, test_qa.json -> test).

Rows: one per question; id = the QA ``id`` (unique over the three files in the official release),
instruction = the question, target = the answer, references = [the answer] (MSVD-QA has one answer per
question).

Reported as skipped (never dropped silently): a ``video_id`` with no line in youtube_mapping.txt, a clip
whose video file is missing, an empty question or answer, a repeated id.

Errors (``DataError``): a missing split file or youtube_mapping.txt, a split file that is not a JSON list of
objects, an entry without one of the keys question/answer/video_id/id, a malformed mapping line.

Options: none.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from .common import check_options, list_media, read_json
from .writer import DatasetWriter

TASK = "msvd_qa"

SPLIT_FILES = {"train": "train_qa.json", "val": "val_qa.json", "test": "test_qa.json"}
MAPPING_FILE = "youtube_mapping.txt"
REQUIRED_KEYS = ("question", "answer", "video_id", "id")
#: folders searched for the clips, in order (relative to the root; "" = the root itself)
VIDEO_DIRS = ("YouTubeClips", "videos", "")
#: video extensions, in order of preference when a clip exists in several
VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".webm")


def _video_number(value, where: str) -> str:
    """The N of vid<N>, from an int, "vid<N>" or "<N>"."""
    if isinstance(value, bool):
        raise DataError(f"{where}: video_id must be an integer or 'vid<N>', got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("vid"):
            text = text[3:]
        if text.isdigit():
            return str(int(text))
    raise DataError(f"{where}: video_id must be an integer or 'vid<N>', got {value!r}")


def read_mapping(path: Path) -> dict[str, str]:
    """video number (str) -> clip name, from youtube_mapping.txt."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (MSVD-QA needs youtube_mapping.txt, lines '<clip name> vid<N>')")
    mapping: dict[str, str] = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
                raise DataError(f"{path}:{lineno}: expected '<clip name> vid<N>', got {line.strip()!r}")
            mapping[str(int(parts[1][3:]))] = parts[0]
    return mapping


def index_videos(root: Path) -> dict[str, Path]:
    """clip name -> video file, listing each folder once (earlier folder / extension wins)."""
    index: dict[str, Path] = {}
    for sub in VIDEO_DIRS:
        for stem, p in list_media(root / sub if sub else root, VIDEO_EXTS).items():
            index.setdefault(stem, p)
    return index


def read_split(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (MSVD-QA needs {', '.join(SPLIT_FILES.values())}: "
                        f"JSON lists of {{question, answer, video_id, id}})")
    entries = read_json(path, encoding="utf-8-sig")
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{question, answer, video_id, id}}, "
                        f"got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i}: expected an object {{question, answer, video_id, id}}, "
                            f"got {type(entry).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in entry]
        if missing:
            raise DataError(f"{path}: entry {i}: missing key(s) {', '.join(missing)} "
                            f"(expected {', '.join(REQUIRED_KEYS)})")
    return entries


def convert(root: Path, writer: DatasetWriter, **options) -> None:
    check_options(TASK, options)
    root = Path(root)
    splits = {split: read_split(root / name) for split, name in SPLIT_FILES.items()}
    mapping = read_mapping(root / MAPPING_FILE)
    videos = index_videos(root)
    for split, entries in splits.items():
        path = root / SPLIT_FILES[split]
        for i, entry in enumerate(entries):
            sample = str(entry["id"])
            number = _video_number(entry["video_id"], f"{path}: entry {i}")
            clip = mapping.get(number)
            if clip is None:
                writer.skip(split, sample, f"video_id {number} (vid{number}) has no line in {MAPPING_FILE}")
                continue
            video = videos.get(clip)
            if video is None:
                writer.skip(split, sample, f"missing media file {root / VIDEO_DIRS[0] / (clip + VIDEO_EXTS[0])} "
                                           f"(clip vid{number}, also looked in videos/ and the root)")
                continue
            answer = "" if entry["answer"] is None else str(entry["answer"])
            question = "" if entry["question"] is None else str(entry["question"])
            writer.add(split, sample, video, answer.strip(), [answer], instruction=question)
