"""outputs.py: metrics per eval set and the per-epoch table, kept apart when one set's name extends another's."""

from __future__ import annotations

from outputs import epoch_table, split_eval_metrics


def test_eval_sets_sharing_a_prefix_stay_apart():
    """'question' is a prefix of 'question_gold': its metrics must not absorb the gold set's keys."""
    flat = {"eval_question_accuracy": 0.5, "eval_question_gold_accuracy": 0.9, "eval_question_gold_noqm_f1": 0.7,
            "eval_question_runtime": 1.0, "epoch": 1.0}  # fmt: skip
    split = split_eval_metrics(flat, ["question", "question_gold", "question_gold_noqm"])
    assert split == {"question": {"accuracy": 0.5}, "question_gold": {"accuracy": 0.9}, "question_gold_noqm": {"f1": 0.7}}


def test_eval_set_names_that_extend_another_do_not_leak_into_it():
    # 'question' is a prefix of 'question_gold': each set keeps only its own metrics, or plot_curves would meet
    # a 'question' row holding only 'gold_*' keys.
    names = ["question", "question_gold", "question_gold_noqm"]
    logs = [
        {"eval_question_loss": 0.1, "eval_question_accuracy": 0.9, "epoch": 1.0},
        {"eval_question_gold_loss": 0.5, "eval_question_gold_accuracy": 0.8, "epoch": 1.0},
        {"eval_question_gold_noqm_loss": 0.7, "eval_question_gold_noqm_accuracy": 0.7, "epoch": 1.0},
    ]
    row = epoch_table(logs, names, ["question"])[0]
    assert row["eval"] == {
        "question": {"loss": 0.1, "accuracy": 0.9},
        "question_gold": {"loss": 0.5, "accuracy": 0.8},
        "question_gold_noqm": {"loss": 0.7, "accuracy": 0.7},
    }
    flat = {k: v for entry in logs for k, v in entry.items()}
    assert split_eval_metrics(flat, names)["question"] == {"loss": 0.1, "accuracy": 0.9}


# ---------------------------------------------------------------------------------------------------------
# A whole run's outputs (tiny encoder, small mirror): metrics.json, result files, plots, logs, trackers
# ---------------------------------------------------------------------------------------------------------

import json  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402
from helpers import run_main, tiny_argv  # noqa: E402

RUN_FLAGS = ("--gold_eval", "true", "--eval_before_training", "true", "--eval_strategy", "epoch",
             "--num_train_epochs", "1", "--logging_steps", "2", "--question_teacher", "dialog",
             "--question_trap_rows", "7", "--question_strip_qmark_prob", "0.25", "--max_gold_eval_samples", "40",
             "--disable_tqdm", "false")  # fmt: skip


@pytest.fixture(scope="module")
def one_epoch_run(tiny_encoder_dir, tiny_data_dir, tmp_path_factory):
    """A one-epoch run with every evaluation (before, after the epoch), the gold sets capped, logs captured."""
    import io
    import sys

    out = tmp_path_factory.mktemp("one-epoch") / "out"
    records, stderr = [], io.StringIO()

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = Keep(level=logging.INFO)
    logging.getLogger().addHandler(keep)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stderr", stderr)  # tqdm bars and transformers' own warnings
        try:
            trainer, metrics = run_main(mp, tiny_argv(tiny_encoder_dir, tiny_data_dir, out, *RUN_FLAGS))
        finally:
            logging.getLogger().removeHandler(keep)
    messages = [r.getMessage() for r in records]
    return type("Run", (), dict(out=out, trainer=trainer, metrics=metrics, messages=messages, stderr=stderr.getvalue()))


