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
    assert "300text" in done.stderr  # tqdm's bar (stdin's length is unknown), on stderr so stdout stays JSON lines


def test_cli_rejects_texts_and_file_together(tmp_path):
    import predict

    with pytest.raises(ValueError, match=r"Give texts as arguments or with --file, not both"):
        predict.Texts(["x"], str(tmp_path / "f.txt"))
    with pytest.raises(ValueError, match=r"--file .* does not exist"):
        predict.Texts([], str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------------------------------------------------
# Loading runs no code from the model folder and reads no pickle, unless asked
# ---------------------------------------------------------------------------------------------------------

PLANTED = """
import os as _os, pathlib as _pathlib
_pathlib.Path(_os.environ["PLANTED_MARKER"]).write_text("the folder's code ran")
"""


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # trust_remote_code copies the folder's code into HF_MODULES_CACHE: keep that inside the test's folder.
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_MODULES_CACHE=str(tmp_path / "modules"), **extra)
    return env


def _run_cli(*args, env, stdin: str | bytes | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), *map(str, args)], input=stdin, capture_output=True, env=env,
        cwd=cwd, timeout=300, text=not isinstance(stdin, bytes),
    )  # fmt: skip


@pytest.fixture
def planted_model(saved_model, tmp_path):
    import shutil

    folder = tmp_path / "planted"
    shutil.copytree(saved_model, folder)
    code = folder / "modeling_multitask.py"
    code.write_text(code.read_text(encoding="utf-8") + PLANTED, encoding="utf-8")
    return folder


def test_cli_never_runs_the_folders_code_unless_asked(planted_model, tmp_path):
    marker = tmp_path / "marker.txt"
    env = _env(tmp_path, PLANTED_MARKER=str(marker))
    done = _run_cli(planted_model, "is this any good", env=env, cwd=planted_model)  # even from inside the folder
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == "is this any good"
    assert not marker.exists(), "predict.py imported the model folder's modeling_multitask.py without being asked"
    done = _run_cli(planted_model, "is this any good", "--trust_remote_code", env=env)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "the folder's code ran"


def test_python_loaders_run_no_folder_code(planted_model, tmp_path, monkeypatch):
    import predict

    marker = tmp_path / "marker.txt"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model, tokenizer = predict.load(planted_model, device="cpu")
    assert type(model).__module__ == "modeling_multitask" and not marker.exists()
    assert Path(sys.modules[type(model).__module__].__file__).resolve() == ROOT / "modeling_multitask.py"
    assert model.predict(["is this any good"], tokenizer)[0]["sentiment"]["label"] in {"negative", "positive"}


def test_cli_refuses_pickle_weights_naming_the_file(saved_model, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(saved_model, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    for flags in ([], ["--trust_remote_code"]):
        done = _run_cli(folder, "is this any good", *flags, env=_env(tmp_path))
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
        assert "holds pickle weights (pytorch_model.bin) and no model.safetensors" in done.stderr


def test_cli_refuses_weights_cut_short_in_one_line(saved_model, tmp_path):
    import shutil

    folder = tmp_path / "cut"
    shutil.copytree(saved_model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy or download that stopped part-way
    done = _run_cli(folder, "is this any good", env=_env(tmp_path))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "safetensors weights cannot be read" in done.stderr and "copy or download the model again" in done.stderr


def test_cli_refuses_another_model_type_without_trust(saved_model, tmp_path):
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(saved_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "distilbert"}))
    done = _run_cli(folder, "x", env=_env(tmp_path))
    assert done.returncode == 1
    assert "config.json has model_type 'distilbert', expected 'multitask_sentence_encoder'" in done.stderr


# ---------------------------------------------------------------------------------------------------------
# Streaming and bad input
# ---------------------------------------------------------------------------------------------------------


def test_cli_answers_the_first_batch_while_stdin_stays_open(saved_model, tmp_path):
    """Output is written per window as input arrives: a writer that pauses gets its answers before closing stdin."""
    import queue
    import threading

    process = subprocess.Popen(
        [sys.executable, str(ROOT / "predict.py"), str(saved_model), "--batch_size", "2"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(tmp_path), text=True,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        process.stdin.write("a good film .\nwhat is it ?\nbad\n")
        process.stdin.flush()
        got = [json.loads(lines.get(timeout=120))["text"] for _ in range(3)]  # queue.Empty: no answer, stdin open
        assert got == ["a good film .", "what is it ?", "bad"]
        assert process.poll() is None  # still waiting for more input
        process.stdin.write("does it work ?\n")
        process.stdin.close()
        assert process.wait(120) == 0
        assert json.loads(lines.get(timeout=10))["text"] == "does it work ?" and lines.empty()
    finally:
        process.kill()
        process.wait()


def test_cli_streams_long_stdin_in_bounded_memory(saved_model, tmp_path):
    """10,000 lines through a pipe: the first answer comes out long before the writer could finish (predict.py reads
    only a few windows ahead of what it has written), RSS stays bounded, and every line comes back in order.
    bench/inference.py --stream_lines 100000 measures the same on the real encoder."""
    import threading

    import psutil

    texts = [f"line {i} : {'what a good film' if i % 3 else 'is it bad ?'}" for i in range(10_000)]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "predict.py"), str(saved_model), "--batch_size", "16"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(tmp_path), text=True,
    )  # fmt: skip
    written = threading.Event()

    def write():
        for text in texts:
            process.stdin.write(text + "\n")
        process.stdin.close()
        written.set()

    threading.Thread(target=write, daemon=True).start()
    peak = [0]

    def sample():
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                peak[0] = max(peak[0], watched.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            written.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first = process.stdout.readline()
    # Window 16 x 16 texts, a read-ahead queue of 4 windows and a 64 KiB pipe: under 2,000 lines in flight.
    assert not written.is_set(), "predict.py read all 10,000 lines before writing its first answer"
    out = [first, *process.stdout]
    assert process.wait(120) == 0
    sampler.join()
    assert [json.loads(line)["text"] for line in out] == texts
    assert 0 < peak[0] < 1024**3 / 2, f"peak RSS {peak[0] / 2**20:.0f} MiB"


def test_cli_bad_input_is_named_by_line_without_a_traceback(saved_model, tmp_path):
    env = _env(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a good film .\n\nbad \xe9t\xe9\n")
    done = _run_cli(saved_model, "--file", bad, env=env)
    # A file is checked whole before the model loads: nothing is written.
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    assert f"error: --file {bad} line 3: not valid UTF-8" in done.stderr and "iconv" in done.stderr

    done = _run_cli(saved_model, stdin=b"a good film .\nwhat is it ?\n\xff\xfe\nnever read\n", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr.decode()
    assert [json.loads(line)["text"] for line in done.stdout.decode().splitlines()] == ["a good film .", "what is it ?"]
    assert "error: stdin line 3: not valid UTF-8" in done.stderr.decode()
    assert "The 2 text(s) before it were labelled and written." in done.stderr.decode()

    done = _run_cli(saved_model, stdin="", env=env)
    assert done.returncode == 1 and "error: No texts to label: stdin was empty" in done.stderr
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    done = _run_cli(saved_model, "--file", blank, env=env)
    assert done.returncode == 1 and f"error: No texts to label: --file {blank} holds only blank lines" in done.stderr
    assert "Traceback" not in done.stderr
