"""The three ways a trained model leaves this repository: AutoModel + trust_remote_code from any folder or repo,
the model card (README.md), the sentence-transformers view; plus the Hub upload wiring and old checkpoints.

Most tests share one real `train.py` run on the tiny encoder (`tiny_run`, a few steps), made with
`--push_to_hub` against a fake `HfApi` that records what would be sent.

Regenerate docs/sample_model_card.md (a few steps of the packaged MiniLM on the small data mirror):

    WRITE_SAMPLE_CARD=1 pytest tests/test_hub.py -k sample_card
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_V1 = ROOT / "tests" / "fixtures" / "tiny_model_v1"
DOCS = ROOT / "docs"
TEXTS = ["is this any good", "a gorgeous film .", "what is the capital of france ?", "why", "bad film , good cast !"]
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def _train_args(encoder, data_dir, output_dir, *extra) -> list[str]:
    return [
        "--encoder", str(encoder), "--data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--tasks", "sentiment", "question",
        "--max_train_samples", "64", "--question_pool_per_source", "60", "--max_eval_samples", "40",
        "--max_seq_length", "32", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64",
        "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--logging_steps", "2",
        "--report_to", "none", "--seed", "7", *extra,
    ]  # fmt: skip


class FakeHubApi:
    """Stands in for the network side of `huggingface_hub.HfApi`: records calls, computes what would be sent."""

    def __init__(self, output_dir: Path, namespace: str = "someone"):
        self.output_dir = output_dir
        self.namespace = namespace
        self.calls: list[tuple[str, dict]] = []
        self.sent: dict[str, bytes] = {}

    def _record(self, name: str, kwargs: dict) -> None:
        # Where the run was when the call came: before save_outputs had finished, metrics.json did not exist.
        kwargs = dict(kwargs, _run_finished=(self.output_dir / "metrics.json").is_file())
        self.calls.append((name, kwargs))

    def create_repo(self, api, repo_id, **kwargs):
        self._record("create_repo", {"repo_id": repo_id, "token": api.token, **kwargs})
        full = repo_id if "/" in repo_id else f"{self.namespace}/{repo_id}"
        return SimpleNamespace(repo_id=full, url=f"https://huggingface.co/{full}")

    def create_branch(self, api, repo_id, **kwargs):
        self._record("create_branch", {"repo_id": repo_id, **kwargs})

    def upload_folder(self, api, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

        self._record("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, **kwargs})
        # The same selection upload_folder makes before it hashes and sends anything.
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
        ignore = list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore):
            self.sent[rel] = (folder / rel).read_bytes()

    def create_commit(self, api, *, repo_id, operations, **kwargs):
        self._record("create_commit", {"repo_id": repo_id, **kwargs})
        # Each operation's bytes as they would be sent (read from the path the operation holds).
        for op in operations:
            source = op.path_or_fileobj
            self.sent[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()

    def install(self, monkeypatch) -> None:
        from huggingface_hub import HfApi

        for name in ("create_repo", "create_branch", "upload_folder", "create_commit"):
            fake = getattr(self, name)
            monkeypatch.setattr(HfApi, name, lambda api, *a, _fake=fake, **k: _fake(api, *a, **k))


@pytest.fixture(scope="module")
def tiny_run(tiny_encoder_dir, tiny_data_dir, tmp_path_factory):
    """One short train.py run (in process, so the fake Hub API applies) with --push_to_hub."""
    import train

    out = tmp_path_factory.mktemp("run") / "out"
    hub_api = FakeHubApi(out)
    with pytest.MonkeyPatch.context() as mp:
        hub_api.install(mp)
        mp.delenv("HF_TOKEN", raising=False)
        metrics = train.main(
            _train_args(
                tiny_encoder_dir, tiny_data_dir, out,
                "--push_to_hub", "true", "--hub_model_id", "tiny-multitask", "--hub_token", "hf_test_token",
                "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1",
            )
        )  # fmt: skip
    return SimpleNamespace(out=out, metrics=metrics, hub=hub_api)


def _saved_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


# ---------------------------------------------------------------------------------------------------------
# The saved folder loads anywhere
# ---------------------------------------------------------------------------------------------------------

LOAD_ELSEWHERE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder, texts, result_file, repo_root = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    assert repo_root not in [p.rstrip("/") for p in sys.path], sys.path
    try:
        import modeling_multitask
    except ImportError:
        pass
    else:
        raise AssertionError(f"modeling_multitask importable from {modeling_multitask.__file__}")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    plain = AutoTokenizer.from_pretrained(folder)  # as users type it; stdin is closed, so no prompt waits
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert plain(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(**batch)
    json.dump(
        {
            "module": type(model).__module__,
            "logits": {task: v.tolist() for task, v in output.logits.items()},
            "embeddings": output.embeddings.tolist(),
        },
        open(result_file, "w"),
    )
    """
)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_saved_folder_has_auto_map_code_and_card(tiny_run):
    config = json.loads((tiny_run.out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_multitask.MultiTaskConfig",
        "AutoModel": "modeling_multitask.MultiTaskModel",
    }
    assert (tiny_run.out / "modeling_multitask.py").read_text() == (ROOT / "modeling_multitask.py").read_text()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md", "metrics.json"):
        assert (tiny_run.out / name).is_file(), name
    final = [p for p in tiny_run.out.glob("**/*") if not p.relative_to(tiny_run.out).parts[0].startswith("checkpoint-")]
    assert not [p for p in final if p.suffix in (".bin", ".pt", ".pth", ".pkl")], "weights must be safetensors only"


def test_loads_anywhere_with_trust_remote_code(tiny_run, tmp_path):
    """Fresh interpreter, cwd elsewhere, repo not on sys.path, offline: same logits and embeddings as in-process."""
    from modeling_multitask import MultiTaskModel

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result_file = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, str(tiny_run.out), json.dumps(TEXTS), str(result_file), str(ROOT)],
        cwd=elsewhere, env=_clean_env(), stdin=subprocess.DEVNULL, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(result_file.read_text())
    assert result["module"].startswith("transformers_modules."), result["module"]

    from transformers import AutoTokenizer

    model = MultiTaskModel.from_pretrained(tiny_run.out).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_run.out, trust_remote_code=True)
    with torch.no_grad():
        expected = model(**tokenizer(TEXTS, padding=True, return_tensors="pt"))
    assert set(result["logits"]) == set(model.config.task_names) == {"sentiment", "question"}
    for task, logits in expected.logits.items():
        assert torch.tensor(result["logits"][task]).sub(logits).abs().max() <= 1e-5, task
    assert torch.tensor(result["embeddings"]).sub(expected.embeddings).abs().max() <= 1e-5
    assert expected.embeddings.std(0).max() > 0, "texts must not all embed alike (a tokenizer that only knows [UNK])"


