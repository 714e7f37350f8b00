"""train.py: arguments from YAML and flags (unknown keys refused), and in-process end-to-end runs of `main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import train

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
    assert set(saved["final"]) == {
        "sentiment", "question", "question_gold", "question_gold_noqm", "question_swda", "question_swda_noqm"
    }
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


def test_duplicate_yaml_keys_are_refused_naming_key_and_line(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("learning_rate: 1.0e-4\nmax_seq_length: 40\nlearning_rate: 3.0e-4\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dup\.yaml: duplicate key 'learning_rate' at line 3 \(first at line 1\); "
                       r"YAML would keep only the last value\. Remove one of them"):  # fmt: skip
        train.parse_args([str(config)])
    config.write_text(
        "tasks: [topic]\n"
        "task_definitions:\n"
        "  - name: topic\n"
        "    dataset: someone/topic\n"
        "    text_column: text\n"
        "    label_column: label\n"
        "    label_names: [a, b]\n"
        "    text_column: sentence\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r"dup\.yaml: duplicate key 'text_column' at line 8 \(first at line 5\)"):
        train.parse_args([str(config)])


def test_yaml_merge_keys_still_override(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(
        "x_defaults: &defaults {learning_rate: 1.0e-4, max_seq_length: 40}\n"
        "<<: *defaults\n"
        "learning_rate: 3.0e-4\n",
        encoding="utf-8",
    )
    values = yaml.load(config.read_text(), Loader=train.UniqueKeyLoader)
    assert values["learning_rate"] == 3.0e-4 and values["max_seq_length"] == 40
