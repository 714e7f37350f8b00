from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import checks
import freezing
import train
from helpers import tiny_argv

ROOT = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


# ---- arguments ----


def test_yaml_gives_defaults_and_flags_override(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"learning_rate": 1e-4, "max_seq_length": 40, "tasks": ["sentiment"]})
    model_args, data_args, question_args, mt_args, training_args = train.parse_args(
        [config, "--learning_rate", "3e-5", "--output_dir", str(tmp_path / "out")]
    )
    assert training_args.learning_rate == 3e-5
    assert data_args.max_seq_length == 40
    assert data_args.tasks == ["sentiment"]
    assert training_args.output_dir == str(tmp_path / "out")


def test_config_flag_form_and_task_weight_mapping(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"task_weights": {"sentiment": 1.0, "question": 0.5}})
    _, _, _, mt_args, _ = train.parse_args(["--config", config])
    assert mt_args.weights() == {"sentiment": 1.0, "question": 0.5}


def test_yaml_unknown_key_is_rejected_with_a_suggestion(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"learning_rte": 1e-4})
    with pytest.raises(ValueError, match=r"c\.yaml: unknown key 'learning_rte'\. Did you mean 'learning_rate'\?"):
        train.parse_args([config])


def test_unknown_cli_flag_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="learning_rte"):
        train.parse_args(["--learning_rte", "1e-4"])


def test_shipped_configs_parse():
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        train.parse_args([str(config)])


def test_bad_task_weight_entry():
    _, _, _, mt_args, _ = train.parse_args(["--task_weights", "sentiment:2"])
    with pytest.raises(ValueError, match=r"task_weights entry 'sentiment:2' must look like name=weight"):
        mt_args.weights()


# ---- freezing (the full behaviour tests live in test_freezing.py) ----


def test_freeze_lower_layers_by_fraction(make_model):
    model = make_model()  # 2 layers
    trainable, total = freezing.apply_freezing(model, ["embeddings", "layers:0-5/12"])
    layers = freezing.encoder_layers(model)
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not any(p.requires_grad for p in model.encoder.embeddings.parameters())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < total


def test_freeze_all_then_unfreeze_heads_is_a_linear_probe(make_model):
    model = make_model()
    trainable, _ = freezing.apply_freezing(model, ["all"], ["heads"])
    assert trainable == sum(p.numel() for p in model.heads.parameters())


def test_freeze_errors_name_the_fix(make_model):
    with pytest.raises(ValueError, match=r"layer range 7-11 does not fit a 2-layer encoder.*'layers:0-6/12'"):
        freezing.apply_freezing(make_model(), ["layers:7-11"])
    with pytest.raises(ValueError, match=r"no task 'topic'; this model's tasks are \['sentiment', 'question'\]"):
        freezing.apply_freezing(make_model(), ["head:topic"])
    with pytest.raises(ValueError, match="leaves nothing to train"):
        freezing.apply_freezing(make_model(), ["all"])


# ---- end to end ----


def tiny_run_args(encoder, data_dir, output_dir, *extra):
    return [
        str(ROOT / "configs" / "quick.yaml"),
        "--encoder", str(encoder),
        "--data_dir", str(data_dir),
        "--output_dir", str(output_dir),
        "--max_train_samples", "96",
        "--question_pool_per_source", "60",
        "--max_eval_samples", "40",
        "--max_seq_length", "32",
        "--per_device_train_batch_size", "8",
        "--num_train_epochs", "2",
        "--learning_rate", "1e-3",
        "--logging_steps", "4",
        "--dataloader_num_workers", "0",
        *extra,
    ]  # fmt: skip


