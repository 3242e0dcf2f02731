"""Task metrics: caption metrics against pycocoevalcap, VQA accuracy / exact match by hand."""

import itertools
import shutil

import pytest

from micl.errors import ConfigError, DataError
from micl.evaluation import caption, scoring
from micl.evaluation.vqa import (
    exact_match,
    exact_match_single,
    normalize_answer,
    vqa_accuracy,
    vqa_accuracy_single,
)

HAS_JAVA = shutil.which("java") is not None

PREDS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play with a frisbee in the park!",
    "a cat sleeping on a laptop",
    "A red double-decker bus drives down the street.",
    "The woman's hat is red, and her dress is blue.",
    "people standing",
]
REFS = [
    ["A surfer rides a large wave.", "A man on a surfboard riding a wave.", "Someone surfing in the ocean."],
    ["Two dogs playing frisbee on the grass.", "A pair of dogs chase a frisbee in a park.", "dogs, frisbee & grass"],
    ["A cat is asleep on a laptop keyboard.", "A kitten sleeping on a computer."],
    ["A red bus on a city street.", "A double-decker bus driving down a road.", "A London bus (red) in traffic."],
    ["A woman in a blue dress and a red hat.", "A lady wearing a red hat.", "The woman's dress is blue."],
    ["A crowd of people stands in a square.", "Many people standing around."],
]


