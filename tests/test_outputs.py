"""outputs.py: metrics per eval set and the per-epoch table, kept apart when one set's name extends another's."""

from __future__ import annotations

from outputs import epoch_table, split_eval_metrics


def test_eval_sets_sharing_a_prefix_stay_apart():
    """'question' is a prefix of 'question_gold': its metrics must not absorb the gold set's keys."""
    flat = {"eval_question_accuracy": 0.5, "eval_question_gold_accuracy": 0.9, "eval_question_gold_noqm_f1": 0.7,
            "eval_question_runtime": 1.0, "epoch": 1.0}  # fmt: skip
    split = split_eval_metrics(flat, ["question", "question_gold", "question_gold_noqm"])
    assert split == {"question": {"accuracy": 0.5}, "question_gold": {"accuracy": 0.9}, "question_gold_noqm": {"f1": 0.7}}


def test_eval_set_names_that_extend_another_do_not_leak_into_it():
    # 'question' is a prefix of 'question_gold': each set keeps only its own metrics, or plot_curves would meet
    # a 'question' row holding only 'gold_*' keys.
    names = ["question", "question_gold", "question_gold_noqm"]
    logs = [
        {"eval_question_loss": 0.1, "eval_question_accuracy": 0.9, "epoch": 1.0},
        {"eval_question_gold_loss": 0.5, "eval_question_gold_accuracy": 0.8, "epoch": 1.0},
        {"eval_question_gold_noqm_loss": 0.7, "eval_question_gold_noqm_accuracy": 0.7, "epoch": 1.0},
    ]
    row = epoch_table(logs, names, ["question"])[0]
    assert row["eval"] == {
        "question": {"loss": 0.1, "accuracy": 0.9},
        "question_gold": {"loss": 0.5, "accuracy": 0.8},
        "question_gold_noqm": {"loss": 0.7, "accuracy": 0.7},
    }
    flat = {k: v for entry in logs for k, v in entry.items()}
    assert split_eval_metrics(flat, names)["question"] == {"loss": 0.1, "accuracy": 0.9}
