"""Converters MSVD-QA, AudioCaps and Clotho-AQA on tiny fixtures in their exact official layouts, through
`prepare_dataset` and the CLI (`micl data prepare`), bad rows included."""

from __future__ import annotations

import csv
import json
import wave
from pathlib import Path

import numpy as np
import pytest

from conftest import prepare_cli
from micl.data.converters import prepare_dataset
from micl.data.tasks import SPLITS, load_task_split
from micl.errors import ConfigError, DataError


# --------------------------------------------------------------------------- media writers


def write_wav(path: Path, freq: float = 440.0) -> Path:
    """0.5 s tone, 16 kHz, 16-bit PCM mono."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(8000) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(pcm.tobytes())
    return path


def write_avi(path: Path) -> Path:
    """4 frames 32x32, mpeg4 in AVI."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(4):
            img = np.full((32, 32, 3), 60 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------- helpers


def load_all(out: Path, task: str) -> dict[str, dict[str, dict]]:
    """split -> id -> row, validated by load_task_split; every media file must exist."""
    result = {}
    for split in SPLITS:
        rows = load_task_split(out, task, split)
        for row in rows:
            assert (Path(out) / row["media"]).is_file(), row
        result[split] = {row["id"]: row for row in rows}
    return result


def skipped_map(report) -> dict[tuple[str, str], str]:
    return {(s.split, s.sample): s.reason for s in report.skipped}


def same_files(a: Path, b: Path, task: str) -> None:
    for split in SPLITS:
        assert (a / task / f"{split}.jsonl").read_text() == (b / task / f"{split}.jsonl").read_text()


# --------------------------------------------------------------------------- MSVD-QA


def make_msvd(root: Path) -> Path:
    write_avi(root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi")
    write_avi(root / "videos" / "xyz_0_4.avi")  # second accepted folder
    write_avi(root / "root_clip_1_2.avi")  # directly under the root
    (root / "youtube_mapping.txt").write_text(
        "-4wsuPCjDBc_5_15 vid1\nmissing_clip_3_9 vid2\nxyz_0_4 vid3\nroot_clip_1_2 vid4\n")
    train = [
        {"answer": "animal", "id": 0, "question": "what is chewing on a nut?", "video_id": 1},
        {"answer": "man", "id": 1, "question": "who is playing a guitar?", "video_id": 1},
        {"answer": "cat", "id": 2, "question": "what is jumping?", "video_id": 2},  # video file missing
        {"answer": "dog", "id": 3, "question": "what runs?", "video_id": 9},  # no mapping line
        {"answer": "car", "id": 4, "question": "  ", "video_id": 1},  # empty question
        {"answer": "", "id": 5, "question": "what is cut?", "video_id": 1},  # empty answer
    ]
    val = [{"answer": "woman", "id": 30933, "question": "who is slicing an onion?", "video_id": 3}]
    test = [{"answer": "ball", "id": 37348, "question": "what is kicked?", "video_id": 4},
            {"answer": "two", "id": 37349, "question": "how many men dance?", "video_id": "vid1"}]
    for name, entries in (("train_qa.json", train), ("val_qa.json", val), ("test_qa.json", test)):
        (root / name).write_text(json.dumps(entries))
    return root


def test_msvd_qa(tmp_path, capsys):
    root = make_msvd(tmp_path / "msvd")
    out = tmp_path / "out"
    report = prepare_dataset("msvd_qa", root, out)
    assert report.counts == {"train": 2, "val": 1, "test": 2}
    data = load_all(out, "msvd_qa")
    assert set(data["train"]) == {"0", "1"} and set(data["val"]) == {"30933"}
    assert set(data["test"]) == {"37348", "37349"}
    row = data["train"]["0"]
    assert (row["instruction"], row["target"], row["references"]) == ("what is chewing on a nut?", "animal", ["animal"])
    assert (row["modality"], row["task_type"], row["task"]) == ("video", "qa", "msvd_qa")
    assert (out / row["media"]).resolve() == (root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi").resolve()
    assert (out / data["val"]["30933"]["media"]).resolve() == (root / "videos" / "xyz_0_4.avi").resolve()
    assert (out / data["test"]["37348"]["media"]).resolve() == (root / "root_clip_1_2.avi").resolve()
    assert data["test"]["37349"]["target"] == "two"

    skipped = skipped_map(report)
    assert set(skipped) == {("train", "2"), ("train", "3"), ("train", "4"), ("train", "5")}
    assert "missing media file" in skipped[("train", "2")] and "missing_clip_3_9" in skipped[("train", "2")]
    assert "youtube_mapping.txt" in skipped[("train", "3")] and "vid9" in skipped[("train", "3")]
    assert skipped[("train", "4")] == "empty question"
    assert skipped[("train", "5")] == "empty answer"

    rc, lines, _ = prepare_cli(capsys, "msvd_qa", root, tmp_path / "cli")
    assert rc == 0
    assert lines[-1] == f"msvd_qa: train 2, val 1, test 2 -> {tmp_path / 'cli' / 'msvd_qa'}; 4 skipped"
    assert sorted(lines[:-1]) == sorted(str(s) for s in report.skipped)
    assert any(line.startswith("skipped train/3: ") for line in lines)
    same_files(out, tmp_path / "cli", "msvd_qa")


def test_msvd_qa_errors(tmp_path, capsys):
    root = make_msvd(tmp_path / "msvd")
    (root / "youtube_mapping.txt").rename(root / "mapping.bak")
    with pytest.raises(DataError, match="youtube_mapping.txt: file not found"):
        prepare_dataset("msvd_qa", root, tmp_path / "out")
    rc, _, err = prepare_cli(capsys, "msvd_qa", root, tmp_path / "out")
    assert rc == 2 and "youtube_mapping.txt" in err
    (root / "mapping.bak").rename(root / "youtube_mapping.txt")

    (root / "test_qa.json").unlink()
    with pytest.raises(DataError, match="test_qa.json: file not found"):
        prepare_dataset("msvd_qa", root, tmp_path / "out")
    (root / "test_qa.json").write_text(json.dumps([{"id": 7, "question": "why?", "video_id": 1}]))
    with pytest.raises(DataError, match=r"test_qa.json: entry 0: missing key\(s\) answer"):
        prepare_dataset("msvd_qa", root, tmp_path / "out")
    (root / "test_qa.json").write_text(json.dumps({"id": 7}))
    with pytest.raises(DataError, match="test_qa.json: expected a JSON list"):
        prepare_dataset("msvd_qa", root, tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown option"):
        prepare_dataset("msvd_qa", root, tmp_path / "out", foo="1")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- AudioCaps

AC_HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]
VAL_CAPS = ["A man speaks loudly", "Someone talks", "A male voice", "A person speaking", "Speech and wind"]


def make_audiocaps(root: Path) -> Path:
    write_csv(root / "train.csv", AC_HEADER, [
        [91139, "r1ZhN_A0Ak0", 30, "A bell rings"],  # <yt>_<start>.wav in train/ (and a copy in the root)
        [58146, "-aaaaaaaaaa", 0, "Water flows"],  # <audiocap_id>.wav in train/
        [11111, "bbbbbbbbbbb", 10, ""],  # empty caption
        [22222, "ccccccccccc", 20, "Birds chirp"],  # no audio
        [33333, "ddddddddddd", "40.0", "A dog barks"],  # Y<yt>.wav in audio/ (start written 40.0)
    ])
    write_wav(root / "train" / "r1ZhN_A0Ak0_30.wav")
    write_wav(root / "r1ZhN_A0Ak0_30.wav", 880.0)  # the train/ copy wins
    write_wav(root / "train" / "58146.wav")
    write_wav(root / "train" / "bbbbbbbbbbb_10.wav")
    write_wav(root / "audio" / "Yddddddddddd.wav")
    write_csv(root / "val.csv", AC_HEADER,
              [[100 + i, "eeeeeeeeeee", 30, c] for i, c in enumerate(VAL_CAPS)]
              + [[200 + i, "fffffffffff", 0, c] for i, c in enumerate(["Rain falls", "Heavy rain", "", "Rain on a roof",
                                                                       "Raindrops"])])
    write_wav(root / "audio" / "val" / "eeeeeeeeeee_30.wav")
    write_wav(root / "202.wav")  # named after the clip's third audiocap_id, in the root
    write_csv(root / "test.csv", AC_HEADER,
              [[300 + i, "ggggggggggg", 50, f"test caption {i}"] for i in range(5)]
              + [[400 + i, "hhhhhhhhhhh", 0, f"lost caption {i}"] for i in range(5)])
    write_wav(root / "test" / "ggggggggggg.wav")  # <yt>.wav
    return root


def test_audiocaps(tmp_path, capsys):
    root = make_audiocaps(tmp_path / "audiocaps")
    out = tmp_path / "out"
    report = prepare_dataset("audiocaps", root, out)
    assert report.counts == {"train": 3, "val": 2, "test": 1}
    data = load_all(out, "audiocaps")
    assert set(data["train"]) == {"r1ZhN_A0Ak0_30#0", "-aaaaaaaaaa_0#0", "ddddddddddd_40#0"}
    row = data["train"]["r1ZhN_A0Ak0_30#0"]
    assert (row["target"], row["references"], row["instruction"]) == ("A bell rings", ["A bell rings"], "")
    assert (row["modality"], row["task_type"]) == ("audio", "caption")
    media = {rid: (out / r["media"]).resolve() for split in SPLITS for rid, r in data[split].items()}
    assert media["r1ZhN_A0Ak0_30#0"] == (root / "train" / "r1ZhN_A0Ak0_30.wav").resolve()
    assert media["-aaaaaaaaaa_0#0"] == (root / "train" / "58146.wav").resolve()  # audiocap_id naming
    assert media["ddddddddddd_40#0"] == (root / "audio" / "Yddddddddddd.wav").resolve()
    assert media["eeeeeeeeeee_30"] == (root / "audio" / "val" / "eeeeeeeeeee_30.wav").resolve()
    assert media["fffffffffff_0"] == (root / "202.wav").resolve()
    assert media["ggggggggggg_50"] == (root / "test" / "ggggggggggg.wav").resolve()

    val = data["val"]
    assert set(val) == {"eeeeeeeeeee_30", "fffffffffff_0"}
    assert val["eeeeeeeeeee_30"]["target"] == VAL_CAPS[0]
    assert val["eeeeeeeeeee_30"]["references"] == VAL_CAPS  # all five
    assert val["fffffffffff_0"]["references"] == ["Rain falls", "Heavy rain", "Rain on a roof", "Raindrops"]
    assert data["test"]["ggggggggggg_50"]["references"] == [f"test caption {i}" for i in range(5)]
    assert data["test"]["ggggggggggg_50"]["target"] == "test caption 0"

    skipped = skipped_map(report)
    assert set(skipped) == {("train", "bbbbbbbbbbb_10#0"), ("train", "ccccccccccc_20#0"), ("val", "fffffffffff_0#2"),
                            ("test", "hhhhhhhhhhh_0")}
    assert skipped[("train", "bbbbbbbbbbb_10#0")] == "empty caption"
    assert skipped[("val", "fffffffffff_0#2")] == "empty caption"
    for key in (("train", "ccccccccccc_20#0"), ("test", "hhhhhhhhhhh_0")):
        assert skipped[key].startswith("missing media file for clip")

    rc, lines, _ = prepare_cli(capsys, "audiocaps", root, tmp_path / "cli")
    assert rc == 0
    assert lines[-1] == f"audiocaps: train 3, val 2, test 1 -> {tmp_path / 'cli' / 'audiocaps'}; 4 skipped"
    assert "skipped val/fffffffffff_0#2: empty caption" in lines
    assert any(line.startswith("skipped test/hhhhhhhhhhh_0: missing media file") for line in lines)
    same_files(out, tmp_path / "cli", "audiocaps")


def test_audiocaps_errors(tmp_path, capsys):
    root = make_audiocaps(tmp_path / "audiocaps")
    (root / "test.csv").unlink()
    with pytest.raises(DataError, match="test.csv: file not found"):
        prepare_dataset("audiocaps", root, tmp_path / "out")
    write_csv(root / "test.csv", ["audiocap_id", "youtube_id", "start_time", "text"], [[1, "ggggggggggg", 50, "x"]])
    with pytest.raises(DataError, match=r"test.csv: missing column\(s\) caption"):
        prepare_dataset("audiocaps", root, tmp_path / "out")
    rc, _, err = prepare_cli(capsys, "audiocaps", root, tmp_path / "out")
    assert rc == 2 and "missing column(s) caption" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Clotho-AQA

CL_HEADER = ["file_name", "QuestionText", "answer", "confidence"]


def make_clotho(root: Path) -> Path:
    write_csv(root / "clotho_aqa_train.csv", CL_HEADER, [
        ["rain on roof.wav", "Is it raining?", "yes", "yes"],
        ["rain on roof.wav", "Is it raining?", "no", "yes"],
        ["rain on roof.wav", "Is it raining?", "yes", "maybe"],
        ["rain on roof.wav", "What animal is heard?", "dog", "yes"],
        ["rain on roof.wav", "What animal is heard?", "Bird", "yes"],
        ["rain on roof.wav", "What  animal is heard?", "bird", "Yes"],
        ["rain on roof.wav", "How many birds?", "two", "no"],  # only low-confidence answers
        ["rain on roof.wav", "How many birds?", "three", "maybe"],
        ["rain on roof.wav", "How many birds?", "two", "no"],
        ["lost.wav", "Is there music?", "no", "yes"],  # audio missing
        ["lost.wav", "Is there music?", "no", "yes"],
        ["street.wav", "", "yes", "yes"],  # empty question
    ])
    write_csv(root / "clotho_aqa_val.csv", CL_HEADER, [
        ["street.wav", "Is a car passing?", "yes", "yes"],
        ["street.wav", "Is a car passing?", "yes", "yes"],
        ["street.wav", "Is a car passing?", "no", "maybe"],
    ])
    write_csv(root / "clotho_aqa_test.csv", CL_HEADER, [
        ["wind.wav", "What is the weather?", "windy", "yes"],
        ["wind.wav", "What is the weather?", "sunny", "no"],
        ["wind.wav", "What is the weather?", "windy", "yes"],
    ])
    for name in ("rain on roof.wav", "street.wav", "wind.wav"):
        write_wav(root / "audio_files" / name)
    return root


def test_clotho_aqa(tmp_path, capsys):
    root = make_clotho(tmp_path / "clotho")
    out = tmp_path / "out"
    report = prepare_dataset("clotho_aqa", root, out)
    assert report.counts == {"train": 2, "val": 1, "test": 1}
    data = load_all(out, "clotho_aqa")
    train = data["train"]
    assert set(train) == {"rain on roof.wav#0", "rain on roof.wav#1"}
    row = train["rain on roof.wav#0"]
    assert (row["instruction"], row["target"], row["references"]) == ("Is it raining?", "yes", ["yes", "no"])  # tie
    assert (row["modality"], row["task_type"]) == ("audio", "qa")
    row = train["rain on roof.wav#1"]
    assert (row["instruction"], row["target"], row["references"]) == ("What animal is heard?", "Bird", ["dog", "Bird"])
    assert (out / row["media"]).resolve() == (root / "audio_files" / "rain on roof.wav").resolve()
    # ids stay unique when a file has questions in two splits (street.wav#0 is the empty train question)
    assert set(data["val"]) == {"street.wav#1"}
    assert (data["val"]["street.wav#1"]["target"], data["val"]["street.wav#1"]["references"]) == ("yes", ["yes"])
    assert (data["test"]["wind.wav#0"]["target"], data["test"]["wind.wav#0"]["references"]) == ("windy", ["windy"])

    skipped = skipped_map(report)
    assert set(skipped) == {("train", "rain on roof.wav#2"), ("train", "lost.wav#0"), ("train", "street.wav#0")}
    assert skipped[("train", "rain on roof.wav#2")].startswith("no answer with confidence yes (3 answer(s)")
    assert "missing media file" in skipped[("train", "lost.wav#0")]
    assert skipped[("train", "street.wav#0")] == "empty question"

    rc, lines, _ = prepare_cli(capsys, "clotho_aqa", root, tmp_path / "cli")
    assert rc == 0
    assert lines[-1] == f"clotho_aqa: train 2, val 1, test 1 -> {tmp_path / 'cli' / 'clotho_aqa'}; 3 skipped"
    assert "skipped train/street.wav#0: empty question" in lines
    same_files(out, tmp_path / "cli", "clotho_aqa")

    # confidence=all keeps every answer
    rc, lines, _ = prepare_cli(capsys, "clotho_aqa", root, tmp_path / "all", "confidence=all")
    assert rc == 0
    assert lines[-1] == f"clotho_aqa: train 3, val 1, test 1 -> {tmp_path / 'all' / 'clotho_aqa'}; 2 skipped"
    data = load_all(tmp_path / "all", "clotho_aqa")
    row = data["train"]["rain on roof.wav#0"]
    assert (row["target"], row["references"]) == ("yes", ["yes", "no"])
    row = data["train"]["rain on roof.wav#2"]
    assert (row["instruction"], row["target"], row["references"]) == ("How many birds?", "two", ["two", "three"])
    assert data["val"]["street.wav#1"]["references"] == ["yes", "no"]
    assert data["test"]["wind.wav#0"]["references"] == ["windy", "sunny"]


def test_clotho_aqa_errors(tmp_path, capsys):
    root = make_clotho(tmp_path / "clotho")
    with pytest.raises(ConfigError, match="confidence='maybe'"):
        prepare_dataset("clotho_aqa", root, tmp_path / "out", confidence="maybe")
    with pytest.raises(ConfigError, match="unknown option.*threshold"):
        prepare_dataset("clotho_aqa", root, tmp_path / "out", threshold="1")
    rc, _, err = prepare_cli(capsys, "clotho_aqa", root, tmp_path / "out", "confidence=maybe")
    assert rc == 2 and "confidence" in err

    (root / "clotho_aqa_val.csv").unlink()
    with pytest.raises(DataError, match="clotho_aqa_val.csv: file not found"):
        prepare_dataset("clotho_aqa", root, tmp_path / "out")
    write_csv(root / "clotho_aqa_val.csv", ["file_name", "QuestionText", "answer"], [["street.wav", "Q?", "yes"]])
    with pytest.raises(DataError, match=r"clotho_aqa_val.csv: missing column\(s\) confidence"):
        prepare_dataset("clotho_aqa", root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
