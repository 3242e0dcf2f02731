"""Converters of the image and video datasets (Flickr30k, OK-VQA, MSR-VTT): tiny fixtures in the exact
official formats, with deliberately bad samples, converted through prepare_dataset and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import prepare_cli
from micl.data.converters import prepare_dataset
from micl.data.synth import _save_mp4
from micl.data.tasks import SPLITS, load_task_split
from micl.errors import ConfigError, DataError


def _unit(key: str) -> float:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) / 16 ** 40


def _jpg(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade % 256, 40, 90)).save(path, format="JPEG")


def _mp4(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_mp4([np.full((32, 32, 3), (shade + 40 * i) % 256, dtype=np.uint8) for i in range(4)], path)


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _load(out: Path, task: str) -> dict[str, list[dict]]:
    """Every split through load_task_split (which validates it); every media path must exist."""
    rows = {split: load_task_split(out, task, split) for split in SPLITS}
    for split_rows in rows.values():
        for row in split_rows:
            assert (out / row["media"]).is_file(), row
            assert not Path(row["media"]).is_absolute()
    return rows


def _skips(report) -> dict[tuple[str, str], str]:
    return {(s.split, s.sample): s.reason for s in report.skipped}


# ----------------------------------------------------------------------------------------------- Flickr30k

CAPS = {name: [f"{name} caption {k} ." for k in range(5)] for name in ("1001", "1002", "1003", "1004", "1005")}
CAPS["1001"][2] = "  "  # an empty caption in train
CAPS["1006"] = ["", "", "", "", ""]  # only empty captions
CAPS["1008"] = ["a caption", "another one"]  # its image is missing, in train
CAPS["1009"] = ["", "1009 b", "1009 c", "1009 d", "1009 e"]  # the first caption is empty, in val


def _flickr_root(root: Path, token: bool = True) -> Path:
    splits = {"1001": "train", "1002": "restval", "1003": "val", "1004": "test", "1005": "test", "1006": "val",
              "1008": "train", "1009": "val"}
    _dump(root / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": f"{name}.jpg", "imgid": i, "split": split, "sentids": list(range(5 * i, 5 * i + 5)),
         "sentences": [{"raw": c, "tokens": c.split(), "imgid": i, "sentid": 5 * i + k}
                       for k, c in enumerate(CAPS[name])]}
        for i, (name, split) in enumerate(splits.items())]})
    for i, name in enumerate(("1001", "1002", "1003", "1004", "1006", "1007", "1009")):  # 1005, 1008 missing
        _jpg(root / "flickr30k-images" / f"{name}.jpg", i)
    if token:  # captions of the original file: 1005, 1006, 1008 and 1009 absent, 1007 in no split
        lines = [f"{name}.jpg#{k}\ttok {name} {k} ." for name in ("1001", "1002", "1003", "1004", "1007")
                 for k in range(5)]
        (root / "results_20130124.token").write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")
    return root


def test_flickr30k_karpathy(tmp_path, capsys):
    root, out = _flickr_root(tmp_path / "flickr30k"), tmp_path / "data"
    report = prepare_dataset("flickr30k", root, out)
    assert report.counts == {"train": 9, "val": 2, "test": 1}
    images = root / "flickr30k-images"
    assert _skips(report) == {("train", "1001#2"): "empty caption",
                              ("test", "1005"): f"missing media file {images / '1005.jpg'}",
                              ("val", "1006"): "empty caption",
                              ("train", "1008#0"): f"missing media file {images / '1008.jpg'}",
                              ("train", "1008#1"): f"missing media file {images / '1008.jpg'}",
                              ("val", "1009#0"): "empty caption"}
    rows = _load(out, "flickr30k")
    train = {r["id"]: r for r in rows["train"]}
    assert list(train) == ["1001#0", "1001#1", "1001#3", "1001#4"] + [f"1002#{k}" for k in range(5)]  # restval
    assert train["1001#3"]["target"] == "1001 caption 3 ."
    assert train["1001#3"]["references"] == [CAPS["1001"][k] for k in (0, 1, 3, 4)]
    assert train["1002#4"]["references"] == CAPS["1002"]
    assert train["1002#4"]["media"] == "flickr30k/media/flickr30k-images/1002.jpg"
    assert rows["val"][1]["id"] == "1009" and rows["val"][1]["target"] == "1009 b"  # the first non-empty one
    assert rows["val"][1]["references"] == CAPS["1009"][1:]
    for row, name in ((rows["val"][0], "1003"), (rows["test"][0], "1004")):
        assert len(rows["test"]) == 1
        assert row["id"] == name and row["target"] == f"{name} caption 0 ."
        assert row["references"] == CAPS[name]  # all five captions are CIDEr references
        assert row["instruction"] == "" and row["modality"] == "image" and row["task_type"] == "caption"

    # the CLI: the same files, every skipped sample and the counts line on stdout
    first = {s: (out / "flickr30k" / f"{s}.jsonl").read_bytes() for s in SPLITS}
    rc, lines, err = prepare_cli(capsys, "flickr30k", root, out)
    assert rc == 0, err
    assert {s: (out / "flickr30k" / f"{s}.jsonl").read_bytes() for s in SPLITS} == first
    assert sorted(lines[:-1]) == sorted(str(s) for s in report.skipped)
    assert "skipped train/1001#2: empty caption" in lines
    assert lines[-1] == f"flickr30k: train 9, val 2, test 1 -> {out / 'flickr30k'}; 6 skipped"


def test_flickr30k_token_captions_with_karpathy_splits(tmp_path, capsys):
    root, out = _flickr_root(tmp_path / "flickr30k"), tmp_path / "data"
    rc, lines, err = prepare_cli(capsys, "flickr30k", root, out, "captions=token")
    assert rc == 0, err
    assert lines[-1] == f"flickr30k: train 10, val 1, test 1 -> {out / 'flickr30k'}; 5 skipped"
    assert sorted(lines[:-1]) == sorted(["skipped test/1005: no caption in results_20130124.token",
                                         "skipped val/1006: no caption in results_20130124.token",
                                         "skipped train/1008: no caption in results_20130124.token",
                                         "skipped val/1009: no caption in results_20130124.token",
                                         "skipped unsplit/1007: not in dataset_flickr30k.json (no split)"])
    rows = _load(out, "flickr30k")
    assert [r["id"] for r in rows["train"]] == [f"{n}#{k}" for n in ("1001", "1002") for k in range(5)]
    assert rows["train"][2]["target"] == "tok 1001 2 ."  # ordered by #k, whatever the line order
    (val,) = rows["val"]
    assert val["id"] == "1003" and val["target"] == "tok 1003 0 ."
    assert val["references"] == [f"tok 1003 {k} ." for k in range(5)]


def test_flickr30k_token_file_alone_draws_the_splits(tmp_path):
    root, out = tmp_path / "flickr30k", tmp_path / "data"
    names = [str(2000 + i) for i in range(12)]
    (root).mkdir()
    (root / "results_20130124.token").write_text(
        "".join(f"{n}.jpg#{k}\t{n} cap {k}\n" for n in names for k in range(5)), encoding="utf-8")
    for i, n in enumerate(names):
        _jpg(root / "flickr30k_images" / f"{n}.jpg", i)  # the other usual folder name
    report = prepare_dataset("flickr30k", root, out, val_fraction="0.25", test_fraction="0.25")
    assert report.skipped == []
    expected = {n: "test" if _unit(n) < 0.25 else "val" if _unit(n) < 0.5 else "train" for n in names}
    rows = _load(out, "flickr30k")
    got = {r["id"].split("#")[0]: split for split in SPLITS for r in rows[split]}
    assert got == expected and set(expected.values()) == {"train", "val", "test"}
    assert len(rows["train"]) == 5 * list(expected.values()).count("train")

    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_dataset("flickr30k", root, out, val_fraction="half")
    with pytest.raises(ConfigError, match="val_fraction=0.6 \\+ test_fraction=0.5"):
        prepare_dataset("flickr30k", root, out, val_fraction="0.6", test_fraction="0.5")
    with pytest.raises(DataError, match="dataset_flickr30k.json: not found"):
        prepare_dataset("flickr30k", root, out, captions="karpathy")


def test_flickr30k_errors(tmp_path, capsys):
    root, out = tmp_path / "flickr30k", tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataError, match="neither dataset_flickr30k.json .* nor results_20130124.token"):
        prepare_dataset("flickr30k", root, out)
    _flickr_root(root, token=False)
    with pytest.raises(DataError, match="results_20130124.token: not found"):
        prepare_dataset("flickr30k", root, out, captions="token")
    with pytest.raises(ConfigError, match="captions='coco'"):
        prepare_dataset("flickr30k", root, out, captions="coco")
    with pytest.raises(ConfigError, match="val_fraction: only for the token file alone"):
        prepare_dataset("flickr30k", root, out, val_fraction="0.1")
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        prepare_dataset("flickr30k", root, out, colour="red")
    rc, _, err = prepare_cli(capsys, "flickr30k", root, out, "images=nowhere")
    assert rc == 2 and "images='nowhere'" in err and "not a folder" in err
    _dump(root / "dataset_flickr30k.json", {"images": [{"filename": "1.jpg", "sentences": []}]})
    rc, _, err = prepare_cli(capsys, "flickr30k", root, out)
    assert rc == 2 and "dataset_flickr30k.json: images[0] (1.jpg): missing 'split'" in err
    assert not (out / "flickr30k").exists()


# ----------------------------------------------------------------------------------------------------- OK-VQA

def _pick(n_val: int, n_train: int) -> tuple[list[int], list[int]]:
    """Question ids that the default 10% rule puts in val / in train."""
    val, train, qid = [], [], 5000
    while len(val) < n_val or len(train) < n_train:
        qid += 1
        if _unit(str(qid)) < 0.1:
            val.append(qid) if len(val) < n_val else None
        elif len(train) < n_train:
            train.append(qid)
    return val, train


def _answers(*answers: str) -> list[dict]:
    return [{"answer_id": i + 1, "raw_answer": a, "answer_confidence": "yes", "answer": a}
            for i, a in enumerate(answers)]


TIE = ["ponytail", "pony tail", "pony tail", "ponytail", "braid", "pony tail", "ponytail", "braid", "bun", "bun"]
MAJORITY = ["dog", "puppy", "dog", "dog", "cat", "dog", "puppy", "dog", "dog", "dog"]


def _okvqa_root(root: Path) -> tuple[Path, dict[str, int]]:
    (val_a, val_b), (tr_a, tr_b, tr_c, tr_d, tr_e, tr_g) = _pick(2, 6)
    ids = dict(val_a=val_a, val_b=val_b, tr_a=tr_a, tr_b=tr_b, no_answers=tr_c, no_annotation=tr_d,
               missing_image=tr_e, empty_question=val_b, orphan=tr_g, test_a=42001, test_b=42002)
    questions = [
        (val_a, 11, "What is the hairstyle called?"), (tr_a, 12, "Which animal is this?"),
        (tr_b, 11, "Why is she smiling?"), (tr_c, 12, "What season is it?"), (tr_d, 12, "Who made this?"),
        (tr_e, 13, "What brand is the car?"), (val_b, 12, "  "),
    ]
    _dump(root / "OpenEnded_mscoco_train2014_questions.json", {
        "license": {}, "data_subtype": "train2014", "task_type": "Open-Ended", "data_type": "mscoco",
        "questions": [{"image_id": img, "question": q, "question_id": qid} for qid, img, q in questions]})
    answers = {val_a: TIE, tr_a: MAJORITY, tr_b: ["happy"] * 10, tr_c: [], tr_e: ["ford"] * 10,
               val_b: ["x"] * 10, tr_g: ["orphan"] * 10}
    _dump(root / "mscoco_train2014_annotations.json", {"annotations": [
        {"image_id": 0, "question_id": qid, "question_type": "other", "answer_type": "other", "confidence": 3,
         "answers": _answers(*a)} for qid, a in answers.items()]})
    _dump(root / "OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 42, "question": "What is on the plate?", "question_id": 42001},
        {"image_id": 73, "question": "What sport is this?", "question_id": 42002}]})
    _dump(root / "mscoco_val2014_annotations.json", {"annotations": [
        {"image_id": 42, "question_id": 42001, "answers": _answers(*(["pizza"] * 7 + ["food"] * 3))},
        {"image_id": 73, "question_id": 42002, "answers": _answers(*(["tennis"] * 9 + [""]))}]})
    _jpg(root / "train2014" / "COCO_train2014_000000000011.jpg", 1)
    _jpg(root / "train2014" / "COCO_train2014_000000000012.jpg", 2)  # 13 is missing
    _jpg(root / "val2014" / "COCO_val2014_000000000042.jpg", 3)
    _jpg(root / "COCO_val2014_000000000073.jpg", 4)  # directly under the root
    return root, ids


def test_okvqa(tmp_path, capsys):
    (root, ids), out = _okvqa_root(tmp_path / "okvqa"), tmp_path / "data"
    report = prepare_dataset("okvqa", root, out)
    assert report.counts == {"train": 2, "val": 1, "test": 2}
    missing = root / "train2014" / "COCO_train2014_000000000013.jpg"
    assert _skips(report) == {
        ("train", str(ids["no_answers"])): "no answers",
        ("train", str(ids["no_annotation"])): "no annotation in mscoco_train2014_annotations.json",
        ("train", str(ids["missing_image"])): f"missing media file {missing}",
        ("val", str(ids["empty_question"])): "empty question",
        ("train", str(ids["orphan"])): "annotation without a question in OpenEnded_mscoco_train2014_questions.json",
    }
    rows = _load(out, "okvqa")
    # val drawn from train2014 by sha1 of the question id, test = val2014
    (val,) = rows["val"]
    assert val["id"] == str(ids["val_a"]) and val["instruction"] == "What is the hairstyle called?"
    assert val["target"] == "ponytail"  # a tie between 'ponytail' and 'pony tail': the first in annotation order
    assert val["references"] == TIE  # all ten, duplicates kept
    assert val["media"] == "okvqa/media/train2014/COCO_train2014_000000000011.jpg"
    train = {r["id"]: r for r in rows["train"]}
    assert list(train) == [str(ids["tr_a"]), str(ids["tr_b"])]
    assert train[str(ids["tr_a"])]["target"] == "dog" and train[str(ids["tr_a"])]["references"] == MAJORITY
    assert [r["id"] for r in rows["test"]] == ["42001", "42002"]
    assert rows["test"][0]["references"] == ["pizza"] * 7 + ["food"] * 3 and rows["test"][0]["target"] == "pizza"
    assert rows["test"][1]["references"] == ["tennis"] * 9  # the empty answer is not a reference
    assert rows["test"][1]["media"] == "okvqa/media/okvqa/COCO_val2014_000000000073.jpg"
    assert all(r["task_type"] == "qa" and r["modality"] == "image" for s in rows.values() for r in s)

    rc, lines, err = prepare_cli(capsys, "okvqa", root, out, "val_fraction=0")
    assert rc == 0, err
    assert lines[-1] == f"okvqa: train 3, val 0, test 2 -> {out / 'okvqa'}; 5 skipped"
    assert f"skipped train/{ids['no_answers']}: no answers" in lines
    assert f"skipped train/{ids['empty_question']}: empty question" in lines  # no val any more
    assert len(lines) == 6


def test_okvqa_errors(tmp_path, capsys):
    (root, _), out = _okvqa_root(tmp_path / "okvqa"), tmp_path / "data"
    for value in ("1", "-0.1", "ten"):
        rc, _, err = prepare_cli(capsys, "okvqa", root, out, f"val_fraction={value}")
        assert rc == 2 and f"val_fraction='{value}'" in err
    with pytest.raises(ConfigError, match="images='coco'"):
        prepare_dataset("okvqa", root, out, images="coco")
    (root / "mscoco_val2014_annotations.json").unlink()
    rc, _, err = prepare_cli(capsys, "okvqa", root, out)
    assert rc == 2 and "mscoco_val2014_annotations.json: not found" in err and "answers[].answer" in err
    _dump(root / "mscoco_val2014_annotations.json", {"annotations": [{"question_id": 42001}]})
    with pytest.raises(DataError, match=r"mscoco_val2014_annotations.json: annotations\[0\]: missing answers"):
        prepare_dataset("okvqa", root, out)
    _dump(root / "mscoco_val2014_annotations.json", {"data": []})
    with pytest.raises(DataError, match="expected a list under 'annotations'"):
        prepare_dataset("okvqa", root, out)
    assert not (out / "okvqa").exists()


# ---------------------------------------------------------------------------------------------------- MSR-VTT

def _msrvtt_root(root: Path, layout: str = "official") -> Path:
    _dump(root / "train_val_videodatainfo.json", {
        "info": {"year": 2016},
        "videos": [{"category": 9, "url": "https://youtu.be/x", "video_id": f"video{i}", "start time": 1.0,
                    "end time": 9.0, "split": split, "id": i}
                   for i, split in enumerate(["train", "train", "validate", "validate", "extra"])],
        "sentences": [{"caption": c, "video_id": v, "sen_id": j} for j, (v, c) in enumerate([
            ("video0", "a man is cooking"), ("video2", "a dog runs"), ("video0", ""), ("video1", "a car drives"),
            ("video0", "someone cooks food"), ("video2", "a dog is running in a park"), ("video9", "orphan"),
            ("video4", "a cat")])]})
    _dump(root / "annotation" / "test_videodatainfo.json", {
        "videos": [{"video_id": "video5", "split": "test", "id": 5}, {"video_id": "video6", "split": "test", "id": 6}],
        "sentences": [{"caption": "people dance", "video_id": "video6"}, {"caption": "a song", "video_id": "video5"},
                      {"caption": " ", "video_id": "video6"},
                      {"caption": "a band plays", "video_id": "video5"}]})
    trainval, test = ("TrainValVideo", "TestVideo") if layout == "official" else ("videos/all", "videos/all")
    for i in (0, 2, 3, 4):  # video1 is missing
        _mp4(root / trainval / f"video{i}.mp4", 10 * i)
    for i in (5, 6):
        _mp4(root / test / f"video{i}.mp4", 10 * i)
    return root


def test_msrvtt(tmp_path, capsys):
    root, out = _msrvtt_root(tmp_path / "msrvtt"), tmp_path / "data"
    report = prepare_dataset("msrvtt", root, out)
    assert report.counts == {"train": 2, "val": 1, "test": 2}
    assert _skips(report) == {
        ("train", "video0#1"): "empty caption",
        ("train", "video1#0"): f"missing media file {root / 'TrainValVideo' / 'video1.mp4'}",
        ("test", "video6#1"): "empty caption",
        ("val", "video3"): "no caption in train_val_videodatainfo.json",
        ("unsplit", "video4"): "unknown split 'extra' in train_val_videodatainfo.json (valid: train, validate, test)",
        ("unsplit", "video9"): "1 caption(s) in train_val_videodatainfo.json for a video that its videos[] does "
                               "not list",
    }
    rows = _load(out, "msrvtt")
    assert [(r["id"], r["target"]) for r in rows["train"]] == [("video0#0", "a man is cooking"),
                                                               ("video0#2", "someone cooks food")]
    assert rows["train"][0]["references"] == ["a man is cooking", "someone cooks food"]
    assert rows["train"][0]["media"] == "msrvtt/media/TrainValVideo/video0.mp4"
    (val,) = rows["val"]  # validate -> val
    assert val["id"] == "video2" and val["target"] == "a dog runs"
    assert val["references"] == ["a dog runs", "a dog is running in a park"]
    assert [(r["id"], r["target"], r["references"]) for r in rows["test"]] == [
        ("video5", "a song", ["a song", "a band plays"]), ("video6", "people dance", ["people dance"])]
    assert rows["test"][0]["media"] == "msrvtt/media/TestVideo/video5.mp4"
    assert all(r["modality"] == "video" and r["instruction"] == "" for s in rows.values() for r in s)

    rc, lines, err = prepare_cli(capsys, "msrvtt", root, out)
    assert rc == 0, err
    assert lines[-1] == f"msrvtt: train 2, val 1, test 2 -> {out / 'msrvtt'}; 6 skipped"
    assert "skipped val/video3: no caption in train_val_videodatainfo.json" in lines and len(lines) == 7


def test_msrvtt_other_layouts_and_errors(tmp_path, capsys):
    root, out = _msrvtt_root(tmp_path / "msrvtt", layout="clip4clip"), tmp_path / "data"
    report = prepare_dataset("msrvtt", root, out)
    assert report.counts == {"train": 2, "val": 1, "test": 2}
    rows = _load(out, "msrvtt")
    assert rows["test"][1]["media"] == "msrvtt/media/all/video6.mp4"

    shutil.move(str(root / "videos" / "all"), str(root / "clips"))
    rc, lines, err = prepare_cli(capsys, "msrvtt", root, out, "videos=clips")
    assert rc == 0, err
    assert lines[-1].startswith("msrvtt: train 2, val 1, test 2")
    assert _load(out, "msrvtt")["val"][0]["media"] == "msrvtt/media/clips/video2.mp4"
    rc, _, err = prepare_cli(capsys, "msrvtt", root, out, "videos=nowhere")
    assert rc == 2 and "videos='nowhere'" in err
    with pytest.raises(ConfigError, match="unknown option.*fps"):
        prepare_dataset("msrvtt", root, out, fps="2")

    (root / "annotation" / "test_videodatainfo.json").unlink()
    rc, _, err = prepare_cli(capsys, "msrvtt", root, out)
    assert rc == 2 and "test_videodatainfo.json: not found" in err and "sentences[].video_id/caption" in err
    _dump(root / "test_videodatainfo.json", {"videos": [{"video_id": "video5"}], "sentences": []})
    with pytest.raises(DataError, match=r"test_videodatainfo.json: videos\[0\]: missing split"):
        prepare_dataset("msrvtt", root, out)
