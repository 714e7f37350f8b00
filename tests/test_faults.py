"""Faults: killed runs resume exactly, a kill mid-checkpoint is harmless, NaN stops the run, no network, no pickle.

The training runs are real `train.py` runs (tiny encoder, tiny mirror, 10 steps, a checkpoint every 4) in
subprocesses started through tests/fault_runner.py, which can hang a run at a chosen point so that the test
can SIGKILL it there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import checkpoints
import checks
import data as mtdata
import question
import train

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

    run(cmd + ["--resume_from_checkpoint", str(out / "checkpoint-8")])
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


def _trainer(tmp_path, model, tiny_tokenizer, tiny_data_dir, **training):
    data_args = train.DataArguments(
        data_dir=str(tiny_data_dir), max_seq_length=32, max_train_samples=16, max_eval_samples=8, gold_eval=False
    )
    pool = question.QuestionPool(question.QuestionArguments(question_pool_per_source=30))
    tasks = mtdata.get_tasks(["sentiment", "question"], pools={"question": pool})
    mt = mtdata.build_data(tasks, tiny_tokenizer, data_args, seed=0)
    args = train.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to="none", save_strategy="no",
        eval_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, **training,
    )  # fmt: skip
    return train.MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=mt.train,
        eval_dataset=mt.eval_sets,
        data_collator=mtdata.MultiTaskCollator(tiny_tokenizer.pad_token_id),
        task_sizes=mt.task_sizes,
        eval_tasks=mt.eval_tasks,
        mt_args=train.MultiTaskArguments(),
    )


def test_nan_in_one_head_stops_the_run_naming_task_and_step(tmp_path, make_model, tiny_tokenizer, tiny_data_dir):
    model = make_model()
    with torch.no_grad():
        model.heads["question"].weight[0, 0] = float("nan")
    trainer = _trainer(tmp_path, model, tiny_tokenizer, tiny_data_dir, max_steps=4)
    # round_robin: step 1 is a sentiment batch (its loss must stay finite), step 2 the first question batch.
    message = r"Non-finite training loss \(nan\) at step 2 on task\(s\) \['question'\]"
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()
    assert trainer.state.global_step == 1
    assert torch.isfinite(model.heads["sentiment"].weight).all()
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_exploding_learning_rate_stops_the_run(tmp_path, make_model, tiny_tokenizer, tiny_data_dir):
    trainer = _trainer(tmp_path, make_model(), tiny_tokenizer, tiny_data_dir, max_steps=20, learning_rate=1e30,
                       max_grad_norm=0.0, warmup_steps=0)  # fmt: skip
    with pytest.raises(
        FloatingPointError,
        match=r"Non-finite (training loss|gradient norm) \((nan|inf)\) at step \d+ on task\(s\) "
        r"\['(sentiment|question)'\]",
    ):
        trainer.train()
    assert trainer.state.global_step < 20


def test_nan_gradient_with_finite_loss_stops_before_the_weights_change(
    tmp_path, make_model, tiny_tokenizer, tiny_data_dir
):
    model = make_model()
    embeddings = model.encoder.embeddings.word_embeddings.weight
    embeddings.register_hook(lambda grad: grad * float("nan"))  # an overflow in backward, say
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, model, tiny_tokenizer, tiny_data_dir, max_steps=4)
    message = r"Non-finite gradient norm \(nan\) at step 1 on task\(s\) \['sentiment'\]"
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the optimizer never stepped
