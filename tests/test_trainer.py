"""trainer.py: `MultiTaskTrainer`'s per-task statistics on the device, its FLOP count, per-task logging, and the
loss weights it trains and logs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run_main, tiny_argv

import train
from modeling_multitask import MultiTaskOutput


def test_task_stats_count_loss_rows_and_correct_rows(make_trainer):
    trainer = make_trainer()
    # rows: sentiment, sentiment, question; sentiment predicts [1, 1], question predicts [0]
    logits = {
        "sentiment": torch.tensor([[0.0, 1.0], [0.0, 2.0], [5.0, 0.0]]),
        "question": torch.tensor([[1.0, 0.0]] * 3),
    }
    outputs = MultiTaskOutput(
        loss=torch.tensor(0.9),
        logits=logits,
        task_losses={"sentiment": torch.tensor(0.6), "question": torch.tensor(0.3)},
    )
    inputs = {"task_ids": torch.tensor([0, 0, 1]), "labels": torch.tensor([1, 0, 0])}
    trainer._accumulate(outputs, inputs)
    trainer._accumulate(outputs, inputs)
    logs = trainer.pop_task_stats("interval", "train")
    assert logs == pytest.approx(
        {
            "train_sentiment_loss": 0.6,
            "train_sentiment_accuracy": 0.5,
            "train_question_loss": 0.3,
            "train_question_accuracy": 1.0,
        }
    )
    assert trainer.task_stats["interval"].abs().sum() == 0  # popped
    assert trainer.task_stats["epoch"][:, 1].tolist() == [4, 2]  # rows per task over the epoch so far


def test_floating_point_ops_counts_like_the_stock_trainer(make_trainer):
    from transformers import Trainer

    trainer = make_trainer()
    inputs = {"input_ids": torch.ones(8, 13, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, inputs)  # walks the modules every call
    assert expected == 6 * 8 * 13 * trainer.model.num_parameters(exclude_embeddings=True) > 0
    assert trainer.floating_point_ops(inputs) == expected
    assert trainer.floating_point_ops({"input_ids": torch.ones(4, 13, dtype=torch.long)}) == expected // 2
    trainer.train()
    assert trainer.state.total_flos > 0


def test_training_logs_per_task_metrics_and_stock_filter_is_off(make_trainer):
    trainer = make_trainer()
    assert trainer.args.logging_nan_inf_filter is False
    trainer.train()
    logged = [e for e in trainer.state.log_history if "train_sentiment_accuracy" in e]
    assert [e["step"] for e in logged] == [4, 8]
    for entry in logged:
        for task in ("sentiment", "question"):
            assert 0.0 <= entry[f"train_{task}_accuracy"] <= 1.0
            assert math.isfinite(entry[f"train_{task}_loss"]) and entry[f"train_{task}_loss"] > 0


def test_uncertainty_weights_train_and_are_logged(monkeypatch, tmp_path, tiny_encoder_dir, tiny_data_dir):
    flags = ["--max_steps", "6", "--loss_weighting", "uncertainty", "--weight_decay", "0.1"]
    trainer, metrics = run_main(monkeypatch, tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "run", *flags))
    model = trainer.accelerator.unwrap_model(trainer.model)
    log_vars = model.loss_log_vars.detach()
    assert not torch.equal(log_vars, trainer.initial_state["loss_log_vars"])  # they are trained
    expected = {name: math.exp(-float(s)) for name, s in zip(["sentiment", "question"], log_vars)}

    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 6  # logging_steps 1
    for name, weight in expected.items():
        assert logs[-1][f"loss_weight_{name}"] == pytest.approx(weight, rel=1e-6)  # the weight is exp(-s)
        assert metrics["train"]["loss_weights"][name] == pytest.approx(weight, rel=1e-6)
    assert len({e["loss_weight_sentiment"] for e in logs}) > 1  # logged as it changes, not once

    # No weight decay on the log-variances: decay would pull every weight towards 1.
    groups = [g for g in trainer.optimizer.param_groups if any(p is model.loss_log_vars for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_loss_weights_learning_rate(monkeypatch, tmp_path, tiny_encoder_dir, tiny_data_dir):
    def moved(*flags):
        argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "run", "--max_steps", "4", *flags)
        trainer, _ = run_main(monkeypatch, [*argv, "--loss_weighting", "uncertainty", "--learning_rate", "1e-4"])
        model = trainer.accelerator.unwrap_model(trainer.model)
        group = next(g for g in trainer.optimizer.param_groups if any(p is model.loss_log_vars for p in g["params"]))
        delta = (model.loss_log_vars.detach() - trainer.initial_state["loss_log_vars"]).abs().max().item()
        return group, delta

    shared, small = moved()
    own, large = moved("--loss_weights_learning_rate", "0.05")
    assert shared["initial_lr"] == pytest.approx(1e-4)
    assert own["initial_lr"] == pytest.approx(0.05) and len(own["params"]) == 1  # a group of its own
    # Adam moves a parameter by about its learning rate per step: 4 steps at 1e-4 vs at 0.05.
    assert small < 5e-4 < 0.02 < large


def test_static_weights_from_yaml_are_logged(monkeypatch, tmp_path, tiny_encoder_dir, tiny_data_dir):
    config = tmp_path / "weights.yaml"
    config.write_text("task_weights:\n  sentiment: 2.0\n  question: 0.5\n", encoding="utf-8")
    argv = [str(config), *tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "run", "--max_steps", "2")]
    trainer, metrics = run_main(monkeypatch, argv)
    assert trainer.model.config.task_weights == {"sentiment": 2.0, "question": 0.5}
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(e["loss_weight_sentiment"] == 2.0 and e["loss_weight_question"] == 0.5 for e in logs)
    assert metrics["train"]["loss_weights"] == {"sentiment": 2.0, "question": 0.5}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task_weights", "sentiment:2"], r"'sentiment:2' must look like name=weight"),
        (["--task_weights", "topic=2"], r"task_weights names unknown tasks \['topic'\]"),
        (["--task_weights", "question=-1"], r"task_weights\['question'\]=-1.0 must be a finite number >= 0"),
        (["--loss_weights_learning_rate", "0"], r"loss_weights_learning_rate must be > 0"),
    ],
)
def test_bad_weight_settings_raise(tmp_path, tiny_encoder_dir, tiny_data_dir, flags, message):
    with pytest.raises(ValueError, match=message):
        train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "run", *flags))
    assert not (tmp_path / "run").exists()  # refused before touching the output folder


def _count_eval_rows(trainer) -> list[int]:
    """The rows of every batch the trainer's evaluation runs from now on, appended to the returned list."""
    seen: list[int] = []
    original = trainer.prediction_step

    def counting_step(model, inputs, *args, **kwargs):
        seen.append(int(inputs["input_ids"].shape[0]))
        return original(model, inputs, *args, **kwargs)

    trainer.prediction_step = counting_step
    return seen


