"""Captioning metrics as coco-caption computes them (pycocoevalcap), on the 0-100 scale.

CIDEr (CIDEr-D), BLEU-1..4, METEOR and ROUGE-L, each multiplied by 100 (papers report CIDEr x100:
"CIDEr 55.3" is pycocoevalcap's 0.553). Captions are PTB-tokenised first (:mod:`micl.evaluation.ptb`).
METEOR needs Java: without it (or with ``use_java=False`` / ``MICL_NO_JAVA=1``) it is ``None``;
``MICL_NO_METEOR=1`` skips it while keeping the Java tokenizer.
"""

from __future__ import annotations

import atexit
import os
import threading
import warnings
from typing import Sequence

from micl.evaluation.ptb import java_available, tokenize_captions_with_backend

__all__ = ["compute_caption_metrics", "close_meteor"]

_meteor_lock = threading.Lock()
_meteor = None  # one METEOR JVM per process: it takes ~15 s to load its paraphrase table


def _get_meteor():
    global _meteor
    if _meteor is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor = Meteor()
    return _meteor


def close_meteor() -> None:
    """Stop the cached METEOR Java process (a new one starts on the next use)."""
    global _meteor
    with _meteor_lock:
        m, _meteor = _meteor, None
    if m is not None:
        try:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()
        except Exception:  # noqa: BLE001 - best effort
            pass


atexit.register(close_meteor)


def _meteor_score(gts: dict, res: dict) -> float | None:
    clean = lambda s: " ".join(s.replace("|||", " ").split())  # noqa: E731 - '|||' is the protocol separator
    gts = {k: [clean(r) for r in v] for k, v in gts.items()}
    res = {k: [clean(h) for h in v] for k, v in res.items()}
    with _meteor_lock:
        try:
            score, _ = _get_meteor().compute_score(gts, res)
            return float(score)
        except Exception as e:  # noqa: BLE001 - a dead JVM must not kill a training run
            warnings.warn(f"METEOR failed ({type(e).__name__}: {e}); reporting meteor=None")
    close_meteor()
    return None


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists, not strings")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    refs = []
    for i, r in enumerate(references):
        r = [r] if isinstance(r, str) else list(r)
        if not r:
            raise ValueError(f"sample {i} has no reference caption")
        refs.append([str(x) for x in r])
    return [str(p) for p in predictions], refs


def compute_caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    use_java: bool | None = None,
    meteor: bool = True,
) -> dict:
    """Corpus-level caption metrics (x100): ``cider``, ``bleu_1``..``bleu_4``, ``meteor``, ``rouge_l``.

    ``references[i]`` is the list of reference captions of ``predictions[i]``. ``use_java``: see
    :func:`micl.evaluation.ptb.tokenize_captions`; ``meteor=False`` (or ``MICL_NO_METEOR=1``)
    skips METEOR (``None``): its JVM takes ~15 s to start (once per process) and up to 2 GB.
    Also returns ``num_samples`` and ``tokenizer`` (``"java"`` or ``"python"``).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    predictions, references = _check_inputs(predictions, references)
    n = len(predictions)
    # Same batching as coco-caption: all references in one tokeniser call, predictions in another.
    flat_refs = [r for refs in references for r in refs]
    tok_refs, backend = tokenize_captions_with_backend(flat_refs, use_java)
    tok_preds, backend_p = tokenize_captions_with_backend(predictions, use_java)
    gts, res, k = {}, {}, 0
    for i, refs in enumerate(references):
        gts[i] = tok_refs[k:k + len(refs)]
        k += len(refs)
        res[i] = [tok_preds[i]]

    if n == 1:
        warnings.warn("CIDEr takes its IDF weights from the corpus: with a single sample it is always 0")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    if os.environ.get("MICL_NO_METEOR", "").strip().lower() not in ("", "0", "false", "no"):
        meteor = False
    met = _meteor_score(gts, res) if meteor and java_available(use_java) else None
    return {
        "cider": 100.0 * float(cider),
        "bleu_1": 100.0 * float(bleu[0]),
        "bleu_2": 100.0 * float(bleu[1]),
        "bleu_3": 100.0 * float(bleu[2]),
        "bleu_4": 100.0 * float(bleu[3]),
        "meteor": None if met is None else 100.0 * met,
        "rouge_l": 100.0 * float(rouge),
        "num_samples": n,
        "tokenizer": backend if backend == backend_p else f"{backend}+{backend_p}",
    }
