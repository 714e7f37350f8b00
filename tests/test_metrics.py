"""metrics/classification: the local evaluate metric every eval set reports (binary and multi-class)."""

from __future__ import annotations

import pytest

from outputs import classification_metric, split_eval_metrics


def test_binary_task_metrics_are_accuracy_macro_f1_and_the_positive_class():
    # refs 1 1 1 0 0 0, preds 1 1 0 1 0 0: positive class tp=2 fp=1 fn=1 -> P = R = F1 = 2/3; class 0 likewise.
    result = classification_metric().compute(predictions=[1, 1, 0, 1, 0, 0], references=[1, 1, 1, 0, 0, 0])
    assert set(result) == {"accuracy", "f1", "precision", "recall", "f1_pos"}
    assert result == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3, "precision": 2 / 3, "recall": 2 / 3, "f1_pos": 2 / 3})
    same = classification_metric().compute(predictions=[1, 1, 0, 1, 0, 0], references=[1, 1, 1, 0, 0, 0], num_labels=2)
    assert same == result
    # pos_label 0 of an unbalanced case: tp=1 fp=0 fn=1 -> P 1, R 1/2, F1 2/3.
    other = classification_metric().compute(predictions=[1, 1, 1, 0], references=[1, 1, 0, 0], pos_label=0)
    assert (other["precision"], other["recall"], other["f1_pos"]) == pytest.approx((1.0, 0.5, 2 / 3))


def test_three_class_task_gets_macro_and_per_class_metrics():
    # Hand count: class 0 tp=1 predicted 2 true 2 -> P 1/2 R 1/2 F1 1/2; class 1 tp=2 predicted 3 true 2 -> P 2/3
    # R 1 F1 4/5; class 2 tp=1 predicted 1 true 2 -> P 1 R 1/2 F1 2/3.
    result = classification_metric().compute(
        predictions=[0, 1, 1, 1, 2, 0], references=[0, 0, 1, 1, 2, 2], num_labels=3
    )
    expected = {
        "accuracy": 4 / 6,
        "f1": (1 / 2 + 4 / 5 + 2 / 3) / 3,
        "precision_macro": (1 / 2 + 2 / 3 + 1) / 3,
        "recall_macro": (1 / 2 + 1 + 1 / 2) / 3,
        "precision_0": 1 / 2, "recall_0": 1 / 2, "f1_0": 1 / 2,
        "precision_1": 2 / 3, "recall_1": 1.0, "f1_1": 4 / 5,
        "precision_2": 1.0, "recall_2": 1 / 2, "f1_2": 2 / 3,
    }  # fmt: skip
    assert result == pytest.approx(expected)
    named = classification_metric().compute(
        predictions=[0, 1, 1, 1, 2, 0], references=[0, 0, 1, 1, 2, 2], label_names=["DESC", "HUM", "NUM"]
    )
    assert named["f1_HUM"] == pytest.approx(4 / 5) and "f1_1" not in named


def test_a_class_missing_from_a_small_eval_set_still_has_its_keys():
    result = classification_metric().compute(predictions=[0, 1, 0], references=[0, 1, 1], num_labels=4)
    assert {f"{m}_{c}" for m in ("precision", "recall", "f1") for c in range(4)} <= set(result)
    assert result["f1_3"] == 0.0 and "f1_pos" not in result


def test_per_class_metrics_reach_metrics_json_layout():
    flat = {"eval_topic_f1": 0.5, "eval_topic_f1_2": 0.25, "eval_topic_precision_macro": 0.4, "eval_topic_x_f1_0": 1}
    assert split_eval_metrics(flat, ["topic", "topic_x"]) == {
        "topic": {"f1": 0.5, "f1_2": 0.25, "precision_macro": 0.4},
        "topic_x": {"f1_0": 1},
    }
