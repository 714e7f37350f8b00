"""Classification metrics for `evaluate`, loadable offline: `evaluate.load("metrics/classification")`.

One module computes what every task reports: accuracy, macro F1 over the classes, and precision, recall and
F1 of one `pos_label` class (for binary tasks the class of interest, e.g. `question`). The arithmetic is
scikit-learn's, as in evaluate's own `accuracy`, `f1`, `precision` and `recall` Hub modules.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

_DESCRIPTION = "Accuracy, macro F1, and precision/recall/F1 of the positive class."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): gold class ids.
    pos_label (`int`, defaults to 1): the class whose precision, recall and F1 are reported.
Returns:
    accuracy, f1 (macro), precision, recall, f1_pos (of pos_label).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, pos_label=1):
        labels = sorted(set(references) | set(predictions))
        precision, recall, f1_pos, _ = precision_recall_fscore_support(
            references, predictions, labels=[pos_label], average=None, zero_division=0
        )
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0)),
            "precision": float(precision[0]),
            "recall": float(recall[0]),
            "f1_pos": float(f1_pos[0]),
        }
