"""OK-VQA (image question answering, task ``okvqa``, scored with VQA accuracy over the ten answers).

Expected layout under ``--root`` (the OK-VQA questions and annotations, v1.1 or v1.0, and the COCO 2014
images)::

    OpenEnded_mscoco_train2014_questions.json   {"questions": [{"image_id": 51606, "question_id": 516065,
                                                                "question": "What is the hairstyle ...?"}, ...]}
    mscoco_train2014_annotations.json           {"annotations": [{"question_id": 516065,
                                                                  "answers": [{"answer": "pony tail", ...},
                                                                              ... ten of them]}, ...]}
    OpenEnded_mscoco_val2014_questions.json     the same for the COCO val2014 images
    mscoco_val2014_annotations.json
    train2014/COCO_train2014_000000051606.jpg   COCO images, "COCO_<subset>_%012d.jpg" % image_id; also
    val2014/COCO_val2014_000000000042.jpg       accepted directly under --root (or under ``images=DIR``)

All four json files are required.

Splits, as in the reference: test = the val2014 questions; val = a deterministic share of the train2014
questions, those with ``int(sha1(str(question_id)).hexdigest(), 16) / 16**40 < val_fraction`` (default 0.1,
about 900 of the 9,009 training questions); train = the other train2014 questions.

Rows: one per question, id = the question id, instruction = the question, target = the most frequent of
its answers (``answers[].answer``; ties: the first in annotation order), references = all of its answers
WITH duplicates (VQA accuracy counts how many annotators gave the prediction). Questions without an
annotation or without answers, empty questions, annotations without a question and missing images are
reported as skipped.

Options (``--option KEY=VALUE``):

    val_fraction=F   share of the train2014 questions drawn for val, in [0, 1) (default 0.1)
    images=DIR       folder holding train2014/ and val2014/ (or the images themselves), relative to --root
                     or absolute; default --root
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...errors import DataError
from .common import check_options, fraction, option_folder, read_json, unit
from .writer import DatasetWriter

TASK = "okvqa"

QUESTIONS = "OpenEnded_mscoco_{subset}_questions.json"
ANNOTATIONS = "mscoco_{subset}_annotations.json"
IMAGE = "COCO_{subset}_{image_id:012d}.jpg"
#: COCO subset -> the split it feeds (train2014 is divided into train and val)
SUBSETS = {"train2014": "train", "val2014": "test"}
OPTIONS = ("val_fraction", "images")
DEFAULT_VAL_FRACTION = 0.1


def _read_list(path: Path, key: str, fields: tuple[str, ...], expected: str) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: not found (expected {expected})")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected a list under '{key}' ({expected})")
    for i, item in enumerate(data[key]):
        missing = [f for f in fields if not isinstance(item, dict) or f not in item]
        if missing:
            raise DataError(f"{path}: {key}[{i}]: missing {', '.join(missing)} (expected {expected})")
    return data[key]


def _answers(path: Path, annotation: dict) -> list[str]:
    answers = annotation["answers"]
    if not isinstance(answers, list):
        raise DataError(f"{path}: question_id {annotation['question_id']}: 'answers' must be a list")
    out = []
    for answer in answers:
        if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
            raise DataError(f"{path}: question_id {annotation['question_id']}: each of 'answers' must be an "
                            f"object with a string 'answer', got {answer!r}")
        out.append(answer["answer"].strip())
    return [a for a in out if a]


def _most_frequent(answers: list[str]) -> str:
    counts = Counter(answers)
    return max(answers, key=counts.__getitem__)  # max keeps the first of equal counts: annotation order


def convert(root: Path, writer: DatasetWriter, **options) -> None:
    check_options(TASK, options, OPTIONS)
    val_fraction = fraction(TASK, options, "val_fraction", DEFAULT_VAL_FRACTION)
    image_root = option_folder(root, TASK, "images", options["images"]) if "images" in options else root

    # read (and check) all four files before writing anything
    subsets = {}
    for subset in SUBSETS:
        q_path, a_path = root / QUESTIONS.format(subset=subset), root / ANNOTATIONS.format(subset=subset)
        questions = _read_list(q_path, "questions", ("image_id", "question", "question_id"),
                               f"the OK-VQA {subset} questions: questions[].image_id/question/question_id")
        annotations = _read_list(a_path, "annotations", ("question_id", "answers"),
                                 f"the OK-VQA {subset} annotations: annotations[].question_id/answers[].answer")
        subsets[subset] = (q_path, questions, a_path, annotations)

    for subset, (q_path, questions, a_path, annotations) in subsets.items():
        by_question: dict[str, dict] = {}
        for annotation in annotations:
            qid = str(annotation["question_id"])
            if qid in by_question:
                writer.skip(SUBSETS[subset], qid, f"duplicate annotation in {a_path.name} (the first is used)")
            else:
                by_question[qid] = annotation
        asked = set()
        for question in questions:
            qid = str(question["question_id"])
            split = SUBSETS[subset]
            if split == "train" and unit(qid) < val_fraction:
                split = "val"
            asked.add(qid)
            if qid not in by_question:
                writer.skip(split, qid, f"no annotation in {a_path.name}")
                continue
            answers = _answers(a_path, by_question[qid])
            if not answers:
                writer.skip(split, qid, "no answers")
                continue
            try:
                name = IMAGE.format(subset=subset, image_id=int(question["image_id"]))
            except (TypeError, ValueError):
                raise DataError(f"{q_path}: question_id {qid}: image_id must be an integer, "
                                f"got {question['image_id']!r}") from None
            image = image_root / subset / name
            if not image.is_file() and (image_root / name).is_file():
                image = image_root / name
            text = question["question"] if isinstance(question["question"], str) else ""
            writer.add(split, qid, image, _most_frequent(answers), answers, instruction=text)
        for qid in by_question:
            if qid not in asked:
                writer.skip(SUBSETS[subset], qid, f"annotation without a question in {q_path.name}")
