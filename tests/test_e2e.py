"""End-to-end runs of train.py in their own processes, through `accelerate launch` or tests/fault_runner.py.

- Faults: killed runs resume exactly (once their stale lock is cleared), a kill mid-checkpoint is harmless, no
  network, no pickle. fault_runner.py
  can hang a run at a chosen point so that the test can SIGKILL it there (tiny encoder, tiny mirror, 10 steps,
  a checkpoint every 4).
- Two processes (DDP over gloo on this CPU-only machine) against one process with gradient accumulation: two
  ranks with per-device batch B take, per optimiser step, the global batches 2k and 2k+1 of the sampler's list
  and average their gradients, as one process with batch B and accumulation 2 does. Without dropout the runs
  agree to float32 summation order: 1e-5 on weights and eval loss, equal accuracy.
- The packaged MiniLM encoder under `accelerate launch`, and the README's launch using every core.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import available_cores, tiny_argv
from safetensors import safe_open
from safetensors.torch import load_file

import checkpoints
import checks
import run_folder
import train

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "fault_runner.py"
MAX_STEPS = 10
CONFIG = f"""
tasks: [sentiment, question]
max_seq_length: 32
max_train_samples: 24
question_pool_per_source: 40
max_eval_samples: 16
gold_eval: false
per_device_train_batch_size: 8
per_device_eval_batch_size: 32
learning_rate: 1.0e-3
max_steps: {MAX_STEPS}
eval_strategy: steps
eval_steps: 4
save_strategy: steps
save_steps: 4
logging_steps: 2
report_to: none
seed: 7
disable_tqdm: true
"""
# 24 rows per task in batches of 8: 6 batches per epoch, so the 10 steps cross an epoch boundary and the
# checkpoints at steps 4 and 8 fall in the middle of epochs 0 and 1 (the sampler must replay both).


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fault-config") / "faults.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def argv(config_path, tiny_encoder_dir, tiny_data_dir, out: Path, *extra) -> list[str]:
    return [
        sys.executable,
        str(RUNNER),
        str(config_path),
        "--encoder", str(tiny_encoder_dir),
        "--data_dir", str(tiny_data_dir),
        "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


def run(cmd: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def run_until_paused(cmd: list[str], signal_path: Path, env: dict, timeout: float = 600) -> None:
    """Start a run that hangs itself at a fault point, wait until it is there, then SIGKILL it."""
    log = open(signal_path.with_suffix(".log"), "w")
    env = {**os.environ, **env, "MT_SIGNAL": str(signal_path)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        while not signal_path.exists():
            if proc.poll() is not None:
                output = signal_path.with_suffix(".log").read_text()[-4000:]
                pytest.fail(f"run ended (rc {proc.returncode}) before its fault point:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail("run did not reach its fault point in time")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def assert_no_pickles(folder: Path) -> list[str]:
    """Every file under `folder` is something other than a pickle (by name and by content)."""
    names = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        names.append(rel)
        assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy"), rel
        if path.suffix == ".safetensors":  # its first 8 bytes are a header length, so parse it instead
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
            continue
        head = path.read_bytes()[:4]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"{rel} is a pickle"
        assert not head.startswith(b"PK\x03\x04"), f"{rel} is a zip archive (torch.save format)"
    return names


@pytest.fixture(scope="module")
def reference(config_path, tiny_encoder_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run, with every IP connection and DNS lookup made to fail, and no offline switch set:
    it succeeds, so nothing in a training run needs (or tries) the network."""
    folder = tmp_path_factory.mktemp("reference")
    out, attempts = folder / "out", folder / "network-attempts.txt"
    offline_switches = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in offline_switches}
    env["MT_BLOCK_NETWORK"] = str(attempts)
    result = subprocess.run(
        argv(config_path, tiny_encoder_dir, tiny_data_dir, out),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert not attempts.exists(), f"the run tried to reach the network:\n{attempts.read_text()}"
    return out


def test_training_run_never_touches_the_network(reference):
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["train"]["global_steps"] == MAX_STEPS
    assert (reference / "model.safetensors").is_file()


def test_blocked_network_is_really_blocked(tmp_path):
    """The runner's block works: a connection attempt fails and is recorded (so the test above can fail)."""
    attempts = tmp_path / "attempts.txt"
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import fault_runner\n"
        f"fault_runner._block_network({str(attempts)!r})\n"
        "import urllib.request\n"
        "try:\n"
        "    urllib.request.urlopen('https://huggingface.co', timeout=5)\n"
        "except OSError as err:\n"
        "    print('refused', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "network blocked" in out.stdout
    assert "huggingface.co" in attempts.read_text()


def test_output_folder_holds_no_pickle(reference):
    names = assert_no_pickles(reference)
    for step in (4, 8, 10):
        for name in ("model.safetensors", "optimizer.safetensors", "scheduler.safetensors", "rng_state.safetensors",
                     "trainer_state.json", "training_args.json", "config.json"):
            assert f"checkpoint-{step}/{name}" in names
    final = {"model.safetensors", "config.json", "modeling_multitask.py", "metrics.json", "training_args.json"}
    assert final <= set(names)
    assert not [n for n in names if n.startswith(".")]  # no staging folder left behind


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(
    reference, config_path, tiny_encoder_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "out"
    cmd = argv(config_path, tiny_encoder_dir, tiny_data_dir, out)
    run_until_paused(cmd, tmp_path / "paused", {"MT_PAUSE_AFTER_CHECKPOINT": "8"})
    assert (out / "checkpoint-8").is_dir() and not (out / "model.safetensors").exists()
    assert checkpoints.missing_files(out / "checkpoint-8") == []

    # The killed run's lock is left behind: reported as stale, with the command that clears it.
    resume = cmd + ["--resume_from_checkpoint", str(out / "checkpoint-8")]
    refused = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lock = run_folder.lock_path(out)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"has a stale lock {lock}: its holder, process " in refused.stderr, refused.stderr[-3000:]
    assert f"clear the lock with `rm {lock}`" in refused.stderr
    lock.unlink()
    run(resume)
    assert max_abs_diff(reference / "model.safetensors", out / "model.safetensors") <= 1e-6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["global_steps"] == MAX_STEPS
    assert_no_pickles(out)


def test_sigkill_during_checkpoint_write_resumes_from_the_previous_one(
    reference, config_path, tiny_encoder_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "out"
    cmd = argv(config_path, tiny_encoder_dir, tiny_data_dir, out)
    run_until_paused(cmd, tmp_path / "paused", {"MT_PAUSE_DURING_CHECKPOINT": "8"})
    partial = out / ".checkpoint-8.partial"
    assert (partial / "model.safetensors").is_file() and not (partial / "rng_state.safetensors").exists()
    assert not (out / "checkpoint-8").exists()  # the half-written checkpoint never got its real name
    assert checkpoints.latest_checkpoint(out) == str(out / "checkpoint-4")

    run_folder.lock_path(out).unlink()  # the killed run's stale lock (test_sigkill_after_checkpoint_... pins it)
    run(cmd + ["--resume_from_checkpoint", "auto"])
    assert max_abs_diff(reference / "model.safetensors", out / "model.safetensors") <= 1e-6
    assert not partial.exists()  # replaced when step 8 was saved again
    assert_no_pickles(out)


def test_resume_auto_without_checkpoint_starts_fresh_in_an_empty_folder(tmp_path):
    args = train.TrainingArguments(output_dir=str(tmp_path / "new"), resume_from_checkpoint="auto", report_to="none")
    assert checks.check_output_dir(args, train.MultiTaskArguments()) is None
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------------------
# NaN / inf
# ---------------------------------------------------------------------------------------------------------


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
        # the config's built rows scaled to this pool (quick.yaml: 500 / 1,500 / 2,000 beside 5,000 pool rows):
        # at full size they would be 95% of the question rows, and 12 steps would learn their label balance only
        "--question_trap_rows", "20",
        "--question_rephrase_rows", "60",
        "--question_declarative_rows", "80",
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
    assert metrics["recipe"]["hardware"].endswith(f"torch threads {available_cores()})")
    if available_cores() > 1:
        assert "accelerate launch set OMP_NUM_THREADS=1 for this single CPU process" in result.stdout


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


def test_fsdp_config_without_gpus_says_it_runs_plain_data_parallelism(tmp_path, tiny_encoder_dir, tiny_data_dir):
    # configs/accelerate/fsdp.yaml on a CPU machine: accelerate falls back to MULTI_CPU (DDP over gloo), and
    # its mixed_precision bf16 autocasts while TrainingArguments say bf16 False; the log and the card say both.
    if torch.cuda.is_available():
        pytest.skip("the fallback happens only on a machine without GPUs")
    out = tmp_path / "run"
    log = launch(
        ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--main_process_port", str(free_port())],
        tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--max_steps", "2"),
        tmp_path / "run.log",
    )
    assert "FSDP was requested but accelerate runs MULTI_CPU (no GPU on this machine)" in log
    assert "Mixed precision bf16 (accelerate config), distributed type MULTI_CPU, 2 process(es)" in log
    metrics = assert_one_finished_model(out)
    assert metrics["recipe"]["distributed_type"] == "MULTI_CPU" and "fsdp_fallback" in metrics["recipe"]
    card = (out / "README.md").read_text()
    assert "| Distributed | MULTI_CPU, 2 process(es); FSDP was requested" in card


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
        r"^error: Non-finite training loss \(nan\) at step 1 on task\(s\) \['question'\] "
        r"\(per-task: \{'question': nan\}\) in process 1 of 2\."
    )
    assert len(re.findall(error, output, flags=re.MULTILINE)) == 2, output[-4000:]  # one line from each process
    assert "FloatingPointError" not in output  # no traceback of ours (torchrun prints its own ChildFailedError)
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
