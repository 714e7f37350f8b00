"""Two processes through `accelerate launch` on this CPU-only machine (DDP over gloo), against one process.

What should match: two ranks with per-device batch B take, per optimiser step, the global batches 2k and 2k+1
of the sampler's list and average their gradients. One process with batch B and gradient_accumulation_steps 2
takes the same two batches and averages the same two gradients. Without dropout (whose random masks differ
between the setups) the two runs are the same computation up to float32 summation order, so the weights agree
to ~1e-7 and the evaluation is identical; we allow 1e-5 on weights and eval loss and require equal accuracy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_argv
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TWO_PROCESSES = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"


@pytest.fixture(scope="module")
def no_dropout_encoder(tiny_encoder_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-encoder-no-dropout")
    for item in tiny_encoder_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher_flags: list[str], train_flags: list[str], log: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # train.py must find gloo itself
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if launcher_flags:
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_flags, "train.py", *train_flags]
    else:
        command = [sys.executable, "train.py", *train_flags]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log.write_text(result.stdout + result.stderr, encoding="utf-8")
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-4000:]}"
    return result.stdout + result.stderr


def assert_one_finished_model(output_dir: Path) -> dict:
    # One model: model.safetensors, plus its encoder re-saved for sentence-transformers in 0_Transformer/.
    weights = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*.safetensors"))
    assert weights == ["0_Transformer/model.safetensors", "model.safetensors"]
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / ".final.partial").exists()
    return json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))


def test_two_processes_match_one_process_with_accumulation(tmp_path, no_dropout_encoder, tiny_data_dir):
    # Frozen parameters, learned loss weights and single-task batches (every step lacks one task on each rank)
    # all under DDP with find_unused_parameters=False; two epochs, so the sampler must reach epoch 1 on both.
    flags = [
        "--classifier_dropout", "0",
        "--num_train_epochs", "2",
        "--freeze", "layers:0",
        "--loss_weighting", "uncertainty",
        "--loss_weights_learning_rate", "0.01",
        "--ddp_find_unused_parameters", "false",
        "--logging_steps", "4",
    ]  # fmt: skip
    two = tmp_path / "two"
    log = launch(
        ["--config_file", str(TWO_PROCESSES), "--main_process_port", str(free_port())],
        tiny_argv(no_dropout_encoder, tiny_data_dir, two, *flags),
        tmp_path / "two.log",
    )
    one = tmp_path / "one"
    accumulate = ["--gradient_accumulation_steps", "2"]
    launch([], tiny_argv(no_dropout_encoder, tiny_data_dir, one, *flags, *accumulate), tmp_path / "one.log")

    metrics_two, metrics_one = assert_one_finished_model(two), assert_one_finished_model(one)
    assert metrics_two["recipe"]["num_processes"] == 2 and metrics_one["recipe"]["num_processes"] == 1
    # 128 rows, batch 8: 16 global batches per epoch, 8 optimiser steps per epoch in both setups.
    assert metrics_two["train"]["global_steps"] == metrics_one["train"]["global_steps"] == 16
    assert [int(e) for e in re.findall(r"Task sampler: \w+, epoch (\d+)", log)] == [0, 1]

    weights_two, weights_one = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-5, msg=name)
    assert not torch.equal(weights_two["loss_log_vars"], torch.zeros(2))  # the learned weights did train
    for eval_set, values in metrics_one["final"].items():
        assert metrics_two["final"][eval_set]["accuracy"] == values["accuracy"]
        assert metrics_two["final"][eval_set]["loss"] == pytest.approx(values["loss"], abs=1e-5)
    for task, weight in metrics_one["train"]["loss_weights"].items():
        assert metrics_two["train"]["loss_weights"][task] == pytest.approx(weight, abs=1e-5)


def test_multi_gpu_flag_runs_two_cpu_processes(tmp_path, tiny_encoder_dir, tiny_data_dir):
    # The command from the README, verbatim: on a machine without GPUs train.py asks accelerate for gloo.
    out = tmp_path / "run"
    log = launch(
        ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())],
        tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--max_steps", "3", "--task_sampling", "temperature"),
        tmp_path / "run.log",
    )
    assert "Process rank 1" in log and "distributed True" in log
    metrics = assert_one_finished_model(out)
    assert metrics["recipe"]["num_processes"] == 2 and metrics["train"]["global_steps"] == 3


def test_nan_on_one_rank_stops_every_rank_with_the_same_error(tmp_path, tiny_encoder_dir, tiny_data_dir):
    # Round robin over two ranks: rank 0 gets the sentiment batches, rank 1 the question batches. A NaN question
    # head in process 1 alone used to stop that process only; process 0, inside DDP's gradient all-reduce, then
    # died of gloo's "Connection closed by peer" (here; a collective can also wait for its timeout), which names
    # neither the step nor the task. Now both stop before the first optimizer step, with the same error.
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MT_NAN_HEAD="question:1")  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(TWO_PROCESSES), "--main_process_port", str(free_port()),
        str(ROOT / "tests" / "fault_runner.py"),
        *tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--task_sampling", "round_robin", "--max_steps", "4"),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"a NaN on one rank left the run hanging for 300 s:\n{output[-4000:]}")
    (tmp_path / "run.log").write_text(output, encoding="utf-8")
    assert process.returncode != 0, output[-4000:]
    error = (
        r"FloatingPointError: Non-finite training loss \(nan\) at step 1 on task\(s\) \['question'\] "
        r"\(per-task: \{'question': nan\}\) in process 1 of 2\."
    )
    tracebacks = re.findall(r"\[rank(\d)\]: " + error, output)
    assert sorted(tracebacks) == ["0", "1"], output[-4000:]
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
