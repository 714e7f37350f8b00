from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from modeling_multitask import MultiTaskConfig, MultiTaskModel, pool

TEXTS = ["what a film !", "is it any good ?", "a gorgeous , witty , seductive movie .", "bad"]


def encode(tokenizer, texts=TEXTS, **kwargs):
    kwargs.setdefault("padding", True)
    return tokenizer(texts, return_tensors="pt", **kwargs)


def test_output_shapes(make_model, tiny_tokenizer):
    model = make_model().eval()
    batch = encode(tiny_tokenizer)
    out = model(**batch)
    assert set(out.logits) == {"sentiment", "question"}
    assert out.logits["sentiment"].shape == (4, 2)
    assert out.logits["question"].shape == (4, 2)
    assert out.embeddings.shape == (4, model.encoder.config.hidden_size)
    assert out.loss is None


def test_single_task_selection_returns_a_tensor(make_model, tiny_tokenizer):
    model = make_model().eval()
    batch = encode(tiny_tokenizer)
    full = model(**batch)
    only = model(**batch, task="question")
    torch.testing.assert_close(only.logits, full.logits["question"])


def test_three_class_task_head(make_model, tiny_tokenizer):
    model = make_model(tasks=[{"name": "topic", "num_labels": 3}]).eval()
    out = model(**encode(tiny_tokenizer))
    assert out.logits["topic"].shape == (4, 3)
    assert model.config.tasks[0]["id2label"] == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_mean_pooling_ignores_padding(make_model, tiny_tokenizer):
    model = make_model().eval()
    short = encode(tiny_tokenizer, ["is it any good ?"])
    padded = encode(tiny_tokenizer, ["is it any good ?"], padding="max_length", max_length=40)
    assert padded["input_ids"].shape[1] > short["input_ids"].shape[1]
    with torch.no_grad():
        a = model(**short).embeddings
        b = model(**padded).embeddings
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_pool_modes_match_manual_computation():
    torch.manual_seed(0)
    states = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(pool(states, mask, "mean")[0], states[0, :3].mean(0))
    torch.testing.assert_close(pool(states, mask, "max")[0], states[0, :3].max(0).values)
    torch.testing.assert_close(pool(states, mask, "cls"), states[:, 0])
    # A row of padding only must not divide by zero.
    assert torch.isfinite(pool(states, torch.zeros_like(mask), "mean")).all()


def test_mixed_task_batch_routes_rows_to_their_heads(make_model, tiny_tokenizer):
    model = make_model().eval()
    batch = encode(tiny_tokenizer)
    task_ids = torch.tensor([0, 1, 0, 1])
    labels = torch.tensor([1, 0, 0, 1])
    out = model(**batch, task_ids=task_ids, labels=labels)
    expected_sentiment = F.cross_entropy(out.logits["sentiment"][[0, 2]], labels[[0, 2]])
    expected_question = F.cross_entropy(out.logits["question"][[1, 3]], labels[[1, 3]])
    torch.testing.assert_close(out.task_losses["sentiment"], expected_sentiment)
    torch.testing.assert_close(out.task_losses["question"], expected_question)
    torch.testing.assert_close(out.loss, expected_sentiment + expected_question)

    # Changing a question row's label leaves the sentiment loss alone.
    flipped = model(**batch, task_ids=task_ids, labels=torch.tensor([1, 1, 0, 1]))
    torch.testing.assert_close(flipped.task_losses["sentiment"], out.task_losses["sentiment"])
    assert not torch.allclose(flipped.task_losses["question"], out.task_losses["question"])


def test_static_task_weights_scale_the_joint_loss(make_model, tiny_tokenizer):
    model = make_model(task_weights={"question": 0.25}).eval()
    out = model(**encode(tiny_tokenizer), task_ids=torch.tensor([0, 1, 0, 1]), labels=torch.tensor([1, 0, 0, 1]))
    expected = out.task_losses["sentiment"] + 0.25 * out.task_losses["question"]
    torch.testing.assert_close(out.loss, expected)


def test_uncertainty_weighting_formula(make_model, tiny_tokenizer):
    model = make_model(loss_weighting="uncertainty").eval()
    with torch.no_grad():
        model.loss_log_vars.copy_(torch.tensor([0.5, -1.0]))
    out = model(**encode(tiny_tokenizer), task_ids=torch.tensor([0, 1, 0, 1]), labels=torch.tensor([1, 0, 0, 1]))
    expected = (
        math.exp(-0.5) * out.task_losses["sentiment"] + 0.5 + math.exp(1.0) * out.task_losses["question"] - 1.0
    )
    torch.testing.assert_close(out.loss, expected)


