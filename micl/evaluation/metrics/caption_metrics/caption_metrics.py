"""`evaluate` module: coco-caption metrics (CIDEr, BLEU-1..4, METEOR, ROUGE-L), x100.

Load with ``evaluate.load("<path to this folder>")`` (works offline). The computation lives in
:mod:`micl.evaluation.caption`; ``micl`` must be importable.
"""

import datasets
import evaluate

from micl.evaluation.caption import compute_caption_metrics

_DESCRIPTION = """\
coco-caption metrics via pycocoevalcap after PTB tokenisation: CIDEr (CIDEr-D), BLEU-1..4,
METEOR and ROUGE-L, all multiplied by 100 (CIDEr 55.3 = pycocoevalcap 0.553). METEOR needs Java
and is None without it. CIDEr is corpus-level: its IDF weights come from the references scored
together, so score a whole evaluation set in one call.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated captions (str).
    references: list of lists of reference captions (one list per prediction).
    use_java: None (auto: Java if on PATH and MICL_NO_JAVA unset), True or False. Without Java the
        pure-Python PTB tokenizer is used and METEOR is None.
    meteor: compute METEOR (default True; its JVM takes ~15 s to start, once per process).
Returns:
    dict with cider, bleu_1, bleu_2, bleu_3, bleu_4, meteor, rouge_l (0-100 scale, CIDEr can exceed
    100), num_samples, tokenizer ("java" or "python").
Examples:
    >>> m = evaluate.load("micl/evaluation/metrics/caption_metrics")
    >>> m.compute(predictions=["a dog runs"], references=[["a dog is running", "a dog runs"]])["bleu_1"]
"""

_CITATION = """\
@inproceedings{vedantam2015cider, title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi}, booktitle={CVPR}, year={2015}}
@article{chen2015microsoft, title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and others}, journal={arXiv:1504.00325}, year={2015}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/tylin/coco-caption"],
        )

    def _compute(self, predictions, references, use_java=None, meteor=True):
        return compute_caption_metrics(predictions, references, use_java=use_java, meteor=meteor)