def _pycoco_reference(preds, refs, use_java_tokenizer):
    """The coco-caption pipeline called directly: PTBTokenizer (or our fallback) + the scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if use_java_tokenizer:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(refs)})
        res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    else:
        from micl.evaluation.ptb import tokenize_captions

        flat = tokenize_captions([c for r in refs for c in r], use_java=False)
        it = iter(flat)
        gts = {i: [next(it) for _ in r] for i, r in enumerate(refs)}
        res = {i: [t] for i, t in enumerate(tokenize_captions(preds, use_java=False))}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"bleu_1": bleu[0], "bleu_4": bleu[3], "cider": cider, "rouge_l": rouge}


@pytest.mark.parametrize("use_java", [pytest.param(True, marks=pytest.mark.skipif(not HAS_JAVA, reason="no java")), False])
def test_caption_metrics_match_pycocoevalcap(use_java):
    ours = caption.compute_caption_metrics(PREDS, REFS, use_java=use_java, meteor=False)
    ref = _pycoco_reference(PREDS, REFS, use_java_tokenizer=use_java)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(100.0 * value, abs=1e-9), key
    assert ours["tokenizer"] == ("java" if use_java else "python")
    assert ours["meteor"] is None and ours["num_samples"] == len(PREDS)
    assert 0 < ours["bleu_4"] <= 100 and ours["cider"] > 0


def test_caption_metrics_identity_and_scale():
    refs = [[p] for p in PREDS]
    m = caption.compute_caption_metrics(PREDS, refs, use_java=False, meteor=False)
    assert m["bleu_4"] == pytest.approx(100.0, abs=1e-4)
    assert m["rouge_l"] == pytest.approx(100.0)
    assert m["cider"] > 100  # CIDEr-D x100 of identical captions is ~1000 (x10 inside pycocoevalcap)


def test_caption_metrics_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        caption.compute_caption_metrics(["a", "b"], [["a"]], use_java=False, meteor=False)
    with pytest.raises(ValueError, match="no reference"):
        caption.compute_caption_metrics(["a"], [[]], use_java=False, meteor=False)


def test_meteor_none_without_java(monkeypatch):
    monkeypatch.setenv("MICL_NO_JAVA", "1")
    m = caption.compute_caption_metrics(PREDS, REFS)
    assert m["meteor"] is None and m["tokenizer"] == "python"
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no java at all
    monkeypatch.delenv("MICL_NO_JAVA")
    m = caption.compute_caption_metrics(PREDS, REFS)
    assert m["meteor"] is None and m["tokenizer"] == "python"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAVA, reason="no java")
def test_meteor_matches_pycocoevalcap():  # ~15-20 s: the METEOR JVM loads its paraphrase table
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = caption.compute_caption_metrics(PREDS, REFS, use_java=True)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(REFS)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(PREDS)})
    score, _ = Meteor().compute_score(gts, res)
    assert ours["meteor"] == pytest.approx(100.0 * score, abs=1e-9)


# ------------------------------------------------------------------------------------------
# VQA
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two dogs.", "2 dogs"),
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("None", "0"),
        ("ten.", "10"),
        ("Yes!", "yes"),
        ("dont know", "don't know"),
        ("isnt", "isn't"),
        ("black/white", "black white"),       # mark between words -> space
        ("red, white", "red white"),          # mark next to a space -> deleted
        ("1,000 people", "1000 people"),      # "1,000"-style number -> all marks deleted
        ("3.5", "3.5"),                       # a period before a digit stays
        ("  Tennis\n", "tennis"),
        ("well", "well"),                     # ordinary words are not "contractions"
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def _brute_force_vqa(pred, refs):
    """The official formula written naively: leave-one-out over the annotators."""
    p = normalize_answer(pred)
    rs = [normalize_answer(r) for r in refs]
    accs = [min(1.0, sum(r == p for k, r in enumerate(rs) if k != i) / 3) for i in range(len(rs))]
    return sum(accs) / len(accs)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(matches, expected):
    # m matching answers out of 10: (m * min(1,(m-1)/3) + (10-m) * min(1,m/3)) / 10
    refs = ["two"] * matches + ["three"] * (10 - matches)
    assert vqa_accuracy_single("2", refs) == pytest.approx(expected)
    assert vqa_accuracy_single("2", refs) == pytest.approx(_brute_force_vqa("2", refs))


def test_vqa_accuracy_matches_brute_force_on_mixed_answers():
    answers = ["yes", "no", "Yes.", "2", "two", "the dog", "dog", "a dog!", "cat"]
    for combo in itertools.islice(itertools.combinations_with_replacement(answers, 10), 0, 4000, 37):
        for pred in ("yes", "2", "dog", "bird"):
            assert vqa_accuracy_single(pred, list(combo)) == pytest.approx(_brute_force_vqa(pred, combo))


def test_vqa_accuracy_few_references_and_corpus():
    assert vqa_accuracy_single("Two", ["2"]) == 1.0            # one reference: exact match
    assert vqa_accuracy_single("yes", ["yes", "yes"]) == 1.0   # threshold min(3, n-1) = 1
    assert vqa_accuracy_single("yes", ["yes", "yes", "no"]) == pytest.approx(2 / 3)
    preds = ["Two dogs.", "no"]
    refs = [["2 dogs"] * 2 + ["dogs"] * 8, ["yes"] * 10]
    assert vqa_accuracy(preds, refs) == pytest.approx(100.0 * (0.6 + 0.0) / 2)


def test_exact_match():
    assert exact_match_single("Two dogs.", ["2 dogs"]) == 1.0
    assert exact_match_single("The Cat", "cat") == 1.0
    assert exact_match_single("cat", ["dog", "bird"]) == 0.0
    assert exact_match(["yes", "no", "Three!", "dog"], [["Yes"], "yes", ["3", "4"], ["a cat"]]) == 50.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])


# ------------------------------------------------------------------------------------------
# evaluate modules and score_task
# ------------------------------------------------------------------------------------------

def test_evaluate_modules_load_from_local_paths():
    import evaluate

    m = evaluate.load(str(scoring.metric_path("vqa_accuracy").parent))
    out = m.compute(predictions=["Two dogs.", "no"], references=[["2 dogs"] * 10, ["yes"] * 10])
    assert out["vqa_accuracy"] == pytest.approx(50.0) and out["exact_match"] == 50.0
    m = evaluate.load(str(scoring.metric_path("vqa_accuracy")))  # the .py file works too
    assert m.compute(predictions=["Two"], references=[["2"]])["exact_match"] == 100.0
    m = evaluate.load(str(scoring.metric_path("caption_metrics").parent))
    out = m.compute(predictions=PREDS, references=REFS, use_java=False, meteor=False)
    assert out == caption.compute_caption_metrics(PREDS, REFS, use_java=False, meteor=False)


def test_score_task():
    cap = scoring.score_task("caption", PREDS, REFS, use_java=False, meteor=False)
    assert cap["score"] == cap["cider"] and cap["metric"] == "cider"
    b4 = scoring.score_task("image_captioning", PREDS, REFS, metric="bleu_4", use_java=False, meteor=False)
    assert b4["score"] == cap["bleu_4"]
    qa = scoring.score_task("qa", ["Two", "no"], [["2"] * 10, "yes"])
    assert qa["metric"] == "vqa_accuracy" and qa["score"] == pytest.approx(50.0)
    em = scoring.score_task("audio_qa", ["Two", "no"], [["2"], ["yes"]], metric="exact_match")
    assert em["score"] == em["exact_match"] == 50.0
    assert scoring.load_metric("vqa_accuracy") is scoring.load_metric("vqa_accuracy")  # cached


def test_score_task_errors():
    with pytest.raises(ConfigError, match="task_type"):
        scoring.score_task("retrieval", ["a"], [["a"]])
    with pytest.raises(ConfigError, match="does not apply"):
        scoring.score_task("qa", ["a"], [["a"]], metric="cider")
    with pytest.raises(DataError, match="2 predictions but 1"):
        scoring.score_task("qa", ["a", "b"], [["a"]])
    with pytest.raises(DataError, match="nothing to score"):
        scoring.score_task("caption", [], [])
    with pytest.raises(ConfigError, match="unknown metric module"):
        scoring.metric_path("bleurt")
