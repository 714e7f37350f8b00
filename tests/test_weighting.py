"""Loss weighting: static per-task weights, learned uncertainty weights, and what gets logged."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run_main, tiny_argv
from torch.nn import functional as F

import train


def mixed_batch(model, rows: int = 6):
    torch.manual_seed(1)
    vocab = model.encoder.config.vocab_size
    return {
        "input_ids": torch.randint(5, vocab, (rows, 7)),
        "attention_mask": torch.ones(rows, 7, dtype=torch.long),
        "task_ids": torch.tensor([0, 0, 0, 1, 1, 1][:rows]),
        "labels": torch.tensor([0, 1, 1, 0, 1, 0][:rows]),
    }


def per_task_ce(out, batch) -> list[torch.Tensor]:
    return [
        F.cross_entropy(out.logits[name][batch["task_ids"] == i], batch["labels"][batch["task_ids"] == i])
        for i, name in enumerate(["sentiment", "question"])
    ]


def test_static_weights_scale_each_task_loss(make_model):
    model = make_model(task_weights={"sentiment": 2.0, "question": 0.5}).eval()
    batch = mixed_batch(model)
    out = model(**batch)
    ce = per_task_ce(out, batch)
    torch.testing.assert_close(out.loss, 2.0 * ce[0] + 0.5 * ce[1])
    assert {k: float(v) for k, v in out.task_weights.items()} == {"sentiment": 2.0, "question": 0.5}


def test_uncertainty_loss_is_kendall(make_model):
    model = make_model(loss_weighting="uncertainty").eval()
    with torch.no_grad():
        model.loss_log_vars.copy_(torch.tensor([0.7, -0.3]))
    batch = mixed_batch(model)
    out = model(**batch)
    ce = per_task_ce(out, batch)
    torch.testing.assert_close(out.loss, math.exp(-0.7) * ce[0] + 0.7 + math.exp(0.3) * ce[1] - 0.3)
    torch.testing.assert_close(out.task_weights["sentiment"], torch.tensor(math.exp(-0.7)))


@pytest.mark.parametrize("loss_weighting", ["static", "uncertainty"])
def test_single_task_batch_reaches_every_parameter(make_model, loss_weighting):
    # Under DDP with find_unused_parameters=False every parameter needs a gradient on every step, also the
    # head (and log-variance) of a task absent from this rank's batch.
    model = make_model(loss_weighting=loss_weighting)
    batch = mixed_batch(model)
    batch["task_ids"] = torch.zeros_like(batch["task_ids"])  # only sentiment rows
    model(**batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert torch.count_nonzero(model.heads["question"].weight.grad) == 0


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
