"""Classification metrics for `evaluate`, loadable offline: `evaluate.load("metrics/classification")`.

One module computes what every task reports: accuracy and macro F1 over the classes, and then
- for a binary task, precision, recall and F1 of one `pos_label` class (the class of interest, e.g. `question`);
- for a task of more classes (`num_labels` > 2, or more than two classes seen), macro precision and recall and
  every class's precision, recall and F1, keyed by class id (`f1_3`) or by `label_names` when given (`f1_NUM`).
The arithmetic is scikit-learn's, as in evaluate's own `accuracy`, `f1`, `precision` and `recall` Hub modules.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

_DESCRIPTION = "Accuracy and macro F1; binary: precision/recall/F1 of the positive class; multi-class: per class."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): gold class ids.
    pos_label (`int`, defaults to 1): the class whose precision, recall and F1 a binary task reports.
    num_labels (`int`, *optional*): the task's number of classes; default: the classes seen.
    label_names (`list[str]`, *optional*): class names, in id order, for the per-class keys of a multi-class task.
Returns:
    accuracy, f1 (macro over the classes seen); binary: precision, recall, f1_pos (of pos_label); multi-class:
    precision_macro, recall_macro, and precision_<c>, recall_<c>, f1_<c> for every class c.
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

    def _compute(self, predictions, references, pos_label=1, num_labels=None, label_names=None):
        seen = sorted(set(references) | set(predictions))
        out = {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1_score(references, predictions, labels=seen, average="macro", zero_division=0)),
        }
        if label_names is not None and num_labels is None:
            num_labels = len(label_names)
        if (num_labels or 0) <= 2 and len(seen) <= 2:
            precision, recall, f1_pos, _ = precision_recall_fscore_support(
                references, predictions, labels=[pos_label], average=None, zero_division=0
            )
            return {**out, "precision": float(precision[0]), "recall": float(recall[0]), "f1_pos": float(f1_pos[0])}
        classes = list(range(max(num_labels or 0, max(seen) + 1)))
        names = list(label_names) if label_names is not None else [str(c) for c in classes]
        if len(names) != len(classes):
            raise ValueError(f"label_names has {len(names)} names for {len(classes)} classes {classes}.")
        precision, recall, f1, _ = precision_recall_fscore_support(
            references, predictions, labels=classes, average=None, zero_division=0
        )
        # Macro precision/recall over the classes seen, like the macro F1 above.
        out["precision_macro"] = float(sum(precision[c] for c in seen) / len(seen))
        out["recall_macro"] = float(sum(recall[c] for c in seen) / len(seen))
        for c, name in zip(classes, names):
            out[f"precision_{name}"] = float(precision[c])
            out[f"recall_{name}"] = float(recall[c])
            out[f"f1_{name}"] = float(f1[c])
        return out
