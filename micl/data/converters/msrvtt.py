"""MSR-VTT (video captioning, task ``msrvtt``, scored with CIDEr over the 20 captions of each video).

Expected layout under ``--root`` (MSR-VTT 1.0 as released by Microsoft, 6,513 train / 497 validate / 2,990
test videos)::

    train_val_videodatainfo.json   {"videos": [{"video_id": "video0", "split": "train" | "validate", ...}, ...],
                                    "sentences": [{"video_id": "video0", "caption": "a car is shown", ...}, ...]}
    test_videodatainfo.json        the same for the test videos ("split": "test")
    <video folder>/video0.mp4      the videos, "<video_id>.mp4"

Both json files are required; they are looked up in ``--root``, then in ``annotation/`` and ``annotations/``.
A video is looked up, in this order, in ``TrainValVideo/`` and ``TestVideo/`` (the official zips
train_val_videos.zip / test_videos.zip), ``videos/all/`` (the CLIP4Clip / Frozen-in-Time repackaging),
``videos/``, ``MSRVTT/videos/all/`` and ``--root`` itself; ``videos=DIR`` names the folder instead.

Splits: the official ones, ``validate`` -> val.

Rows: train -> one row per (video, caption), id ``"<video_id>#<k>"`` (k = the caption's index among the
video's sentences, in file order), target = that caption; val/test -> one row per video, id = video_id,
target = its first non-empty caption (file order). references = all (non-empty) captions of the video, 20 in
MSR-VTT, all of them CIDEr references. Empty captions (in val/test as ``"<video_id>#<k>"``, the video's row
keeping the others), missing videos, videos without a caption, an unknown split value and captions of a video
that ``videos[]`` does not list are reported as skipped.

Options (``--option KEY=VALUE``):

    videos=DIR   folder of the videos (relative to --root or absolute) instead of the lookup above
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from .common import check_options, media_finder, read_json
from .writer import DatasetWriter

TASK = "msrvtt"

FILES = ("train_val_videodatainfo.json", "test_videodatainfo.json")
ANNOTATION_DIRS = (".", "annotation", "annotations")
VIDEO_DIRS = ("TrainValVideo", "TestVideo", "videos/all", "videos", "MSRVTT/videos/all", ".")
SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
OPTIONS = ("videos",)


def _find_file(root: Path, name: str) -> Path:
    for folder in ANNOTATION_DIRS:
        if (root / folder / name).is_file():
            return root / folder / name
    raise DataError(f"{root / name}: not found (also looked in {', '.join(d + '/' for d in ANNOTATION_DIRS[1:])}; "
                    "expected the MSR-VTT annotations: videos[].video_id/split, sentences[].video_id/caption)")


def _read(path: Path) -> tuple[list[dict], list[dict]]:
    data = read_json(path)
    for key, fields in (("videos", ("video_id", "split")), ("sentences", ("video_id", "caption"))):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: expected a list under '{key}' ({key}[].{'/'.join(fields)})")
        for i, item in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(item, dict) or f not in item]
            if missing:
                raise DataError(f"{path}: {key}[{i}]: missing {', '.join(missing)} (expected {key}[]."
                                f"{'/'.join(fields)})")
    return data["videos"], data["sentences"]


def convert(root: Path, writer: DatasetWriter, **options) -> None:
    check_options(TASK, options, OPTIONS)
    files = [(path, *_read(path)) for path in (_find_file(root, name) for name in FILES)]
    find = media_finder(root, VIDEO_DIRS, TASK, "videos", options.get("videos"))
    for path, videos, sentences in files:
        captions: dict[str, list[str]] = {}
        for sentence in sentences:
            caption = sentence["caption"] if isinstance(sentence["caption"], str) else ""
            captions.setdefault(str(sentence["video_id"]), []).append(caption)
        listed = set()
        for video in videos:
            video_id = str(video["video_id"])
            listed.add(video_id)
            split = SPLITS.get(video["split"]) if isinstance(video["split"], str) else None
            if split is None:
                writer.skip("unsplit", video_id, f"unknown split {video['split']!r} in {path.name} "
                                                 "(valid: train, validate, test)")
                continue
            media = find(f"{video_id}.mp4")
            texts = captions.get(video_id, [])
            references = [c for c in texts if c.strip()]
            if not texts:
                writer.skip(split, video_id, f"no caption in {path.name}")
            elif split == "train":  # the writer reports an empty caption or a missing video for each sample
                for k, caption in enumerate(texts):
                    writer.add(split, f"{video_id}#{k}", media, caption, references)
            else:
                if references:
                    for k, caption in enumerate(texts):
                        if not caption.strip():
                            writer.skip(split, f"{video_id}#{k}", "empty caption")
                writer.add(split, video_id, media, references[0] if references else "", references)
        for video_id, texts in captions.items():
            if video_id not in listed:
                writer.skip("unsplit", video_id, f"{len(texts)} caption(s) in {path.name} for a video "
                                                 "that its videos[] does not list")