def test_metrics_record_the_runs_own_teacher_pool_options_and_setup(one_epoch_run, tiny_data_dir):
    metrics = json.loads((one_epoch_run.out / "metrics.json").read_text())
    question = next(t for t in metrics["tasks"] if t["name"] == "question")
    assert question["teacher"] == "dialog" and question["headline_metric"] == "f1_pos"
    options = question["pool_options"]
    assert options["question_trap_rows"] == 7 and options["question_strip_qmark_prob"] == 0.25
    assert options["question_pool_per_source"] == 60 and options["question_teacher"] == "dialog"
    sentiment = next(t for t in metrics["tasks"] if t["name"] == "sentiment")
    assert sentiment["headline_metric"] == "accuracy" and "teacher" not in sentiment
    recipe = metrics["recipe"]
    assert (recipe["mixed_precision"], recipe["distributed_type"], recipe["num_processes"]) == ("no", "NO", 1)
    assert recipe["max_gold_eval_samples"] == 40 and recipe["max_eval_samples"] == 32
    assert recipe["max_seq_length"] == 32  # tiny_argv's: the value bench/seed_soup.py scores with
    assert recipe["data_dir"] == str(tiny_data_dir)  # where the data came from (None: the Hub)
    held = metrics["eval_sets"]["question"]
    assert (held["dataset"], held["split"], held["labels"]) == ("question-pool-heldout", "heldout", "teacher")
    assert "`dialog` teacher" in held["dataset_name"]
    assert metrics["eval_sets"]["question_gold_noqm"]["transform"] == "strip_question_marks"


