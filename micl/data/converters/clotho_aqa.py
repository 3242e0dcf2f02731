"""Clotho-AQA (Lipping et al., 2022), audio QA, from its official release.

Expected layout under ``--root``::

    clotho_aqa_train.csv  clotho_aqa_val.csv  clotho_aqa_test.csv
        header ``file_name,QuestionText,answer,confidence`` (more columns are ignored); one row per
        annotator answer: each (file_name, question) comes with several rows (three in the release),
        ``confidence`` is the annotator's "yes" / "maybe" / "no"
    audio_files/<file_name>
        the audio clips (``file_name`` as in the CSV, extension included, e.g. ``Rain.wav``; a file_name
        without extension is looked up as <file_name>.wav/.flac/.mp3/.ogg/.m4a)

Splits: the official ones (clotho_aqa_train.csv -> train, _val -> val, _test -> test).

Rows: one per (file_name, question) of a split, questions compared after collapsing whitespace. id =
``<file_name>#<k>``, k = the question's index among that file's distinct questions in CSV order (from 0; the
splits are numbered in the order train, val, test, so a file found in two splits still gets unique ids),
stable across runs; instruction = the question; target = the most frequent kept answer (ties: the first in
CSV order); references = the distinct kept answers, in CSV order. Answers are counted and deduplicated
case-insensitively, with whitespace collapsed (the first spelling is kept).

Option ``confidence`` (default ``yes``): ``yes`` keeps only the answers whose annotator confidence is "yes"
(case-insensitive), ``all`` keeps every answer whatever its confidence.

Reported as skipped (never dropped silently): a question none of whose answers is kept ("no answer with
confidence yes"), a question whose kept answers are all empty, an empty question, a missing audio file.

Errors (``DataError``): a missing CSV, a CSV without one of the columns file_name, QuestionText, answer,
confidence. ``ConfigError``: a bad ``confidence`` value or an unknown option.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...errors import ConfigError
from .common import AUDIO_EXTS, read_csv
from .writer import DatasetWriter

TASK = "clotho_aqa"

SPLIT_FILES = {"train": "clotho_aqa_train.csv", "val": "clotho_aqa_val.csv", "test": "clotho_aqa_test.csv"}
COLUMNS = ("file_name", "QuestionText", "answer", "confidence")
AUDIO_DIR = "audio_files"
CONFIDENCE = ("yes", "all")


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _audio_path(folder: Path, file_name: str) -> Path:
    path = folder / file_name
    if path.is_file() or Path(file_name).suffix.lower() in AUDIO_EXTS:
        return path
    for ext in AUDIO_EXTS:
        if (folder / (file_name + ext)).is_file():
            return folder / (file_name + ext)
    return path


def majority(answers: list[str]) -> tuple[str, list[str]]:
    """(most frequent answer, ties to the first in order; distinct answers in order), case-insensitive."""
    first: dict[str, str] = {}
    counts: Counter = Counter()
    for answer in answers:
        key = _collapse(answer).lower()
        if not key:
            continue
        first.setdefault(key, _collapse(answer))
        counts[key] += 1
    if not counts:
        return "", []
    best = max(first, key=lambda k: counts[k])  # max keeps the first of equal counts; `first` is in order
    return first[best], list(first.values())


def convert(root: Path, writer: DatasetWriter, confidence: str = "yes", **options) -> None:
    if options:
        raise ConfigError(f"clotho_aqa: unknown option(s) {', '.join(sorted(options))} "
                          f"(valid: confidence={'|'.join(CONFIDENCE)})")
    mode = str(confidence).strip().lower()
    if mode not in CONFIDENCE:
        raise ConfigError(f"clotho_aqa option confidence={confidence!r}: expected {' or '.join(CONFIDENCE)}")
    root = Path(root)
    tables = {split: read_csv(root / name, COLUMNS, "Clotho-AQA") for split, name in SPLIT_FILES.items()}
    folder = root / AUDIO_DIR
    per_file: dict[str, int] = {}  # file_name -> questions numbered so far, over the splits (ids stay unique)
    for split, rows in tables.items():
        # (file_name, question key) -> {"id", "question": first spelling, "answers": [(answer, confidence)]}
        questions: dict[tuple[str, str], dict] = {}
        for _, row in rows:
            file_name = row["file_name"].strip()
            question = row["QuestionText"].strip()
            key = (file_name, _collapse(question))
            if key not in questions:
                k = per_file.get(file_name, 0)
                per_file[file_name] = k + 1
                questions[key] = {"id": f"{file_name}#{k}", "question": question, "answers": []}
            questions[key]["answers"].append((row["answer"], row["confidence"].strip().lower()))
        for (file_name, _), q in questions.items():
            sample = q["id"]
            kept = [a for a, c in q["answers"] if mode == "all" or c == "yes"]
            if not kept:
                given = ", ".join(c or "(empty)" for _, c in q["answers"])
                writer.skip(split, sample, f"no answer with confidence yes ({len(q['answers'])} answer(s), "
                                           f"confidence {given}; --option confidence=all keeps them)")
                continue
            target, references = majority(kept)
            if not file_name:
                writer.skip(split, sample, "empty file_name")
                continue
            writer.add(split, sample, _audio_path(folder, file_name), target, references, instruction=q["question"])