def test_train_end_to_end_in_process(tiny_encoder_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    metrics = train.main(tiny_run_args(tiny_encoder_dir, tiny_data_dir, out))

    for name in ("config.json", "model.safetensors", "tokenizer.json", "modeling_multitask.py", "metrics.json"):
        assert (out / name).is_file(), name
    for plot in ("loss_curves.png", "accuracy_curves.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".final.partial").exists()

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["final"] == json.loads(json.dumps(metrics["final"]))
    assert set(saved["final"]) == {"sentiment", "question", "question_gold", "question_gold_noqm"}
    for name, values in saved["final"].items():
        assert {"accuracy", "f1", "loss", "precision", "recall"} <= set(values), name
        assert 0.0 <= values["accuracy"] <= 1.0
    assert set(saved["before"]) == set(saved["final"])
    # One row per epoch, with per-task training loss/accuracy and every eval set.
    assert [row["epoch"] for row in saved["epochs"]] == [1.0, 2.0]
    for row in saved["epochs"]:
        assert set(row["train"]) == {"sentiment", "question"}
        assert set(row["eval"]) == set(saved["final"])
        assert row["train"]["sentiment"]["loss"] > 0
    assert saved["train"]["rows_per_task"] == {"sentiment": 96, "question": 96}
    assert saved["heuristics"]["question_gold"]["heuristic"]["accuracy"] > 0.5
    config = json.loads((out / "config.json").read_text())
    assert [t["name"] for t in config["tasks"]] == ["sentiment", "question"]
    assert config["tasks"][1]["id2label"] == {"0": "not_question", "1": "question"}


def test_pad_to_buckets_reaches_every_batch(tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch):
    import data as mtdata

    widths = []
    padded_width = mtdata.MultiTaskCollator.padded_width
    monkeypatch.setattr(
        mtdata.MultiTaskCollator, "padded_width", lambda self, n: widths.append(padded_width(self, n)) or widths[-1]
    )
    args = tiny_run_args(tiny_encoder_dir, tiny_data_dir, tmp_path / "run", "--pad_to_buckets", "32", "8", "16")
    train.main([*args, "--num_train_epochs", "1", "--gold_eval", "false"])
    # max_seq_length is 32, so every batch, training and evaluation, has one of the three bucket lengths.
    assert len(widths) > 10 and set(widths) <= {8, 16, 32}


@pytest.mark.integration
def test_accelerate_launch_with_the_packaged_encoder(tiny_data_dir, tmp_path):
    """The README's entry point, on the real MiniLM and a few hundred real rows."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
        str(ROOT / "train.py"), str(ROOT / "configs" / "quick.yaml"),
        "--data_dir", str(tiny_data_dir),
        "--output_dir", str(out),
        "--max_train_samples", "256",
        "--question_pool_per_source", "100",
        "--max_eval_samples", "100",
        "--max_steps", "12",
        "--per_device_train_batch_size", "16",
        "--eval_strategy", "no",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["global_steps"] == 12
    assert metrics["recipe"]["encoder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert metrics["train"]["total_parameters"] > 22_000_000
    # Trained for a few steps on easy data: the question head already beats chance on its held-out split.
    assert metrics["final"]["question"]["accuracy"] > metrics["before"]["question"]["accuracy"]
    assert (out / "model.safetensors").stat().st_size > 80_000_000
    assert "Parameters: 22,566,916 trainable of 22,566,916 total" in result.stdout + result.stderr


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_readme_launch_uses_every_core_of_a_cpu_machine(tiny_encoder_dir, tiny_data_dir, tmp_path):
    # `accelerate launch train.py ...` without a GPU sets OMP_NUM_THREADS=1 for its one process; the run must
    # still use the machine (it used one core of two before, 10 min for the quick config).
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", str(ROOT / "train.py"),
               *tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--max_steps", "2")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ACCELERATE_USE_CPU")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["hardware"].endswith(f"torch threads {_available_cores()})")
    if _available_cores() > 1:
        assert "accelerate launch set OMP_NUM_THREADS=1 for this single CPU process" in result.stdout


@pytest.mark.parametrize(
    "env, changed",
    [
        ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}, True),  # accelerate launch, one process
        ({"OMP_NUM_THREADS": "1"}, False),  # python train.py: the user's OMP_NUM_THREADS stands
        ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}, False),  # shared cores
        ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "2"}, False),  # a count the user chose
    ],
    ids=["accelerate-one-process", "plain-python", "two-processes", "chosen-count"],
)
def test_lone_cpu_process_threads(monkeypatch, env, changed):
    for key in ("ACCELERATE_DYNAMO_BACKEND", "OMP_NUM_THREADS", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        note = checks.use_every_core_in_a_lone_cpu_process()
        if changed and _available_cores() > 1:
            assert torch.get_num_threads() == _available_cores() and "OMP_NUM_THREADS=1" in note
        else:
            assert torch.get_num_threads() == 1 and note is None
    finally:
        torch.set_num_threads(before)
