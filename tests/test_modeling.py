"""modeling_multitask.py: the config, pooling, heads and the joint loss (with its weightings), `predict`, and the
saved folder (the shipped modeling file does no I/O and imports only torch, transformers and the standard
library; a damaged config.json fails clearly)."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModel

import train  # noqa: F401  (registers the auto classes, so save_pretrained writes auto_map)
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


ROOT = Path(__file__).resolve().parents[1]


ALLOWED_THIRD_PARTY = {"torch", "transformers"}


# Standard-library modules that reach files, processes or the network (or load code); none may be imported.
IO_MODULES = {
    "os", "io", "sys", "socket", "ssl", "urllib", "http", "ftplib", "smtplib", "subprocess", "multiprocessing",
    "asyncio", "selectors", "select", "pickle", "marshal", "shelve", "dbm", "sqlite3", "shutil", "pathlib",
    "tempfile", "glob", "fileinput", "zipfile", "tarfile", "gzip", "bz2", "lzma", "importlib", "ctypes",
    "webbrowser", "builtins", "code", "runpy", "pty", "signal", "mmap",
}  # fmt: skip


FORBIDDEN_CALLS = {"open", "exec", "eval", "compile", "__import__", "input", "breakpoint", "globals", "setattr"}


FORBIDDEN_ATTRIBUTES = {
    "load", "save", "read_text", "write_text", "read_bytes", "write_bytes", "urlopen", "system", "popen",
    "hub", "from_file", "to_json_file", "save_pretrained", "push_to_hub",
}  # fmt: skip


def violations(source: str) -> list[str]:
    """What in `source` imports beyond torch/transformers/stdlib, or does file, process or network I/O itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(f"line {node.lineno}: relative import")
            modules = [node.module or ""]
        for module in modules:
            top = module.split(".")[0]
            if top in IO_MODULES:
                found.append(f"line {node.lineno}: imports {module} (I/O)")
            elif top not in ALLOWED_THIRD_PARTY and top not in sys.stdlib_module_names:
                found.append(f"line {node.lineno}: imports {module} (not torch/transformers/stdlib)")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: calls {func.id}()")
            if isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_ATTRIBUTES:
                found.append(f"line {node.lineno}: calls .{func.attr}()")
        if isinstance(node, ast.Attribute) and node.attr in ("hub", "__builtins__", "__globals__", "__subclasses__"):
            found.append(f"line {node.lineno}: uses .{node.attr}")
    return found


def test_modeling_file_imports_only_torch_transformers_stdlib_and_does_no_io():
    source = (ROOT / "modeling_multitask.py").read_text(encoding="utf-8")
    assert violations(source) == []
    tree = ast.parse(source)
    imported = {
        (a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [None])
    }
    assert imported - set(sys.stdlib_module_names) <= ALLOWED_THIRD_PARTY


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("import socket", "imports socket (I/O)"),
        ("from urllib.request import urlopen", "imports urllib.request (I/O)"),
        ("import requests", "imports requests (not torch/transformers/stdlib)"),
        ("from . import data", "relative import"),
        ("x = open('w.bin').read()", "calls open()"),
        ("import torch\nstate = torch.load('x.pt')", "calls .load()"),
        ("eval('1')", "calls eval()"),
        ("import torch\ntorch.hub.list('x')", "uses .hub"),
    ],
)
def test_the_checker_catches_io(snippet, expected):
    assert any(expected in v for v in violations(snippet)), violations(snippet)


def test_the_saved_folder_ships_the_same_modeling_file(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    assert (tmp_path / "modeling_multitask.py").read_text() == (ROOT / "modeling_multitask.py").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "modeling_multitask.py"]


DOCTORED = [
    ("zero labels", lambda c: c["tasks"][0].update(num_labels=0),
     r"task 'sentiment' has num_labels=0; a classification head needs at least 2"),
    ("id2label keys do not match num_labels", lambda c: c["tasks"][1].update(id2label={"0": "no", "5": "yes"}),
     r"task 'question' has num_labels=2 but id2label keys \[0, 5\]; expected keys 0\.\.1"),
    ("negative hidden size", lambda c: c["encoder"].update(hidden_size=-32),
     r"encoder hidden_size=-32 must be a positive integer; the saved config\.json is damaged"),
    ("zero layers", lambda c: c["encoder"].update(num_hidden_layers=0),
     r"encoder num_hidden_layers=0 must be a positive"),
    ("negative vocabulary", lambda c: c["encoder"].update(vocab_size=-1), r"encoder vocab_size=-1 must be a positive"),
    ("fractional heads", lambda c: c["encoder"].update(num_attention_heads=2.5),
     r"encoder num_attention_heads=2\.5 must"),
    ("unknown pooling", lambda c: c.update(pooling="attention"),
     r"pooling='attention' is not one of \['mean', 'cls', 'max'\]"),
    ("unknown loss weighting", lambda c: c.update(loss_weighting="magic"), r"loss_weighting='magic' is not one of"),
    ("dropout out of range", lambda c: c.update(classifier_dropout=1.5),
     r"classifier_dropout=1\.5 must be in \[0, 1\)"),
    ("negative task weight", lambda c: c.update(task_weights={"sentiment": -1.0}),
     r"task_weights\['sentiment'\]=-1\.0 must be a finite number >= 0"),
    ("duplicate tasks", lambda c: c["tasks"].append(dict(c["tasks"][0])), r"duplicate task names \['sentiment'\]"),
    ("no encoder model_type", lambda c: c["encoder"].pop("model_type"), r"the encoder config has no 'model_type'"),
]


@pytest.mark.parametrize("edit, message", [d[1:] for d in DOCTORED], ids=[d[0] for d in DOCTORED])
@pytest.mark.parametrize("loader", ["MultiTaskModel", "AutoModel+trust_remote_code"])
def test_nonsensical_saved_config_fails_to_load_clearly(make_model, tmp_path, edit, message, loader):
    make_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        if loader == "MultiTaskModel":
            MultiTaskModel.from_pretrained(tmp_path)
        else:
            AutoModel.from_pretrained(tmp_path, trust_remote_code=True)


def test_undamaged_saved_config_loads_with_both_loaders(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaders = (MultiTaskModel.from_pretrained, lambda path: AutoModel.from_pretrained(path, trust_remote_code=True))
    for loaded in (load(tmp_path) for load in loaders):
        assert loaded.config.task_names == ["sentiment", "question"]
        assert all((a == b).all() for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_reload_takes_the_encoder_attention_implementation(make_model, tmp_path):
    """`auto` gives BERT sdpa; `encoder_attn_implementation` picks another one at load time (not saved)."""
    model = make_model()
    assert model.encoder.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert "attn_implementation" not in (tmp_path / "config.json").read_text()
    eager = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, encoder_attn_implementation="eager")
    assert eager.encoder.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match=r"attn_implementation='nope' is not one of \['auto', 'eager', 'sdpa'"):
        MultiTaskModel.from_pretrained(tmp_path, encoder_attn_implementation="nope")
