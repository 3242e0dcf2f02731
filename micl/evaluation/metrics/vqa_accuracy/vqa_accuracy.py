"""`evaluate` module: VQA accuracy (official answer normalisation, leave-one-out), in percent.

Load with ``evaluate.load("<path to this folder>")``. The computation lives in
:mod:`micl.evaluation.vqa`; ``micl`` must be importable.
"""

import datasets
import evaluate

from micl.evaluation.vqa import exact_match, vqa_accuracy

_DESCRIPTION = """\
VQA accuracy (Antol et al. 2015): for each of the n reference answers, min(1, matches among the
other n-1 / 3), averaged; answers normalised with the official VQA rules (punctuation, number
words to digits, articles, contractions). With n < 4 references the threshold is min(3, n-1);
with one reference it is exact match. Reported in percent.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted answers (str).
    references: list of lists of reference answers (10 human answers for VQA v2 / OK-VQA).
Returns:
    dict with vqa_accuracy (0-100), exact_match (0-100) and num_samples.
"""

_CITATION = """\
@inproceedings{antol2015vqa, title={VQA: Visual Question Answering}, author={Antol, Stanislaw and
  Agrawal, Aishwarya and Lu, Jiasen and others}, booktitle={ICCV}, year={2015}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
            reference_urls=["https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions, references):
        return {
            "vqa_accuracy": vqa_accuracy(predictions, references),
            "exact_match": exact_match(predictions, references),
            "num_samples": len(predictions),
        }