def test_evaluation_runs_each_distinct_input_once_and_scores_every_row(make_trainer):
    """A set that repeats texts (dialogue turns, a `?`-free view) is scored row by row as before, while the model
    sees each distinct input once; a repeated text with two labels counts once per label."""
    import datasets

    from outputs import build_compute_metrics

    trainer = make_trainer(per_device_eval_batch_size=3)
    trainer.compute_metrics = build_compute_metrics()
    base = trainer.eval_dataset["sentiment"].select(range(6))
    # rows 0-5, then 0, 1 and 2 again, row 2 with the other label
    repeated = datasets.concatenate_datasets([base, base.select([0, 1, 2])]).to_dict()
    repeated["labels"][8] = 1 - repeated["labels"][8]
    dataset = datasets.Dataset.from_dict(repeated)
    seen = _count_eval_rows(trainer)
    results = {}
    for dedup in (False, True):
        trainer.deduplicate_eval = dedup
        seen.clear()
        results[dedup] = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="eval_sentiment")
        assert sum(seen) == (6 if dedup else 9)
    assert trainer.compute_metrics is not None and trainer.eval_dataset["sentiment"] is not dataset  # restored
    for key, value in results[False].items():
        if not key.endswith(("runtime", "per_second")):
            assert results[True][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    # Scored against the full set's labels with each row's logits: the same as scoring the 9 rows by hand.
    logits = trainer.predict(dataset).predictions
    labels = torch.tensor(repeated["labels"])
    accuracy = (torch.as_tensor(logits).argmax(-1) == labels).float().mean().item()
    assert results[True]["eval_sentiment_accuracy"] == pytest.approx(accuracy)
    loss = torch.nn.functional.cross_entropy(torch.as_tensor(logits).float(), labels).item()
    assert results[True]["eval_sentiment_loss"] == pytest.approx(loss, rel=1e-5)

    # as train.py evaluates: every set by name through the Trainer's dict of eval sets
    trainer.eval_dataset = {**trainer.eval_dataset, "sentiment": dataset}
    seen.clear()
    by_name = trainer.evaluate()
    assert sum(seen) == 6 + len(trainer.eval_dataset["question"])
    assert by_name["eval_sentiment_accuracy"] == pytest.approx(results[False]["eval_sentiment_accuracy"])


def test_a_round_over_every_set_runs_an_input_once_per_head_and_forgets_it_when_the_weights_change(make_trainer):
    """In one evaluate() over every set, a set whose inputs an earlier set ran through the same head (the `?`-free
    view of a gold set) runs only its new inputs; the same inputs through another head run again; the metrics are
    those of evaluating each set on its own; and the next round (after a weight update) runs everything afresh."""
    import datasets

    from outputs import build_compute_metrics

    trainer = make_trainer(per_device_eval_batch_size=4)
    trainer.compute_metrics = build_compute_metrics()
    pool = trainer.eval_dataset["sentiment"]
    first = pool.select(range(8))
    overlapping = pool.select([0, 1, 2, 3, 8, 9, 10, 11]).to_dict()
    overlapping["labels"] = [1 - y for y in overlapping["labels"]]  # the same inputs, other gold labels
    covered = pool.select([5, 6, 7])  # every input ran already: one row still runs (the loop needs a batch)
    trainer.eval_dataset = {
        "sentiment": first,
        "overlapping": datasets.Dataset.from_dict(overlapping),
        "covered": covered,
        "other_head": first,
    }
    trainer.eval_tasks.update(overlapping="sentiment", covered="sentiment", other_head="question")
    seen = _count_eval_rows(trainer)

    def metrics_and_rows(share: bool) -> tuple[dict, int]:
        trainer.share_eval_logits = share
        seen.clear()
        metrics = trainer.evaluate()
        assert trainer._eval_logits is None  # the cache lives for one round only
        return {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second"))}, sum(seen)

    shared, rows = metrics_and_rows(True)
    assert rows == 8 + 4 + 1 + 8
    alone, rows_alone = metrics_and_rows(False)
    assert rows_alone == 8 + 8 + 3 + 8
    assert set(shared) == set(alone)
    for key, value in alone.items():
        assert shared[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the overlapping set is scored against its own labels, not the first set's
    assert shared["eval_overlapping_accuracy"] != pytest.approx(shared["eval_sentiment_accuracy"])

    with torch.no_grad():  # a weight update between two rounds
        for parameter in trainer.model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    after, rows_after = metrics_and_rows(True)
    assert rows_after == 8 + 4 + 1 + 8
    assert after["eval_sentiment_loss"] != pytest.approx(shared["eval_sentiment_loss"])
    after_alone, _ = metrics_and_rows(False)
    for key, value in after_alone.items():
        assert after[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_length_sorted_evaluation_equals_unsorted_and_pads_less(make_trainer):
    """evaluate() reads each set longest row first (as MultiTaskModel.predict does): the same metrics as the
    dataset's order up to float noise, in batches that pad less."""
    from trainer import LengthSortedSampler

    trainer = make_trainer(per_device_eval_batch_size=4)
    padded = {}

    def count_padding(model, inputs, *args, **kwargs):
        padded[trainer.sort_eval_by_length] = padded.get(trainer.sort_eval_by_length, 0) + inputs["input_ids"].numel()
        return original(model, inputs, *args, **kwargs)

    original = trainer.prediction_step
    trainer.prediction_step = count_padding
    trainer.sort_eval_by_length = False
    unsorted = trainer.evaluate()
    trainer.sort_eval_by_length = True
    sorted_ = trainer.evaluate()
    assert set(sorted_) == set(unsorted)
    for key, value in unsorted.items():
        if key.endswith(("runtime", "per_second")):
            continue
        assert sorted_[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert padded[True] < padded[False]  # the point of sorting

    lengths = [3, 9, 1, 9, 4]
    assert list(LengthSortedSampler(lengths)) == [1, 3, 4, 0, 2]  # longest first, ties in row order
    # predict() keeps the dataset's order
    dataset = trainer.eval_dataset["sentiment"]
    assert not isinstance(trainer.get_test_dataloader(dataset).sampler, LengthSortedSampler)
