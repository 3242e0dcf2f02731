"""Flickr30k (image captioning, task ``flickr30k``, scored with CIDEr over the five captions of each image).

Expected layout under ``--root`` (the Flickr30k images plus Karpathy's split file; the original caption file
is optional)::

    dataset_flickr30k.json          Karpathy's split file ("dataset_flickr30k.json" of caption_datasets.zip):
                                      {"images": [{"filename": "1000092795.jpg", "imgid": 0,
                                                   "split": "train" | "restval" | "val" | "test",
                                                   "sentences": [{"raw": "Two young guys ...", ...}, ...]},
                                                  ...]}
    results_20130124.token          (optional) the original captions, one line per caption:
                                      1000092795.jpg#0<TAB>Two young guys with shaggy hair ...
                                    (``results.token`` is accepted under that name too)
    flickr30k-images/1000092795.jpg the images (also looked up in ``flickr30k_images/``,
                                    ``flickr30k_images/flickr30k_images/``, ``images/`` and ``--root`` itself)

The media id of an image is its file name without extension ("1000092795"), whichever caption source is used.

Splits: the Karpathy split (29,000 train, 1,014 val, 1,000 test images); ``restval`` (used by the COCO file
of the same release) is counted as train. Without ``dataset_flickr30k.json`` (the token file alone) the split
is drawn deterministically per image: ``u = int(sha1(media_id).hexdigest(), 16) / 16**40``, test when
``u < test_fraction``, val when ``u < test_fraction + val_fraction``, train otherwise (defaults 0.03 and 0.03,
about 950 images each: NOT the Karpathy split, so scores are not comparable with published ones).

Rows: train -> one row per (image, caption), id ``"<media_id>#<k>"`` (k = the caption's index for that
image), target = that caption; val/test -> one row per image, id = media id, target = its first non-empty
caption. references = all (non-empty) captions of the image, five in Flickr30k, all of them CIDEr
references. Empty captions (in val/test as ``"<media_id>#<k>"``, the image's row keeping the others), missing
image files and images without a caption are reported as skipped.

Options (``--option KEY=VALUE``):

    captions=karpathy|token  caption source: the ``sentences[].raw`` of the split file (default when
                             dataset_flickr30k.json exists) or results_20130124.token (the default without the
                             split file; with the split file present its splits are still used, and an image
                             the token file has but the split file lacks is reported as skipped, split
                             "unsplit")
    images=DIR               folder of the images (relative to --root or absolute) instead of the lookup above
    val_fraction=F           share of images drawn for val, token file alone only (default 0.03)
    test_fraction=F          share of images drawn for test, token file alone only (default 0.03)
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError, DataError
from .common import check_options, fraction, media_finder, read_json, unit
from .writer import DatasetWriter

TASK = "flickr30k"

SPLIT_FILE = "dataset_flickr30k.json"
TOKEN_FILES = ("results_20130124.token", "results.token")
IMAGE_DIRS = ("flickr30k-images", "flickr30k_images", "flickr30k_images/flickr30k_images", "images", ".")
SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
OPTIONS = ("captions", "images", "val_fraction", "test_fraction")
DEFAULT_VAL_FRACTION = 0.03
DEFAULT_TEST_FRACTION = 0.03


def _karpathy(path: Path) -> list[tuple[str, str, str, list[str]]]:
    """(media id, file name, split, captions) per image of the split file, in file order."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with the key 'images'")
    if not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected a list under 'images' (Karpathy's split file: "
                        "images[].filename/split/sentences[].raw)")
    images = []
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str) or not image["filename"]:
            raise DataError(f"{where}: expected an object with a non-empty 'filename'")
        if not isinstance(image.get("split"), str):
            raise DataError(f"{where} ({image['filename']}): missing 'split' (train/restval/val/test)")
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            raise DataError(f"{where} ({image['filename']}): expected a list of objects under 'sentences'")
        captions = []
        for k, sentence in enumerate(sentences):
            raw = sentence.get("raw")
            if raw is not None and not isinstance(raw, str):
                raise DataError(f"{where}.sentences[{k}]: 'raw' must be a string, got {type(raw).__name__}")
            captions.append(raw or "")
        images.append((Path(image["filename"]).stem, image["filename"], image["split"], captions))
    return images