def test_single_task_batch_keeps_every_head_in_the_graph(make_model, tiny_tokenizer):
    """DDP needs a gradient (even zero) for every parameter on every step."""
    model = make_model().train()
    out = model(**encode(tiny_tokenizer), task_ids=torch.zeros(4, dtype=torch.long), labels=torch.ones(4, dtype=torch.long))
    out.loss.backward()
    assert model.heads["question"].weight.grad is not None
    assert torch.count_nonzero(model.heads["question"].weight.grad) == 0
    assert torch.count_nonzero(model.heads["sentiment"].weight.grad) > 0


def test_loss_is_finite_and_drops_on_a_memorisation_set(make_model, tiny_tokenizer):
    torch.manual_seed(0)
    model = make_model().train()
    batch = encode(tiny_tokenizer)
    task_ids = torch.tensor([0, 1, 0, 1])
    labels = torch.tensor([1, 0, 0, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(**batch, task_ids=task_ids, labels=labels).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_save_load_round_trip_gives_identical_logits(make_model, tiny_tokenizer, tmp_path):
    model = make_model(pooling="mean", classifier_dropout=0.2).eval()
    batch = encode(tiny_tokenizer)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    assert loaded.config.tasks == model.config.tasks
    assert loaded.config.classifier_dropout == 0.2
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    for task in a.logits:
        assert torch.equal(a.logits[task], b.logits[task])
    assert torch.equal(a.embeddings, b.embeddings)


def test_config_round_trip_keeps_tasks_and_labels(tmp_path):
    config = MultiTaskConfig(
        encoder={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4},
        tasks=[{"name": "question", "num_labels": 2, "id2label": {0: "not_question", 1: "question"}}],
        pooling="max",
    )
    config.save_pretrained(tmp_path)
    loaded = MultiTaskConfig.from_pretrained(tmp_path)
    assert loaded.tasks == config.tasks
    assert loaded.tasks[0]["id2label"][1] == "question"  # int keys survive JSON
    assert loaded.pooling == "max"


def test_unknown_task_lists_known_ones(make_model, tiny_tokenizer):
    model = make_model()
    with pytest.raises(ValueError, match=r"Unknown task 'topic'; this model's tasks are \['sentiment', 'question'\]"):
        model(**encode(tiny_tokenizer), task="topic")


def test_labels_without_task_ids_is_an_error(make_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="labels without task_ids"):
        make_model()(**encode(tiny_tokenizer), labels=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pooling": "median"}, r"pooling='median' is not one of \['mean', 'cls', 'max'\]"),
        ({"tasks": [{"name": "a", "num_labels": 1}]}, r"task 'a' has num_labels=1; a classification head needs at least 2"),
        ({"tasks": [{"name": "a", "num_labels": 2}, {"name": "a", "num_labels": 2}]}, r"duplicate task names \['a'\]"),
        ({"tasks": [{"name": "a", "num_labels": 2}], "task_weights": {"b": 1.0}}, r"task_weights names unknown tasks \['b'\]"),
        ({"loss_weighting": "magic"}, r"loss_weighting='magic' is not one of"),
    ],
)
def test_config_rejects_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskConfig(**kwargs)


def test_from_encoder_hides_a_load_report_that_lists_only_the_unused_pooler(tmp_path):
    """An encoder checkpoint with a pooler (MiniLM has one) would print transformers' LOAD REPORT on every run,
    because the encoder is built without a pooler on purpose. Only that report is hidden."""
    import logging

    import transformers
    from conftest import TINY_ENCODER
    from transformers import AutoModel, BertConfig, BertModel

    import modeling_multitask

    folder = tmp_path / "pooled"
    BertModel(BertConfig(**{**TINY_ENCODER, "vocab_size": 64}), add_pooling_layer=True).save_pretrained(folder)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("transformers.modeling_utils")
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    log.addHandler(handler)
    try:
        AutoModel.from_pretrained(folder, add_pooling_layer=False)  # the plain call does report the pooler
        reports = [r for r in records if "LOAD REPORT" in r.getMessage()]
        assert len(reports) == 1 and "pooler.dense.weight" in reports[0].getMessage()
        records.clear()
        MultiTaskModel.from_encoder(str(folder), tasks=[{"name": "sentiment", "num_labels": 2}])
        assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
    finally:
        log.removeHandler(handler)
        transformers.utils.logging.set_verbosity(verbosity)

    keep = modeling_multitask._PoolerOnlyLoadReport()
    message = reports[0].getMessage()

    def record(text):
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, text, None, None)

    assert not keep.filter(record(message))
    assert keep.filter(record(message.replace("pooler.dense.bias", "encoder.layer.0.output.dense.bias")))
    assert keep.filter(record(message.replace("| UNEXPECTED", "| MISSING", 1)))
    assert keep.filter(record("BertModel LOAD REPORT in a layout this filter cannot read"))
    assert keep.filter(record("some other warning"))
