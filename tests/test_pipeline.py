"""The saved folder the way the Hugging Face stack reads it, each in a fresh process on a copied folder: a silent
`AutoTokenizer.from_pretrained(folder)`, `AutoConfig`/`AutoModel` with `trust_remote_code=True`, and the custom
pipeline (`pipeline(model=folder, trust_remote_code=True)`, and `pipeline("text-classification", task_name=...)`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

LONG_TEXT = "what a good film " * 60  # longer than the tiny encoder's 128 positions: needs truncation
FIXTURE_V2 = ROOT / "tests" / "fixtures" / "tiny_model_v2"
TEXTS = ["is this any good ?", "a bad film .", LONG_TEXT, "what is this"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_encoder_dir, tiny_tokenizer):
    """(copied folder, in-process predictions) of a tiny two-task model saved the way a run saves it."""
    import torch

    from modeling_multitask import MultiTaskConfig, MultiTaskModel
    from outputs import save_model_files

    MultiTaskConfig.register_for_auto_class()
    MultiTaskModel.register_for_auto_class("AutoModel")
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(
        str(tiny_encoder_dir),
        tasks=[
            {"name": "sentiment", "num_labels": 2, "id2label": {0: "negative", 1: "positive"}},
            {"name": "topic", "num_labels": 3, "id2label": {0: "film", 1: "food", 2: "other"}},
        ],
    )
    with torch.no_grad():  # heads far from uniform, so a wrong head or label order shows in the scores
        for head in model.heads.values():
            head.weight.normal_(0, 2.0)
    saved_dir = tmp_path_factory.mktemp("saved") / "run"
    save_model_files(model, tiny_tokenizer, saved_dir)
    copied = tmp_path_factory.mktemp("copied") / "model"
    shutil.copytree(saved_dir, copied)  # nothing may point back at the repo or the first folder
    expected = model.predict(TEXTS, tiny_tokenizer, return_embeddings=True)
    return copied, expected


def run_clean(code: str, tmp_path, stdin=subprocess.DEVNULL, timeout: int = 120) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter outside the repo (no repo modules on sys.path), offline."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("stdin, which", [("pipe", "saved"), ("closed", "saved"), ("pipe", "fixture v2")])
def test_autotokenizer_loads_silently(saved, tmp_path, stdin, which):
    folder = saved[0] if which == "saved" else FIXTURE_V2
    code = f"""
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})
        print("LOADED", type(tokenizer).__name__, tokenizer("what is this")["input_ids"])
    """
    if stdin == "pipe":
        # stdin open and never answered: an interactive "run the custom code?" prompt would wait here.
        with subprocess.Popen(["sleep", "600"], stdout=subprocess.PIPE) as silent:
            try:
                done = run_clean(code, tmp_path, stdin=silent.stdout, timeout=60)
            finally:
                silent.kill()
    else:
        done = run_clean(code, tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("LOADED BertTokenizer [2, "), done.stdout  # [CLS] first: the saved vocab
    assert done.stdout.count("\n") == 1, f"the load wrote to stdout: {done.stdout!r}"
    for noise in ("custom code", "trust_remote_code", "You are using a model of type", "[y/N]"):
        assert noise not in done.stdout + done.stderr, done.stdout + done.stderr


def test_auto_classes_and_pipeline_from_copied_folder(saved, tmp_path):
    folder, expected = saved
    code = f"""
        import json
        from transformers import AutoConfig, AutoModel, pipeline
        folder = {str(folder)!r}
        texts = {TEXTS!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        pipe = pipeline(model=folder, trust_remote_code=True)
        one = pipeline("text-classification", model=folder, trust_remote_code=True, task_name="topic")
        out = dict(
            config=[type(config).__name__, config.model_type, config.task_names],
            model=type(model).__name__,
            task=pipe.task,
            pipeline_class=type(pipe).__name__,
            single=pipe(texts[0]),
            batched=pipe(texts, batch_size=3),
            unbatched=pipe(texts, batch_size=1),
            every_label=pipe(texts[:2], top_k=None),
            top2=pipe(texts[:2], top_k=2),
            embedding=pipe(texts[:2], return_embedding=True),
            one_task=one(texts, batch_size=2),
            one_task_all=one(texts[0], top_k=None),
        )
        try:
            pipe(texts[2], truncation=False)
            out["untruncated"] = "no error"
        except Exception as error:
            out["untruncated"] = type(error).__name__
        out["long"] = pipe(texts[2], truncation=True)
        print("RESULT" + json.dumps(out))
    """
    done = run_clean(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT", 1)[1])

    assert out["config"] == ["MultiTaskConfig", "multitask_sentence_encoder", ["sentiment", "topic"]]
    assert out["model"] == "MultiTaskModel"
    assert out["task"] == "text-classification"
    assert out["pipeline_class"] == "MultiTaskClassificationPipeline"

    def close(a: dict, b: dict) -> bool:
        return a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)

    # Every task's best label and score, as MultiTaskModel.predict gives them, whatever the batch size.
    assert close(out["single"]["sentiment"], expected[0]["sentiment"])
    for answers in (out["batched"], out["unbatched"]):
        assert len(answers) == len(TEXTS)
        for got, want in zip(answers, expected):
            assert set(got) == {"sentiment", "topic"}
            for task in ("sentiment", "topic"):
                assert close(got[task], want[task])
    # The long text is truncated to the encoder's limit by default (predict truncates the same way)...
    assert close(out["long"]["topic"], expected[2]["topic"])
    # ...and without truncation it does not fit the position table.
    assert out["untruncated"] != "no error"

    # top_k=None: every label once, best first, probabilities summing to 1; top_k=2: the two best.
    for ranked, want in zip(out["every_label"], expected):
        topic = ranked["topic"]
        assert sorted(r["label"] for r in topic) == ["film", "food", "other"]
        assert [r["score"] for r in topic] == sorted((r["score"] for r in topic), reverse=True)
        assert sum(r["score"] for r in topic) == pytest.approx(1.0, abs=1e-5)
        assert close(topic[0], want["topic"])
    assert [len(r["topic"]) for r in out["top2"]] == [2, 2]
    assert out["top2"][0]["topic"] == out["every_label"][0]["topic"][:2]

    for got, want in zip(out["embedding"], expected):
        assert got["embedding"] == pytest.approx(want["embedding"], abs=1e-5)

    # One task through the stock task name: answered like a text-classification pipeline.
    assert [set(a) for a in out["one_task"]] == [{"label", "score"}] * len(TEXTS)
    for got, want in zip(out["one_task"], expected):
        assert close(got, want["topic"])
    assert [r["label"] for r in out["one_task_all"]] == [r["label"] for r in out["every_label"][0]["topic"]]


def test_pipeline_refuses_without_trust_and_bad_arguments(saved, tmp_path):
    folder, _ = saved
    code = f"""
        from transformers import pipeline
        folder = {str(folder)!r}
        try:
            pipeline(model=folder)
        except ValueError as error:
            print("NO_TRUST", "trust_remote_code=True" in str(error))
        pipe = pipeline(model=folder, trust_remote_code=True)
        for kwargs in (dict(task_name="nope"), dict(top_k=0), dict(task_name="topic", return_embedding=True)):
            try:
                pipe("a film", **kwargs)
            except ValueError as error:
                print("BAD", str(error).splitlines()[0])
    """
    done = run_clean(code, tmp_path, stdin=subprocess.PIPE)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "NO_TRUST True" in lines
    bad = [line for line in lines if line.startswith("BAD ")]
    assert len(bad) == 3, done.stdout
    assert "Unknown task_name 'nope'" in bad[0] and "['sentiment', 'topic']" in bad[0]
    assert "top_k must be a positive integer" in bad[1]
    assert "drop task_name" in bad[2]


def test_pipeline_file_imports_only_torch_transformers_stdlib_and_does_no_io():
    import ast

    from test_modeling import ALLOWED_THIRD_PARTY, violations

    source = (ROOT / "pipeline_multitask.py").read_text(encoding="utf-8")
    assert violations(source) == []
    imported = {
        (a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
        for n in ast.walk(ast.parse(source))
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [None])
    }
    assert imported - set(sys.stdlib_module_names) <= ALLOWED_THIRD_PARTY


def test_checkpoint_v2_loads_with_same_outputs_and_its_pipeline(tmp_path):
    """tests/fixtures/tiny_model_v2 (make_tiny_model_v2.py: config.json with the encoder's model type and
    custom_pipelines): today's classes, the stored remote code and the stored pipeline reproduce its outputs."""
    import torch
    from transformers import AutoModel, AutoTokenizer, pipeline

    from modeling_multitask import MultiTaskModel

    expected = json.loads((FIXTURE_V2 / "expected_outputs.json").read_text())
    assert sum(p.stat().st_size for p in FIXTURE_V2.iterdir()) < 200_000
    folder = tmp_path / "v2"
    shutil.copytree(FIXTURE_V2, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(expected["texts"], padding=True, return_tensors="pt")
    current, info = MultiTaskModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert current.config.model_type == "multitask_sentence_encoder"
    remote = AutoModel.from_pretrained(folder, trust_remote_code=True)
    for model in (current.eval(), remote.eval()):
        with torch.no_grad():
            output = model(**batch)
        for task, logits in expected["logits"].items():
            assert output.logits[task].sub(torch.tensor(logits)).abs().max() <= 1e-5, (type(model).__module__, task)
        assert output.embeddings.sub(torch.tensor(expected["embeddings"])).abs().max() <= 1e-5

    pipe = pipeline(model=str(folder), trust_remote_code=True)
    assert type(pipe).__module__.startswith("transformers_modules.")  # the stored copy, not the repo's file
    answers = pipe(expected["texts"], top_k=None, batch_size=2)
    for i, answer in enumerate(answers):
        for task, logits in expected["logits"].items():
            probabilities = torch.tensor(logits[i]).softmax(-1)
            labels = current.config.tasks[current.config.task_names.index(task)]["id2label"]
            got = {r["label"]: r["score"] for r in answer[task]}
            assert got == pytest.approx({labels[j]: float(p) for j, p in enumerate(probabilities)}, abs=1e-5)