def _token(path: Path) -> dict[str, tuple[str, list[str]]]:
    """file name -> (file name, captions in the order of their #k) from results_20130124.token."""
    captions: dict[str, dict[int, str]] = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            name, hash_, k = key.partition("#")
            if not tab or not hash_ or not name or not k.isdigit():
                raise DataError(f"{path}:{lineno}: expected '<image file>#<k><TAB><caption>', got {line[:80]!r}")
            captions.setdefault(name, {})[int(k)] = caption
    return {name: (name, [caps[k] for k in sorted(caps)]) for name, caps in captions.items()}


def _add_image(writer: DatasetWriter, split: str, media_id: str, path: Path, captions: list[str]) -> None:
    if not captions:
        writer.skip(split, media_id, "no caption")
        return
    references = [c for c in captions if c.strip()]
    if split == "train":  # the writer reports an empty caption or a missing image for each sample
        for k, caption in enumerate(captions):
            writer.add(split, f"{media_id}#{k}", path, caption, references)
        return
    if references:
        for k, caption in enumerate(captions):
            if not caption.strip():
                writer.skip(split, f"{media_id}#{k}", "empty caption")
    writer.add(split, media_id, path, references[0] if references else "", references)


def convert(root: Path, writer: DatasetWriter, **options) -> None:
    check_options(TASK, options, OPTIONS)
    split_file = root / SPLIT_FILE
    token_file = next((root / n for n in TOKEN_FILES if (root / n).is_file()), root / TOKEN_FILES[0])
    has_split = split_file.is_file()
    if not has_split and not token_file.is_file():
        raise DataError(f"{root}: neither {SPLIT_FILE} (Karpathy's split file: images[].filename/split/"
                        f"sentences[].raw) nor {TOKEN_FILES[0]} (the original captions) found")
    source = options.get("captions", "karpathy" if has_split else "token")
    if source not in ("karpathy", "token"):
        raise ConfigError(f"flickr30k option captions={source!r}: expected karpathy or token")
    if source == "karpathy" and not has_split:
        raise DataError(f"{split_file}: not found (Karpathy's split file with images[].filename/split/"
                        f"sentences[].raw; or use captions=token with {TOKEN_FILES[0]})")
    if source == "token" and not token_file.is_file():
        raise DataError(f"{token_file}: not found (the original Flickr30k captions, "
                        "'<image file>#<k><TAB><caption>' per line)")
    if has_split:
        given = [k for k in ("val_fraction", "test_fraction") if k in options]
        if given:
            raise ConfigError(f"flickr30k option {given[0]}: only for the token file alone; the splits come "
                              f"from {split_file}")
    find = media_finder(root, IMAGE_DIRS, TASK, "images", options.get("images"), missing=root / IMAGE_DIRS[0])

    if has_split:
        images = _karpathy(split_file)
        tokens = _token(token_file) if source == "token" else None
        listed = set()
        for media_id, name, raw_split, captions in images:
            listed.add(name)
            split = SPLITS.get(raw_split)
            if split is None:
                writer.skip("unsplit", media_id, f"unknown split {raw_split!r} in {SPLIT_FILE} "
                                                 f"(valid: {', '.join(SPLITS)})")
                continue
            if tokens is not None:
                if name not in tokens:
                    writer.skip(split, media_id, f"no caption in {token_file.name}")
                    continue
                captions = tokens[name][1]
            _add_image(writer, split, media_id, find(name), captions)
        for name in tokens or ():
            if name not in listed:
                writer.skip("unsplit", Path(name).stem, f"not in {SPLIT_FILE} (no split)")
        return

    val_fraction = fraction(TASK, options, "val_fraction", DEFAULT_VAL_FRACTION)
    test_fraction = fraction(TASK, options, "test_fraction", DEFAULT_TEST_FRACTION)
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"flickr30k options val_fraction={val_fraction} + test_fraction={test_fraction}: "
                          "must leave images for train (sum < 1)")
    for name, captions in _token(token_file).values():
        media_id = Path(name).stem
        u = unit(media_id)
        split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        _add_image(writer, split, media_id, find(name), captions)
