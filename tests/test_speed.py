"""The fast path keeps the maths: the sync-free joint loss, the vectorised collator, the trainer's device-side
statistics and deferred non-finite check, and length-sorted batched prediction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import data as mtdata
from modeling_multitask import MultiTaskOutput

TASKS_2_6 = [
    {"name": "sentiment", "num_labels": 2, "id2label": {0: "negative", 1: "positive"}},
    {"name": "topic", "num_labels": 6},
]


def reference_loss(logits, labels, task_ids, names, weights=None, log_vars=None):
    """The loss as the core first wrote it: boolean-indexed mean per task present in the batch."""
    total = 0.0
    for index, name in enumerate(names):
        rows = task_ids == index
        if not rows.any():
            continue
        loss = F.cross_entropy(logits[name][rows].float(), labels[rows])
        if log_vars is not None:
            total = total + torch.exp(-log_vars[index]) * loss + log_vars[index]
        else:
            total = total + (weights or {}).get(name, 1.0) * loss
    return total


def batch(num_labels=(2, 6), task_ids=(0, 1, 1, 0, 1), seed=0):
    generator = torch.Generator().manual_seed(seed)
    task_ids = torch.tensor(task_ids)
    # Each row's label is drawn from its own task's range: a 6-class label sits beside 2-class heads.
    labels = torch.stack([torch.randint(num_labels[t], (1,), generator=generator)[0] for t in task_ids.tolist()])
    return task_ids, labels


def head_inputs(model, rows: int):
    """Random pooled features (what dropout hands the heads) and every head's logits on them."""
    features = torch.randn(rows, model.encoder.config.hidden_size, requires_grad=True)
    return features, {name: head(features) for name, head in model.heads.items()}


@pytest.mark.parametrize("task_ids", [(0, 1, 1, 0, 1), (1, 1, 1), (0, 0)])
def test_joint_loss_matches_boolean_indexed_reference(make_model, task_ids):
    model = make_model(tasks=TASKS_2_6, task_weights={"topic": 0.5})
    names = model.config.task_names
    task_ids, labels = batch(task_ids=task_ids)
    features, logits = head_inputs(model, len(task_ids))
    loss, task_losses, _ = model._joint_loss(features, logits, labels, task_ids)
    expected = reference_loss(logits, labels, task_ids, names, weights={"topic": 0.5})
    torch.testing.assert_close(loss, expected)
    params = [features, *model.heads.parameters()]
    grads = torch.autograd.grad(loss, params)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want)
    for index, name in enumerate(names):
        rows = task_ids == index
        want = F.cross_entropy(logits[name][rows], labels[rows]) if rows.any() else torch.tensor(0.0)
        torch.testing.assert_close(task_losses[name], want.detach())


def test_uncertainty_weighting_ignores_absent_tasks(make_model):
    model = make_model(tasks=TASKS_2_6, loss_weighting="uncertainty")
    with torch.no_grad():
        model.loss_log_vars.copy_(torch.tensor([0.3, -0.2]))
    names = model.config.task_names
    task_ids, labels = batch(task_ids=(0, 0, 0))  # no 'topic' rows
    features, logits = head_inputs(model, 3)
    loss, _, weights = model._joint_loss(features, logits, labels, task_ids)
    expected = reference_loss(logits, labels, task_ids, names, log_vars=model.loss_log_vars)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, [model.loss_log_vars])
    assert grad[0] != 0 and grad[1] == 0  # s_topic gets no push from a batch without topic rows
    torch.testing.assert_close(weights["topic"], torch.exp(torch.tensor(0.2)))


def test_every_head_gets_a_gradient_on_a_single_task_batch(make_model, tiny_tokenizer):
    model = make_model()
    enc = tiny_tokenizer(["a good film", "a bad film ."], padding=True, return_tensors="pt")
    out = model(enc["input_ids"], enc["attention_mask"], labels=torch.tensor([1, 0]), task="sentiment")
    out.loss.backward()
    assert out.task_losses["question"] == 0
    # DDP needs every parameter in the graph at every step, whichever task the batch holds.
    assert all(p.grad is not None for p in model.heads.parameters())


def test_forward_with_labels_compiles_without_graph_breaks(make_model, tiny_tokenizer):
    model = make_model()
    enc = tiny_tokenizer(["a good film", "what is a film ?", "bad"], padding=True, return_tensors="pt")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        task_ids=torch.tensor([0, 1, 0]),
        labels=torch.tensor([1, 1, 0]),
    )
    torch._dynamo.reset()
    assert explained.graph_break_count == 0 and not explained.break_reasons, explained.break_reasons
    assert explained.graph_count == 1


