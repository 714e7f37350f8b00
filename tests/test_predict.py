"""One-pass inference: `MultiTaskModel.predict` and the `predict.py` command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Shuffled lengths, so sorting by length really reorders them.
TEXTS = [
    "a good film .",
    "why is the film so bad ? it is not good , and the cast is bad too .",
    "what",
    "is this any good",
    "how can a film this bad be so good ? what a film !",
    "bad",
    "does it work ?",
]


def _one_by_one(model, tokenizer, texts):
    """Reference: forward() on each text alone (no padding at all)."""
    model.eval()
    out = []
    with torch.no_grad():
        for text in texts:
            output = model(**tokenizer([text], return_tensors="pt"))
            out.append((output.logits, output.embeddings[0]))
    return out


def test_predict_equals_forward_in_input_order(make_model, tiny_tokenizer):
    model = make_model()
    results = model.predict(TEXTS, tiny_tokenizer, batch_size=3, return_embeddings=True)
    assert len(results) == len(TEXTS)
    for result, (logits, embedding) in zip(results, _one_by_one(model, tiny_tokenizer, TEXTS)):
        for task in model.config.tasks:
            probabilities = logits[task["name"]][0].softmax(-1)
            assert result[task["name"]]["label"] == task["id2label"][int(probabilities.argmax())]
            assert math.isclose(result[task["name"]]["score"], float(probabilities.max()), abs_tol=1e-5)
        assert torch.tensor(result["embedding"]).sub(embedding).abs().max() <= 1e-5
    assert len({tuple(r["embedding"]) for r in results}) == len(TEXTS)  # the texts really differ to the model


def test_predict_one_encoder_pass_per_batch_padded_to_the_batch(make_model, tiny_tokenizer):
    model = make_model()
    seen = []
    model.encoder.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape),
                                        with_kwargs=True)  # fmt: skip
    model.predict(TEXTS, tiny_tokenizer, batch_size=3)
    lengths = sorted((len(tiny_tokenizer(t)["input_ids"]) for t in TEXTS), reverse=True)
    # ceil(7 / 3) = 3 passes serve both tasks; each pads only to its own longest text (never to 128).
    assert [tuple(s) for s in seen] == [(3, lengths[0]), (3, lengths[3]), (1, lengths[6])]


def test_predict_truncates_restores_mode_and_checks_input(make_model, tiny_tokenizer):
    model = make_model()
    model.train()
    seen = []
    model.encoder.register_forward_hook(lambda m, a, k, o: seen.append(k["input_ids"].shape[1]), with_kwargs=True)
    long_text = " ".join(["good"] * 500)
    results = model.predict([long_text, "bad"], tiny_tokenizer, max_length=16)
    assert seen == [16] and len(results) == 2
    assert model.training, "predict() must give the model back in the mode it found it"
    model.predict([long_text], tiny_tokenizer)
    assert seen[-1] == model.max_input_length(tiny_tokenizer) == 128
    assert model.predict([], tiny_tokenizer) == []
    with pytest.raises(ValueError, match=r"takes a list of texts; wrap a single text"):
        model.predict("one text", tiny_tokenizer)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1"):
        model.predict(["x"], tiny_tokenizer, batch_size=0)


def test_predict_is_deterministic_in_train_mode_models(make_model, tiny_tokenizer):
    """Dropout is off during predict() even when the model was in training mode."""
    model = make_model(classifier_dropout=0.5)
    model.train()
    first = model.predict(TEXTS, tiny_tokenizer, return_embeddings=True)
    second = model.predict(TEXTS, tiny_tokenizer, return_embeddings=True)
    assert first == second


# ---------------------------------------------------------------------------------------------------------
# predict.py
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_encoder_dir):
    import train  # noqa: F401  (registers the auto classes, as in a training run)
    from transformers import AutoTokenizer

    from modeling_multitask import MultiTaskModel

    torch.manual_seed(0)
    tasks = [
        {"name": "sentiment", "num_labels": 2, "id2label": {0: "negative", 1: "positive"}},
        {"name": "question", "num_labels": 3, "id2label": {0: "statement", 1: "question", 2: "exclamation"}},
    ]
    model = MultiTaskModel.from_encoder(str(tiny_encoder_dir), tasks=tasks)
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(folder)
    return folder


def _predict_cli(*args, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), *map(str, args)], input=stdin, capture_output=True, text=True,
        env=env, cwd=cwd, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_cli_texts_as_arguments(saved_model, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    done = _predict_cli(saved_model, "is this any good", "a gorgeous film .", cwd=tmp_path)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["is this any good", "a gorgeous film ."]
    model = AutoModel.from_pretrained(saved_model, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(saved_model, trust_remote_code=True)
    expected = model.predict(["is this any good", "a gorgeous film ."], tokenizer)
    for line, want in zip(lines, expected):
        assert set(line) == {"text", "sentiment", "question"}
        assert line["question"]["label"] in {"statement", "question", "exclamation"}
        for task in ("sentiment", "question"):
            assert line[task]["label"] == want[task]["label"]
            assert math.isclose(line[task]["score"], want[task]["score"], abs_tol=1e-5)
    assert "%|" not in done.stderr  # two texts: no progress bar


def test_cli_file_with_embeddings_skips_blank_lines(saved_model, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("what is it ?\n\n   \nbad film .\n", encoding="utf-8")
    done = _predict_cli(saved_model, "--file", texts, "--embeddings", "--batch_size", "1")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["what is it ?", "bad film ."]
    assert all(len(line["embedding"]) == 32 for line in lines)
    assert "Skipped 2 blank line(s)" in done.stderr


def test_cli_stdin_with_progress_bar(saved_model):
    texts = [f"text number {i} is {'good' if i % 2 else 'bad'}" for i in range(300)]
    done = _predict_cli(saved_model, stdin="\n".join(texts) + "\n")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["text"] for line in lines] == texts
    assert "300/300" in done.stderr  # tqdm's bar, on stderr so stdout stays JSON lines


def test_cli_rejects_texts_and_file_together(saved_model, tmp_path):
    import predict

    with pytest.raises(ValueError, match=r"Give texts as arguments or with --file, not both"):
        predict.read_texts(["x"], str(tmp_path / "f.txt"))
    with pytest.raises(ValueError, match=r"--file .* does not exist"):
        predict.read_texts([], str(tmp_path / "missing.txt"))
