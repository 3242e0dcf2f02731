"""`evaluate` module: exact match after VQA answer normalisation, in percent.

Load with ``evaluate.load("<path to this folder>")``. The computation lives in
:mod:`micl.evaluation.vqa`; ``micl`` must be importable.
"""

import datasets
import evaluate

from micl.evaluation.vqa import exact_match

_DESCRIPTION = """\
Exact match: 100 if the prediction equals any reference after the official VQA answer
normalisation (punctuation, lower case, number words to digits, articles, contractions), else 0;
averaged over samples. Reported in percent.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted answers (str).
    references: list of reference answers, one str or a list of str per prediction.
Returns:
    dict with exact_match (0-100) and num_samples.
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
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
        )

    def _compute(self, predictions, references):
        return {"exact_match": exact_match(predictions, references), "num_samples": len(predictions)}