def naive_pad(rows, pad_id, multiple):
    width = max(len(r) for r in rows)
    if multiple:
        width = math.ceil(width / multiple) * multiple
    ids = [r + [pad_id] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("multiple", [None, 8])
@pytest.mark.parametrize("lengths", [(1,), (5, 5, 5), (3, 17, 1, 9, 64, 2)])
def test_collator_pads_like_the_naive_loop(lengths, multiple):
    rng = np.random.default_rng(len(lengths))
    features = [
        {"input_ids": rng.integers(1, 1000, n).tolist(), "task_ids": i % 2, "labels": i % 3, "length": n}
        for i, n in enumerate(lengths)
    ]
    got = mtdata.MultiTaskCollator(pad_token_id=7, pad_to_multiple_of=multiple)(features)
    ids, mask = naive_pad([f["input_ids"] for f in features], 7, multiple)
    assert torch.equal(got["input_ids"], ids) and got["input_ids"].dtype == torch.long
    assert torch.equal(got["attention_mask"], mask) and got["attention_mask"].dtype == torch.long
    assert got["task_ids"].tolist() == [i % 2 for i in range(len(lengths))]
    assert got["labels"].tolist() == [i % 3 for i in range(len(lengths))]


# ---------------------------------------------------------------------------------------------------------
# The trainer: statistics on the device, the non-finite check at log time
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def make_trainer(make_model, tiny_tokenizer, tiny_data_dir, tmp_path):
    from transformers import TrainingArguments

    import train

    def make(model=None, **overrides):
        data_args = train.DataArguments(
            data_dir=str(tiny_data_dir), max_train_samples=64, max_eval_samples=16, gold_eval=False
        )
        mt = mtdata.build_data(mtdata.get_tasks(["sentiment", "question"]), tiny_tokenizer, data_args, seed=0)
        settings = dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=8,
            max_steps=8,
            logging_steps=4,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_pin_memory=False,
        )
        return train.MultiTaskTrainer(
            model=model or make_model(),
            args=TrainingArguments(**{**settings, **overrides}),
            train_dataset=mt.train,
            eval_dataset=mt.eval_sets,
            processing_class=tiny_tokenizer,
            data_collator=mtdata.MultiTaskCollator(tiny_tokenizer.pad_token_id),
            task_sizes=mt.task_sizes,
            eval_tasks=mt.eval_tasks,
            mt_args=train.MultiTaskArguments(),
        )

    return make


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


@pytest.mark.parametrize("every_step", [True, False], ids=["cpu-every-step", "accelerator-at-log"])
def test_non_finite_loss_stops_training_naming_step_and_task(make_trainer, make_model, every_step):
    model = make_model()
    forward = model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third training step: a sentiment batch under round robin
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    trainer = make_trainer(model=model)
    trainer._check_every_step = every_step
    if every_step:  # on the CPU: stopped inside the bad step, before its update reaches the weights
        with pytest.raises(FloatingPointError, match=r"at step 3 on task\(s\) \['sentiment'\] \(per-task: [^)]*\)\. Stopping"):
            trainer.train()
        assert trainer.state.global_step == 2
    else:  # on an accelerator: no per-step host read; stopped at the first log after the bad step
        with pytest.raises(FloatingPointError, match=r"at step 3 on task\(s\) \['sentiment'\].*noticed at step 4"):
            trainer.train()
        assert trainer.state.global_step == 4


# ---------------------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------------------


def test_predict_matches_one_text_at_a_time(make_model, tiny_tokenizer):
    model = make_model().train()
    texts = ["what is a film ?", "good", "a bad film . a bad bad film .", "why", "a good film !"]
    results = model.predict(texts, tiny_tokenizer, batch_size=2, return_embeddings=True)
    assert model.training  # restored
    model.eval()
    for text, result in zip(texts, results):
        enc = tiny_tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            out = model(enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(torch.tensor(result["embedding"]), out.embeddings[0], atol=1e-5, rtol=1e-5)
        for task in model.config.tasks:
            probs = out.logits[task["name"]][0].softmax(-1)
            assert result[task["name"]]["label"] == task["id2label"][int(probs.argmax())]
            assert result[task["name"]]["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    again = model.predict(texts, tiny_tokenizer, batch_size=64)  # other batches, other padding: same answers
    for first, second in zip(results, again):
        assert set(second) == set(model.config.task_names)
        for task in model.config.task_names:
            assert first[task]["label"] == second[task]["label"]
            assert first[task]["score"] == pytest.approx(second[task]["score"], abs=1e-5)


def test_predict_rejects_a_bare_string(make_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="list of texts"):
        make_model().predict("a good film", tiny_tokenizer)


@pytest.mark.parametrize("tasks", [TASKS_2_6[:1], TASKS_2_6])
def test_joint_loss_keeps_its_gradient_under_inductor(make_model, tasks):
    # Regression: with a tensor weight of 1.0, inductor returned a single-task loss without grad_fn, so
    # `--torch_compile true` failed at the first backward.
    model = make_model(tasks=tasks)
    task_ids, labels = batch(num_labels=[t["num_labels"] for t in TASKS_2_6], task_ids=(0, 0, 0))
    features, logits = head_inputs(model, 3)
    torch._dynamo.reset()
    loss, task_losses, weights = torch.compile(model._joint_loss)(features, logits, labels, task_ids)
    torch._dynamo.reset()
    assert loss.requires_grad and not task_losses["sentiment"].requires_grad
    torch.testing.assert_close(loss, reference_loss(logits, labels, task_ids, model.config.task_names))
    assert float(weights["sentiment"]) == 1.0


@pytest.mark.parametrize(
    "flags, advice",
    [
        ([], None),
        (["--torch_compile", "true"], "each new batch length is a new shape"),
        (["--torch_compile", "true", "--torch_compile_mode", "reduce-overhead"], "records another CUDA graph"),
        (["--torch_compile", "true", "--pad_to_buckets", "16", "32"], None),
        (["--torch_compile", "true", "--pad_to_multiple_of", "8"], None),
    ],
)
def test_compiled_runs_without_fixed_shapes_are_told_about_buckets(tmp_path, flags, advice):
    import checks
    import train

    *_, mt_args, training_args = train.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", *flags])
    note = checks.compile_shapes_advice(training_args, mt_args)
    if advice is None:
        assert note is None
    else:
        assert advice in note and "--pad_to_buckets 16 32 64 128" in note