def test_hardware_names_the_processor_model(tmp_path, monkeypatch):
    import torch

    import outputs

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n")
    real_path = outputs.Path
    monkeypatch.setattr(outputs, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert outputs.cpu_name() == "Intel(R) Xeon(R) Processor"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert outputs.hardware_summary().startswith("CPU (Intel(R) Xeon(R) Processor, ")
    monkeypatch.setattr(outputs, "Path", lambda p: tmp_path / "missing")  # no /proc: the platform's word
    assert outputs.cpu_name() == (outputs.platform.processor() or outputs.platform.machine())


def test_gold_sets_are_capped_by_a_stratified_seeded_sample(one_epoch_run, tiny_data_dir):
    import pandas as pd

    metrics = json.loads((one_epoch_run.out / "metrics.json").read_text())
    gold = pd.read_parquet(tiny_data_dir / "dailydialog" / "validation.parquet")
    for name in ("question_gold", "question_gold_noqm"):
        entry = metrics["eval_sets"][name]
        assert entry["rows"] == 40
        assert entry["capped"] == {"of": len(gold), "how": "max_gold_eval_samples, seeded stratified"}
    # the other sets keep their own cap (max_eval_samples) and say so
    assert metrics["eval_sets"]["sentiment"]["capped"]["how"] == "max_eval_samples, seeded random"
    trainer = one_epoch_run.trainer
    labels = trainer.eval_dataset["question_gold"]["labels"]
    assert round(sum(labels)) == round(40 * gold["is_question"].mean())  # the class shares are kept
    # both variants hold the same rows: the no-'?' set is the gold set's text with its '?' removed
    assert trainer.eval_dataset["question_gold_noqm"]["labels"] == labels
    card = (one_epoch_run.out / "README.md").read_text()
    row = f"| `question_gold` | question | DailyDialog validation | 40 of {len(gold)} (capped: max_gold_eval_samples, seeded stratified) | gold |"
    assert row in card
    assert f"on `question_gold` (DailyDialog validation, 40 of {len(gold)} rows)" in card


def test_stratified_subsample_keeps_shares_order_and_seed():
    from data import _stratified_subsample

    texts = [f"t{i}" for i in range(100)]
    labels = [1 if i % 4 == 0 else 0 for i in range(100)]  # 25 % positives
    got_texts, got_labels = _stratified_subsample(texts, labels, 20, seed=3)
    assert len(got_texts) == 20 and sum(got_labels) == 5
    assert got_texts == sorted(got_texts, key=lambda t: int(t[1:]))  # original order
    assert _stratified_subsample(texts, labels, 20, seed=3) == (got_texts, got_labels)
    assert _stratified_subsample(texts, labels, 20, seed=4)[0] != got_texts
    assert _stratified_subsample(texts, labels, None, seed=3) == (texts, labels)
    # largest remainders: 7 rows of a 3:1 set give 5 + 2 (5.25 and 1.75)
    assert sum(_stratified_subsample(texts, labels, 7, seed=0)[1]) == 2


def test_max_gold_eval_samples_must_be_positive():
    import train

    with pytest.raises(ValueError, match="max_gold_eval_samples must be a positive number"):
        train.DataArguments(max_gold_eval_samples=0)


def test_steps_hold_every_logging_step_per_task(one_epoch_run):
    metrics = one_epoch_run.metrics
    trainer = one_epoch_run.trainer
    logged = [e for e in trainer.state.log_history if "loss" in e and "step" in e]
    assert [row["step"] for row in metrics["steps"]] == [e["step"] for e in logged]
    assert len(metrics["steps"]) == trainer.state.global_step // 2 >= 4  # logging_steps 2, one epoch
    for row, entry in zip(metrics["steps"], logged):
        for task in ("sentiment", "question"):
            if f"train_{task}_loss" in entry:
                assert row["tasks"][task] == {"loss": entry[f"train_{task}_loss"],
                                              "accuracy": entry[f"train_{task}_accuracy"]}  # fmt: skip


def test_plots_draw_every_logging_step_and_every_eval_set(one_epoch_run, tmp_path, monkeypatch):
    """loss/accuracy: a training line with one point per logging step; loss/accuracy/F1: a point per evaluation
    (before training + after the epoch) for every eval set of the task."""
    import matplotlib.axes

    import outputs

    drawn = []
    original = matplotlib.axes.Axes.plot

    def spy(self, xs, ys, *args, **kwargs):
        drawn.append((self.get_title() or None, kwargs.get("label"), list(xs), list(ys)))
        return original(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    metrics = one_epoch_run.metrics
    assert outputs.plot_curves(metrics, tmp_path) == ["loss_curves.png", "accuracy_curves.png", "f1_curves.png"]
    for name in ("loss_curves.png", "accuracy_curves.png", "f1_curves.png"):
        assert (tmp_path / name).stat().st_size > 10_000
        assert (one_epoch_run.out / name).is_file()
    train_lines = [d for d in drawn if d[1] and d[1].startswith("train")]
    question_steps = [r for r in metrics["steps"] if "question" in r["tasks"]]
    assert len(train_lines) == 4  # loss and accuracy, per task; no training F1
    assert any(len(d[2]) == len(question_steps) > 2 for d in train_lines)
    eval_lines = [d for d in drawn if d[1] and d[1].startswith("eval ")]
    assert len(eval_lines) == 3 * len(metrics["eval_sets"])  # loss, accuracy, F1 of each set
    gold_f1 = next(d for d in eval_lines if d[1] == "eval question_gold" and d[3][-1] == metrics["final"]["question_gold"]["f1"])
    assert gold_f1[2] == [0.0, 1.0] and gold_f1[3][0] == metrics["before"]["question_gold"]["f1"]


def test_result_files_follow_the_trainers_save_metrics_convention(one_epoch_run):
    from transformers import TrainerState

    out, metrics = one_epoch_run.out, one_epoch_run.metrics
    train_results = json.loads((out / "train_results.json").read_text())
    eval_results = json.loads((out / "eval_results.json").read_text())
    all_results = json.loads((out / "all_results.json").read_text())
    assert all_results == {**train_results, **eval_results}
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"):
        assert train_results[key] == metrics["train"]["trainer_metrics"][key]
    assert train_results["train_samples"] == sum(metrics["train"]["rows_per_task"].values())
    for name, values in metrics["final"].items():
        for key, value in values.items():
            assert eval_results[f"eval_{name}_{key}"] == value
        assert eval_results[f"eval_{name}_samples"] == metrics["eval_sets"][name]["rows"]
    state = TrainerState.load_from_json(str(out / "trainer_state.json"))
    assert state.global_step == one_epoch_run.trainer.state.global_step
    assert state.log_history == json.loads(json.dumps(one_epoch_run.trainer.state.log_history))


def test_log_states_before_metrics_and_precision(one_epoch_run):
    before = one_epoch_run.metrics["before"]
    for name, values in before.items():
        line = f"before training {name}: {({k: round(v, 4) for k, v in values.items()})}"
        assert line in one_epoch_run.messages, name
    assert "Mixed precision no (default), distributed type NO, 1 process(es)" in one_epoch_run.messages
    assert any("mixed precision no (TrainingArguments bf16 False, fp16 False)" in m for m in one_epoch_run.messages)


def test_every_progress_bar_is_named_and_no_avoidable_warning(one_epoch_run):
    import re

    bars = re.findall(r"(?:^|[\r\n])([^\r\n|]*?)\s*\d+%\|", one_epoch_run.stderr)
    assert bars, one_epoch_run.stderr[:500]
    names = {b.strip().rstrip(":") for b in bars if not b.strip().startswith(("Tokenizing", "Generating", "Loading", "Writing", "Map"))}
    assert names == {
        "train", "eval sentiment", "eval question", "eval question_gold", "eval question_gold_noqm",
        "eval question_swda", "eval question_swda_noqm",
    }
    assert "PAD/BOS/EOS" not in one_epoch_run.stderr + "\n".join(one_epoch_run.messages)


def test_precision_and_distribution_read_accelerate(make_trainer, monkeypatch):
    trainer = make_trainer()
    assert trainer.precision_and_distribution() == {
        "mixed_precision": "no", "mixed_precision_from": "default", "distributed_type": "NO", "num_processes": 1,
    }  # fmt: skip
    # accelerate's launch config asked for FSDP; without a GPU accelerate runs plain data parallelism.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    info = trainer.precision_and_distribution()
    assert "FSDP was requested but accelerate runs NO (no GPU on this machine)" in info["fsdp_fallback"]


def test_accelerate_config_mixed_precision_is_what_the_log_and_card_say(
    tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch, caplog
):
    """A launch config's `mixed_precision: bf16` autocasts although TrainingArguments say bf16 False."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state()
    try:
        with caplog.at_level(logging.INFO, logger="train"):
            argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "run", "--max_steps", "2")
            trainer, metrics = run_main(monkeypatch, argv)
            assert trainer.args.bf16 is False and trainer.accelerator.mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state()
    assert "Mixed precision bf16 (accelerate config)" in caplog.text
    assert (metrics["recipe"]["mixed_precision"], metrics["recipe"]["mixed_precision_from"]) == ("bf16", "accelerate config")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| Mixed precision | bf16 autocast (set by the accelerate config) |" in card


def test_one_process_launch_config_passes_every_value(caplog):
    """`accelerate launch` without a config warns that it filled in defaults; one_process.yaml leaves none out."""
    from pathlib import Path

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "one_process.yaml"
    with caplog.at_level(logging.WARNING, logger="accelerate.commands.launch"):
        _validate_launch_command(launch_command_parser().parse_args(["train.py"]))
    assert "were not passed to `accelerate launch`" in caplog.text  # what the config is for
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="accelerate.commands.launch"):
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "train.py"]))
    assert "were not passed" not in caplog.text
    assert (args.num_processes, args.mixed_precision, args.multi_gpu) == (1, "no", False)


def test_tensorboard_tracker_records_the_logs(tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch):
    """--report_to tensorboard (installed, works offline): every training log and eval metric becomes a scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    flags = ("--max_steps", "4", "--report_to", "tensorboard", "--eval_strategy", "steps", "--eval_steps", "4")
    trainer, metrics = run_main(monkeypatch, tiny_argv(tiny_encoder_dir, tiny_data_dir, out, *flags))
    events = list(out.glob("runs/**/events.out.tfevents.*"))
    assert events, sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    tags = {}
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags[tag] = [e.value for e in acc.Scalars(tag)]
    assert len(tags["train/loss"]) == 4  # logging_steps 1
    assert tags["train/train_sentiment_loss"] and tags["train/train_question_accuracy"]
    assert tags["eval/sentiment_accuracy"][-1] == pytest.approx(metrics["final"]["sentiment"]["accuracy"])
    assert metrics["recipe"]["report_to"] == ["tensorboard"]
    import hub

    assert "runs" not in hub.uploadable_names(out)  # tracker logs stay local