def test_checkpoint_v1_still_loads_with_same_outputs():
    """tests/fixtures/tiny_model_v1 was saved by an earlier version (make_tiny_model_v1.py): today's classes and the
    stored remote code must both load it and reproduce the outputs stored with it."""
    from transformers import AutoModel, AutoTokenizer

    from modeling_multitask import MultiTaskModel

    expected = json.loads((FIXTURE_V1 / "expected_outputs.json").read_text())
    size = sum(p.stat().st_size for p in FIXTURE_V1.iterdir())
    assert size < 200_000, f"fixture grew to {size} bytes"
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_V1, trust_remote_code=True)
    batch = tokenizer(expected["texts"], padding=True, return_tensors="pt")

    current, info = MultiTaskModel.from_pretrained(FIXTURE_V1, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    remote = AutoModel.from_pretrained(FIXTURE_V1, trust_remote_code=True)
    for model in (current.eval(), remote.eval()):
        with torch.no_grad():
            output = model(**batch)
        for task, logits in expected["logits"].items():
            assert output.logits[task].sub(torch.tensor(logits)).abs().max() <= 1e-5, (type(model).__module__, task)
        assert output.embeddings.sub(torch.tensor(expected["embeddings"])).abs().max() <= 1e-5
    assert current.config.task_names == ["sentiment", "question"]
    assert current.config.tasks[1]["id2label"] == {0: "not_question", 1: "question"}


# ---------------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------------


def test_card_metadata(tiny_run):
    from huggingface_hub import ModelCard, metadata_load

    card = ModelCard.load(tiny_run.out / "README.md")
    meta = metadata_load(tiny_run.out / "README.md")
    assert card.data.to_dict()["model-index"] == meta["model-index"]
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["license"] == "apache-2.0"
    assert meta["language"] == "en"
    # `datasets:` is what the model was trained on: DailyDialog (evaluation only, CC BY-NC-SA) is not listed.
    assert meta["datasets"] == ["stanfordnlp/sst2", "CogComp/trec"]
    assert {"multi-task", "sentence-transformers", "sentiment", "question"} <= set(meta["tags"])
    # The tiny encoder is a local folder: a path is not a Hub id, so no base_model (the Hub would reject it).
    assert "base_model" not in meta


def test_card_model_index_round_trips_to_metrics_json(tiny_run):
    """Every model-index entry names the set's real dataset and split (a custom id for the teacher-labelled
    hold-out), never an eval set's name as the config; every value is metrics.json's, exactly."""
    from huggingface_hub import metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    metrics = _saved_metrics(tiny_run.out)
    final, eval_sets = metrics["final"], metrics["eval_sets"]
    model_index = metadata_load(tiny_run.out / "README.md")["model-index"]
    name, results = model_index_to_eval_results(model_index)
    assert name == "tiny-multitask"
    datasets = [r["dataset"] for r in model_index[0]["results"]]
    assert datasets == [
        {"name": "SST-2 validation", "type": "stanfordnlp/sst2", "split": "validation"},
        {"name": "held-out part of the question training pool (SST-2 train + TREC train), labelled by the "
                 "`heuristic` teacher rule", "type": "question-pool-heldout", "split": "heldout"},
        {"name": "DailyDialog validation", "type": "li2017dailydialog/daily_dialog", "split": "validation"},
        {"name": "Switchboard (SwDA) validation", "type": "swda", "split": "validation"},
    ]  # fmt: skip
    # Back from (dataset, split, transform) to the eval set; the no-'?' set is DailyDialog's text transformed.
    by_source = {(e["dataset"], e["split"], e["transform"]): n for n, e in eval_sets.items()}
    got = {}
    for r in results:
        args = dict(r.metric_args or {})
        eval_set = by_source[(r.dataset_type, r.dataset_split, args.pop("input_transform", None))]
        key = {"accuracy": "accuracy", "macro": "f1", "binary": "f1_pos"}[args.get("average", r.metric_type)]
        assert r.task_name == eval_sets[eval_set]["task"]
        got[(eval_set, key)] = r.metric_value
    want = {(s, m): final[s][m] for s in final for m in ("accuracy", "f1")}
    want |= {(s, "f1_pos"): final[s]["f1_pos"] for s in final if eval_sets[s]["task"] == "question"}
    assert got == want  # exact floats: the card carries metrics.json's numbers, not rounded copies
    assert all(r.dataset_config is None for r in results)


def test_card_body(tiny_run):
    text = (tiny_run.out / "README.md").read_text()
    metrics = _saved_metrics(tiny_run.out)
    images = IMAGE.findall(text)
    assert set(images) == {"loss_curves.png", "accuracy_curves.png", "f1_curves.png"}
    for image in images:
        assert (tiny_run.out / image).is_file(), image
    # tasks with label names
    assert "`0` negative, `1` positive" in text and "`0` not_question, `1` question" in text
    # before -> after per eval set, formatted from metrics.json
    for name, values in metrics["final"].items():
        before = metrics["before"][name]
        results = text.split("## Results")[1].split("###")[0]
        row = next(line for line in results.splitlines() if line.startswith(f"| `{name}` | "))
        for value in (before["accuracy"], values["accuracy"], before["f1"], values["f1"]):
            assert f"{value:.4f}" in row, (name, row)
    # heuristic baselines on the question sets
    for name, rules in metrics["heuristics"].items():
        assert f"{rules['heuristic']['accuracy']:.4f}" in text, name
    # per-epoch tables: one per task, a row per logged step plus "before"
    assert text.count("| epoch | step | train loss | train acc |") == 2
    assert "| 0 (before) | 0 |" in text
    # the recipe
    for label in ("Encoder", "Freezing", "Task sampling", "Batch size", "Learning rate", "Hardware", "Training time"):
        assert f"| {label} |" in text, label
    assert metrics["recipe"]["hardware"] in text
    # limitations
    assert "heuristic" in text.split("## Limitations")[1] and "movie" in text.split("## Limitations")[1]


def test_card_headline_is_the_task_metric_beside_its_teacher(tiny_run, tmp_path):
    """The card leads with each task's headline metric (question: F1 of the question class, as the README) on its
    gold sets, beside the run's own teacher rule, and says whether the model trails or beats it."""
    import hub

    text = (tiny_run.out / "README.md").read_text()
    metrics = _saved_metrics(tiny_run.out)
    final, rules = metrics["final"], metrics["heuristics"]
    headline = next(line for line in text.splitlines() if line.startswith("- `question`, F1 of class `question`:"))
    for name in ("question_gold", "question_gold_noqm"):
        assert f"**{final[name]['f1_pos']:.4f}** on `{name}`" in headline
        assert f"on `{name}` {rules[name]['heuristic']['f1_pos']:.4f}: the model " in headline
    assert "on `question` " not in headline.split("Its teacher")[0]  # the teacher-labelled hold-out is no headline
    assert f"- `sentiment`, accuracy: **{final['sentiment']['accuracy']:.4f}** on `sentiment`" in text
    recipe = text.split("## Training recipe")[1]
    assert "| Weak labels | `question`: teacher `heuristic`; question_pool_per_source 60, " in recipe

    # The same folder as if the dialog teacher had labelled the pool, once behind it and once ahead of it.
    folder = tmp_path / "dialog"
    shutil.copytree(tiny_run.out, folder, ignore=shutil.ignore_patterns("checkpoint-*", "0_Transformer"))
    question = next(t for t in metrics["tasks"] if t["name"] == "question")
    question["teacher"] = question["pool_options"]["question_teacher"] = "dialog"
    for offset, verdict in ((-0.05, "trails"), (0.05, "beats")):
        metrics["final"]["question_gold"]["f1_pos"] = rules["question_gold"]["dialog"]["f1_pos"] + offset
        (folder / "metrics.json").write_text(json.dumps(metrics))
        card = hub.render_card(folder, model_id="someone/dialog").content
        assert f"on `question_gold` {rules['question_gold']['dialog']['f1_pos']:.4f}: the model {verdict} its teacher by 0.0500" in card
        assert "the `dialog` rule" in card and "labelled by the `dialog` teacher rule" in card
        assert "from a rule (the `dialog` teacher" in card.split("## Limitations")[1]
        assert "teacher `heuristic`" not in card


def test_card_usage_snippets_run_when_copied(tiny_run, tmp_path):
    """The card's Python blocks, pointed at the folder instead of the Hub repo, run in a fresh interpreter."""
    import hub

    card = tmp_path / "card.md"
    hub.render_card(tiny_run.out, model_id=str(tiny_run.out), output=card)
    blocks = _code_blocks(card.read_text())
    assert len(blocks) == 3 and "trust_remote_code=True" in blocks[0] and "SentenceTransformer" in blocks[2]
    assert "pipeline(model=" in blocks[1] and 'task_name="sentiment"' in blocks[1]
    script = tmp_path / "snippet.py"
    script.write_text("\n".join(blocks))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=_clean_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'sentiment': {'label':" in done.stdout and "torch.Size([2, 32])" in done.stdout
    assert "[{'label': 'negative', 'score'" in done.stdout or "[{'label': 'positive', 'score'" in done.stdout


def test_card_renders_without_sentence_transformers_or_before_eval(tiny_run, tmp_path):
    import hub

    folder = tmp_path / "run"
    shutil.copytree(tiny_run.out, folder, ignore=shutil.ignore_patterns("checkpoint-*", "0_Transformer"))
    for name in ("modules.json", "1_Pooling"):
        shutil.rmtree(folder / name) if (folder / name).is_dir() else (folder / name).unlink()
    metrics = _saved_metrics(folder)
    metrics["before"] = {}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    text = str(hub.render_card(folder, model_id="me/x"))
    assert "SentenceTransformer" not in text and "0 (before)" not in text
    assert "| `sentiment` | sentiment | SST-2 validation |" in text


def test_hub_ids_and_local_paths(tmp_path):
    import hub

    assert hub.hub_id_or_none("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub.hub_id_or_none("bert-base-uncased") == "bert-base-uncased"
    assert hub.hub_id_or_none(str(tmp_path)) is None
    assert hub.hub_id_or_none("./runs/x") is None
    assert hub.hub_id_or_none("a/b/c") is None


def test_render_card_names_a_missing_metrics_file(tmp_path):
    import hub

    with pytest.raises(ValueError, match=r"has no metrics.json; render the card from a finished train.py"):
        hub.render_card(tmp_path)


def test_cli_prints_a_refusal_as_one_line_without_a_traceback(tmp_path):
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.json").write_text('{"tasks": [')
    env = {**os.environ, "MULTITASK_DEBUG": "0"}
    card = [sys.executable, str(root / "hub.py"), "card", str(tmp_path)]
    done = subprocess.run(card, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'metrics.json'} is not valid JSON")
    done = subprocess.run(card, capture_output=True, text=True, env={**env, "MULTITASK_DEBUG": "1"}, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr  # the debugging switch shows where it came from


def test_sample_card_is_current(tiny_run, tiny_data_dir, tmp_path):
    """docs/sample_model_card.md is generated (see the module docstring); it must have today's template's layout."""
    if os.environ.get("WRITE_SAMPLE_CARD") == "1":
        _write_sample_card(tiny_data_dir, tmp_path)
    sample = (DOCS / "sample_model_card.md").read_text()
    current = (tiny_run.out / "README.md").read_text()

    def layout(text: str) -> list[str]:
        body = text.split("\n---\n", 1)[1]
        return [line for line in body.splitlines() if line.startswith("#")][1:]  # [0] is the model's name

    assert layout(sample) == layout(current), "rerun: WRITE_SAMPLE_CARD=1 pytest tests/test_hub.py -k sample_card"
    for image in IMAGE.findall(sample):
        assert (DOCS / image).is_file(), image
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in sample


def _write_sample_card(data_dir: Path, tmp_path: Path) -> None:
    import hub
    import train

    out = tmp_path / "sample-run"
    train.main(_train_args("sentence-transformers/all-MiniLM-L6-v2", data_dir, out, "--save_strategy", "no"))
    files = DOCS / "sample_model_card_files"
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir(parents=True)
    for plot in hub.PLOTS:
        shutil.copy(out / plot, files / plot)
    hub.render_card(
        out, model_id="your-name/multitask-minilm", image_prefix="sample_model_card_files/",
        output=DOCS / "sample_model_card.md",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# push_to_hub (the only piece not run against a live Hub: no network here)
# ---------------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_the_final_folder_once(tiny_run):
    calls = [name for name, _ in tiny_run.hub.calls]
    assert calls == ["create_repo", "create_commit"]
    create, upload = (kwargs for _, kwargs in tiny_run.hub.calls)
    # The Trainer never reached the Hub during training: the first call came after the folder was complete.
    assert create["_run_finished"] and upload["_run_finished"]
    assert create["repo_id"] == "tiny-multitask" and create["token"] == "hf_test_token"
    assert upload["repo_id"] == "someone/tiny-multitask"

    sent = set(tiny_run.hub.sent)
    expected = {
        "README.md", "config.json", "model.safetensors", "modeling_multitask.py", "pipeline_multitask.py",
        "tokenizer.json", "tokenizer_config.json", "loss_curves.png", "accuracy_curves.png", "f1_curves.png",
        "metrics.json", "training_args.json", "all_results.json", "eval_results.json", "train_results.json",
        "trainer_state.json", "modules.json", "config_sentence_transformers.json", "1_Pooling/config.json",
        "0_Transformer/config.json",
        "0_Transformer/model.safetensors", "0_Transformer/sentence_bert_config.json", "0_Transformer/tokenizer.json",
        "0_Transformer/tokenizer_config.json",
    }  # fmt: skip
    assert sent == expected
    # ...while the folder also holds a Trainer checkpoint, which stays local.
    assert list(tiny_run.out.glob("checkpoint-*/model.safetensors"))


def test_pushed_card_is_ours_and_names_the_repo(tiny_run):
    card = tiny_run.hub.sent["README.md"].decode()
    assert "model-index" in card and "## Training recipe" in card
    # A bare --hub_model_id becomes the canonical id the Hub returned, and the snippet loads that.
    assert 'AutoModel.from_pretrained("someone/tiny-multitask", trust_remote_code=True)' in card
    assert "This model is a fine-tuned version of" not in card  # Trainer.create_model_card's wording


def test_push_to_hub_without_token_fails_before_training(tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch):
    import huggingface_hub

    import train

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    started = time.time()
    with pytest.raises(ValueError, match=r"Uploading to the Hub \(--push_to_hub\) needs a Hugging Face token"):
        train.main(_train_args(tiny_encoder_dir, tiny_data_dir, tmp_path / "o", "--push_to_hub", "true"))
    assert not (tmp_path / "o" / "metrics.json").exists()
    assert time.time() - started < 60


def test_push_cli_uploads_existing_run(tiny_run, tmp_path, monkeypatch):
    import hub

    folder = tmp_path / "run"
    shutil.copytree(tiny_run.out, folder)
    (folder / ".final.partial").mkdir()
    (folder / ".final.partial" / "model.safetensors").write_bytes(b"half-written")
    fake = FakeHubApi(folder, namespace="me")
    fake.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_cli_token")
    hub.main(["push", str(folder), "--hub_model_id", "me/cli-model"])
    assert [name for name, _ in fake.calls] == ["create_repo", "create_commit"]
    assert set(fake.sent) == set(tiny_run.hub.sent)  # same files; checkpoints and the staging folder stay local
    assert 'from_pretrained("me/cli-model"' in fake.sent["README.md"].decode()


def _planted_copy(tiny_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the run folder plus what a hostile or careless user leaves in it; returns (folder, secret)."""
    folder = tmp_path / "run"
    shutil.copytree(tiny_run.out, folder, symlinks=True)
    secret = tmp_path / "passwd"  # stands for /etc/passwd: a file outside the folder
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n", encoding="utf-8")
    (folder / "passwd").symlink_to(secret)
    (folder / "0_Transformer" / "vocab_extra.txt").symlink_to(secret)
    (folder / "notes.txt").write_text("token hf_secret_in_notes\n", encoding="utf-8")
    (folder / "wandb").mkdir()
    (folder / "wandb" / "run.log").write_text("wandb log\n", encoding="utf-8")
    return folder, secret


def test_push_uploads_only_the_files_the_run_wrote(tiny_run, tmp_path, monkeypatch, caplog):
    import hub

    folder, secret = _planted_copy(tiny_run, tmp_path)
    fake = FakeHubApi(folder, namespace="me")
    fake.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_cli_token")
    with caplog.at_level(logging.INFO, logger="hub"):
        hub.main(["push", str(folder), "--hub_model_id", "me/cli-model"])
    assert set(fake.sent) == set(tiny_run.hub.sent)  # the run's own files, nothing planted
    assert not [rel for rel, data in fake.sent.items() if b"root:x:0:0" in data or b"hf_secret" in data]
    # It says what it uploads and what it leaves out, before any call to the Hub.
    will = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Will upload"))
    assert f"Will upload {len(fake.sent)} files" in will and "0_Transformer/model.safetensors (" in will
    left = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Not uploaded"))
    for planted in ("passwd", "0_Transformer/vocab_extra.txt", "notes.txt", "wandb/", "checkpoint-4/"):
        assert planted in left


def test_push_refuses_a_listed_file_replaced_by_a_symlink(tiny_run, tmp_path, monkeypatch):
    import hub

    folder, secret = _planted_copy(tiny_run, tmp_path)
    (folder / "0_Transformer" / "tokenizer.json").unlink()
    (folder / "0_Transformer" / "tokenizer.json").symlink_to(secret)
    fake = FakeHubApi(folder)
    fake.install(monkeypatch)
    with pytest.raises(ValueError, match=r"refusing to upload .*: 0_Transformer/tokenizer\.json is a symbolic link "
                       rf"\(to {re.escape(str(secret))}\); a run writes regular files only.*Nothing was uploaded"):
        hub.push_folder(folder, "me/x", token="hf_x")
    assert fake.calls == [] and fake.sent == {}


def test_push_refuses_a_symlinked_subfolder_and_manifest_paths_outside(tiny_run, tmp_path, monkeypatch):
    import hub

    folder, _ = _planted_copy(tiny_run, tmp_path)
    fake = FakeHubApi(folder)
    fake.install(monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(folder / "1_Pooling", elsewhere)
    (folder / "1_Pooling").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match=r"1_Pooling is a symbolic link"):
        hub.push_folder(folder, "me/x", token="hf_x")
    (folder / "1_Pooling").unlink()
    shutil.move(elsewhere, folder / "1_Pooling")

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../passwd"] = {"size": 1, "sha256": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest lists '\.\./passwd', which is not a plain path inside the folder"):
        hub.push_folder(folder, "me/x", token="hf_x")
    (folder / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"has no manifest\.json listing the files the run wrote, so nothing is"):
        hub.push_folder(folder, "me/x", token="hf_x")
    assert fake.calls == []


def test_run_folder_manifest_lists_every_final_file_with_its_checksum(tiny_run):
    import checkpoints

    manifest = checkpoints.read_manifest(tiny_run.out)
    assert set(manifest) == set(tiny_run.hub.sent)
    for rel, entry in manifest.items():  # README.md was re-rendered by the push and its entry refreshed
        assert entry == {"size": (tiny_run.out / rel).stat().st_size,
                         "sha256": checkpoints.file_sha256(tiny_run.out / rel)}, rel  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# sentence-transformers
# ---------------------------------------------------------------------------------------------------------


def _pooled(model, tokenizer, texts) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).embeddings


def test_saved_folder_is_a_sentence_transformer(tiny_run):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from modeling_multitask import MultiTaskModel

    st = SentenceTransformer(str(tiny_run.out), device="cpu")
    assert getattr(st[0].auto_model, "pooler", None) is None  # built like the multi-task encoder, no BERT pooler
    model = MultiTaskModel.from_pretrained(tiny_run.out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run.out, trust_remote_code=True)
    got = st.encode(TEXTS, convert_to_tensor=True, batch_size=2)
    assert got.shape == (len(TEXTS), model.config.encoder["hidden_size"])
    assert got.sub(_pooled(model, tokenizer, TEXTS)).abs().max() <= 1e-5


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_export_sentence_transformers_matches_pooled_output(make_model, tiny_tokenizer, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    import hub

    model = make_model(pooling=pooling)
    with torch.no_grad():  # move the encoder off its init so a stale copy would show
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    names = hub.export_sentence_transformers(model, tiny_tokenizer, tmp_path / "st")
    assert sorted(names) == sorted(p.name for p in (tmp_path / "st").iterdir())
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    got = st.encode(TEXTS, convert_to_tensor=True)
    assert got.sub(_pooled(model, tiny_tokenizer, TEXTS)).abs().max() <= 1e-5


def test_export_option_writes_a_separate_folder(tiny_run, make_model, tiny_tokenizer, tmp_path):
    """--export_sentence_transformers DIR: the run folder stays lean, DIR is the sentence-transformers model."""
    from sentence_transformers import SentenceTransformer
    from transformers import TrainingArguments

    import outputs
    import train

    out, st_dir = tmp_path / "out", tmp_path / "st"
    model = make_model()
    args = TrainingArguments(output_dir=str(out), report_to="none")
    names = outputs.save_outputs(
        model, tiny_tokenizer, _saved_metrics(tiny_run.out), args, export_sentence_transformers=str(st_dir)
    )
    assert "modules.json" not in names and not (out / "0_Transformer").exists()
    assert "SentenceTransformer" not in (out / "README.md").read_text()
    got = SentenceTransformer(str(st_dir), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert got.sub(_pooled(model, tiny_tokenizer, TEXTS)).abs().max() <= 1e-5
    # Each folder's manifest lists exactly its own files: what `hub.py push` would upload from it.
    import checkpoints

    for folder in (out, st_dir):
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
        assert set(checkpoints.read_manifest(folder)) == files
    parsed = train.parse_args(["--output_dir", str(out), "--export_sentence_transformers", "none"])
    assert parsed[3].export_sentence_transformers == "none"


# ---------------------------------------------------------------------------------------------------------
# Cards of custom tasks and of older runs
# ---------------------------------------------------------------------------------------------------------


def _topic_split(folder: Path, split: str, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"{'a fine' if i % 2 else 'a dull'} film, take {i}" for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "label": [i % 2 for i in range(n)]}), folder / f"{split}.parquet")


def test_custom_task_card_has_its_description_dataset_and_metrics(tiny_encoder_dir, tmp_path):
    """A task defined only through --task_definitions gets a complete card: hub.py knows no task registry."""
    import train

    mirror = tmp_path / "mirror"
    _topic_split(mirror / "topic", "train", 32)
    _topic_split(mirror / "topic", "validation", 12)
    definition = {
        "name": "topic", "dataset": "someone/topic", "mirror": "topic", "text_column": "text",
        "label_column": "label", "label_names": ["dull", "fine"], "eval_split": "validation",
    }  # fmt: skip
    out = tmp_path / "out"
    metrics = train.main(
        [
            "--encoder", str(tiny_encoder_dir), "--data_dir", str(mirror), "--output_dir", str(out),
            "--tasks", "topic", "--task_definitions", json.dumps([definition]), "--max_seq_length", "32",
            "--per_device_train_batch_size", "8", "--max_steps", "2", "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    saved = _saved_metrics(out)
    assert saved["tasks"][0]["description"] == "Custom task from someone/topic (text -> label)."
    assert saved["tasks"][0]["sources"] == [
        {"dataset": "someone/topic", "split": "train", "display": "someone/topic train", "local": False}
    ]
    assert saved["eval_sets"]["topic"] == {
        "task": "topic", "rows": 12, "dataset": "someone/topic", "dataset_name": "someone/topic validation",
        "split": "validation", "transform": None, "labels": "gold",
    }  # fmt: skip
    card = (out / "README.md").read_text()
    meta, body = card.split("\n---\n", 1)
    assert "someone/topic" in meta.split("datasets:", 1)[1]
    assert "| `topic` | `0` dull, `1` fine | Custom task from someone/topic (text -> label). | someone/topic train |" in body
    final = metrics["final"]["topic"]
    assert "| `topic` | topic | someone/topic validation | 12 |" in body
    assert f"**{final['accuracy']:.4f}**" in body and f"**{final['f1']:.4f}**" in body
    assert f"value: {final['accuracy']}" in meta  # the model-index carries metrics.json's number


def test_custom_task_from_the_documented_config_gets_card_model_index_and_predictions(
    tiny_encoder_dir, tmp_path, monkeypatch, capsys
):
    """The route of docs/training.md#custom-tasks: CSV files of class names under data/trec_coarse/, then
    configs/custom_task.yaml as it is (only the encoder, the output folder and the length of the run changed)."""
    import csv

    import predict
    import train

    classes = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "trec_coarse"
    folder.mkdir(parents=True)
    for split, n in (("train", 36), ("test", 12)):
        with open(folder / f"{split}.csv", "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["text", "label"])
            writer.writerows([f"what is the {classes[i % 6].lower()} of item {i} ?", classes[i % 6]] for i in range(n))
    out = tmp_path / "runs" / "topic"
    metrics = train.main(
        [
            str(ROOT / "configs" / "custom_task.yaml"), "--encoder", str(tiny_encoder_dir), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert list(config["tasks"][0]["id2label"].values()) == classes  # the sorted class names of the training file
    final = metrics["final"]["topic"]
    assert {"precision_macro", "recall_macro", "f1"} | {f"f1_{i}" for i in range(6)} <= set(final)

    card = (out / "README.md").read_text()
    meta, body = card.split("\n---\n", 1)
    assert "datasets:" not in meta  # local files, no Hub dataset id: nothing to list as training data
    index = meta.split("model-index:", 1)[1]
    assert "type: topic" in index and "split: test" in index and "split: validation" not in index
    assert f"value: {final['accuracy']}" in index
    assert "| `topic` |" in body and "Custom task" in body and "| - |" not in body
    assert "One sentence encoder, 1 classifier:" in body

    capsys.readouterr()
    assert predict.main([str(out), "how far is the moon ?"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["text"] == "how far is the moon ?" and line["topic"]["label"] in classes
    assert 0.0 <= line["topic"]["score"] <= 1.0


def test_card_renders_from_a_metrics_file_without_task_descriptions(tiny_run, tmp_path):
    """metrics.json written before the card info travelled in it: the card still renders, with blanks."""
    import hub

    folder = tmp_path / "old"
    shutil.copytree(tiny_run.out, folder, ignore=shutil.ignore_patterns("checkpoint-*", "0_Transformer"))
    metrics = _saved_metrics(folder)
    for task in metrics["tasks"]:
        del task["description"], task["sources"]
    for entry in metrics["eval_sets"].values():
        del entry["dataset"], entry["dataset_name"], entry["split"]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    hub.render_card(folder, model_id="someone/old-run")
    text = (folder / "README.md").read_text()
    assert "| `sentiment` | sentiment | sentiment |" in text  # the eval set's own name stands in for its dataset
    assert "someone/old-run" in text


def test_a_task_from_local_files_is_not_listed_as_hub_training_data(tmp_path):
    """A custom task read from its own file, with no `dataset:` id, is named by the task on the card and is not
    listed under `datasets:` (which the Hub reads as Hub training data); one with an id is."""
    import data as mtdata
    import hub
    import outputs

    csv = tmp_path / "train.csv"
    csv.write_text("question,coarse\nwhat is it ?,DESC\nhow far is it ?,NUM\n", encoding="utf-8")
    definition = {"name": "topic", "text_column": "question", "label_column": "coarse", "train_file": str(csv)}
    local = outputs.task_card_info(mtdata.parse_task_definitions([definition])["topic"])
    assert local["sources"][0]["dataset"] == "topic" and local["sources"][0]["local"]
    named = outputs.task_card_info(mtdata.parse_task_definitions([{**definition, "dataset": "me/topic"}])["topic"])
    assert not named["sources"][0]["local"]
    sentiment = outputs.task_card_info(mtdata.TASKS["sentiment"])
    assert hub.training_datasets({"tasks": [local, sentiment]}) == ["stanfordnlp/sst2"]
    assert hub.training_datasets({"tasks": [named, sentiment]}) == ["me/topic", "stanfordnlp/sst2"]
