"""VQA answer normalisation, VQA accuracy and exact match (scores in percent).

The normalisation follows the rules of the official VQA evaluation script (Antol et al. 2015,
``vqaEval.py``): punctuation handling, lower-casing, number words to digits ("two" -> "2"),
articles removed, missing apostrophes of contractions restored ("dont" -> "don't").

Differences from the official script, on purpose (see docs/metrics.md): the full normalisation is
applied to the prediction *and* to every reference, always (the official script relies on VQA
annotations being pre-normalised and skips the prediction's normalisation when all references
agree); with fewer than 4 references the consensus threshold is ``min(3, n - 1)``.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = [
    "normalize_answer",
    "vqa_accuracy_single",
    "exact_match_single",
    "vqa_accuracy",
    "exact_match",
]

# Characters the official script deletes (or turns into spaces); "." and "'" are handled apart.
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its period)

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(["a", "an", "the"])

# Contractions whose apostrophes annotators often drop. Every spelling with one or more
# apostrophes missing maps back to the canonical form, except spellings that are ordinary
# words ("well", "were", "ill", "its", "hell", "shell", "id", "wed").
_CANONICAL_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's
ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't
she'd she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't
we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd
who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all
y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
_NOT_CONTRACTIONS = frozenset(["well", "were", "ill", "its", "hell", "shell", "id", "wed"])


def _build_contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for canon in _CANONICAL_CONTRACTIONS:
        parts = canon.split("'")
        n_apos = len(parts) - 1
        for mask in range(2 ** n_apos - 1):  # every subset of apostrophes kept, except "all kept"
            out = parts[0]
            for i in range(n_apos):
                out += ("'" if mask >> i & 1 else "") + parts[i + 1]
            if out not in _NOT_CONTRACTIONS:
                table.setdefault(out, canon)
    return table


_CONTRACTIONS = _build_contractions()


def _process_punctuation(text: str) -> str:
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        # as in the official script: a mark next to a space (or any text with "1,000"-style
        # numbers) is deleted, otherwise it becomes a space ("black/white" -> "black white")
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Official VQA answer normalisation: ``"Two dogs."`` -> ``"2 dogs"``."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def _as_list(refs) -> list[str]:
    if isinstance(refs, str):
        return [refs]
    refs = [str(r) for r in refs]
    if not refs:
        raise ValueError("a sample has no reference answer")
    return refs


def vqa_accuracy_single(prediction: str, references: Sequence[str] | str) -> float:
    """VQA accuracy of one answer, in [0, 1].

    For each reference i: ``min(1, (#other references equal to the prediction) / k)``, averaged
    over i (the official leave-one-out average over the 10 subsets of 9 annotators), with
    ``k = min(3, n - 1)`` for ``n`` references (k = 3 for VQA's 10). One reference: exact match.
    """
    refs = [normalize_answer(r) for r in _as_list(references)]
    pred = normalize_answer(prediction)
    n = len(refs)
    if n == 1:
        return float(pred == refs[0])
    k = min(3, n - 1)
    hits = sum(r == pred for r in refs)
    # leaving out a matching reference leaves hits-1 matches, a non-matching one leaves hits
    total = hits * min(1.0, (hits - 1) / k) + (n - hits) * min(1.0, hits / k)
    return total / n


def exact_match_single(prediction: str, references: Sequence[str] | str) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _as_list(references)))


def _check(predictions, references):
    if isinstance(predictions, str):
        raise TypeError("predictions must be a list of strings, not a string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
    """Mean VQA accuracy in percent (0-100)."""
    _check(predictions, references)
    return 100.0 * sum(map(vqa_accuracy_single, predictions, references)) / len(predictions)


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
    """Exact match after VQA normalisation, in percent (0-100)."""
    _check(predictions, references)
    return 100.0 * sum(map(exact_match_single, predictions, references)) / len(predictions)
