"""Faults around the output folder: every refusal before the first write, the previous run kept until the new
one has saved (and put back on any failure), the lock, the top-level handler (`error: <message>`, no
traceback), disk space.

Each test checks the message and what the output folder (and the run it held before) looks like afterwards:
`snapshot` is every file's bytes, so "intact" means byte-identical; no lock and no `.previous-*` folder may be
left beside it. The in-process tests go through `train.main` / `train.cli` with tests/helpers.py's tiny run;
the two-launch tests start `tests/fault_runner.py` processes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import tiny_argv

import run_folder
import train

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "fault_runner.py"


def make_previous_run(out: Path) -> dict[str, bytes]:
    """A finished-looking run in `out`; returns its snapshot."""
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "metrics.json").write_text('{"previous": true}', encoding="utf-8")
    (out / "model.safetensors").write_bytes(b"previous weights")
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}', encoding="utf-8")
    return snapshot(out)


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def error_line(stderr: str) -> str:
    """The handler's message: the last line of stderr (progress bars come before it), and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: "), stderr[-3000:]
    return last


def assert_nothing_beside(out: Path) -> None:
    """No lock and no previous run set aside are left next to the output folder."""
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    assert leftovers == [], leftovers


@pytest.fixture
def argv(tiny_encoder_dir, tiny_data_dir, tmp_path):
    def make(*flags: str, out: Path | None = None) -> list[str]:
        return tiny_argv(tiny_encoder_dir, tiny_data_dir, out or tmp_path / "run", "--max_steps", "2", *flags)

    return make


# ---------------------------------------------------------------------------------------------------------
# Every number of the run is checked before the first write, and --overwrite_output_dir loses nothing
# ---------------------------------------------------------------------------------------------------------

# (what is wrong, flags, the message)
NUMBERS = [
    ("train batch size 0", ["--per_device_train_batch_size", "0"], r"per_device_train_batch_size=0 must be >= 1"),
    ("train batch size negative", ["--per_device_train_batch_size", "-8"], r"per_device_train_batch_size=-8 must be >= 1"),
    ("eval batch size 0", ["--per_device_eval_batch_size", "0"], r"per_device_eval_batch_size=0 must be >= 1"),
    ("gradient accumulation 0", ["--gradient_accumulation_steps", "0"], r"gradient_accumulation_steps=0 must be >= 1"),
    ("gradient accumulation negative", ["--gradient_accumulation_steps", "-2"],
     r"gradient_accumulation_steps=-2 must be >= 1"),
    ("learning rate NaN", ["--learning_rate", "nan"], r"learning_rate=nan must be a finite number"),
    ("learning rate inf", ["--learning_rate", "inf"], r"learning_rate=inf must be a finite number"),
    ("learning rate negative", ["--learning_rate", "-0.001"], r"learning_rate=-0\.001 must be > 0"),
    ("learning rate 0", ["--learning_rate", "0"], r"learning_rate=0\.0 must be > 0"),
    ("negative epochs without max_steps", ["--max_steps", "-1", "--num_train_epochs", "-1"],
     r"num_train_epochs=-1\.0 with max_steps=-1 trains for no step: set --num_train_epochs above 0 or --max_steps"),
    ("zero epochs without max_steps", ["--max_steps", "-1", "--num_train_epochs", "0"],
     r"num_train_epochs=0\.0 with max_steps=-1 trains for no step"),
    ("epochs NaN", ["--num_train_epochs", "nan"], r"num_train_epochs=nan must be a finite number"),
    ("weight decay negative", ["--weight_decay", "-0.1"], r"weight_decay=-0\.1 must be >= 0"),
    ("adam_beta1 1", ["--adam_beta1", "1.0"], r"adam_beta1=1\.0 must be < 1"),
    ("adam_beta2 negative", ["--adam_beta2", "-0.5"], r"adam_beta2=-0\.5 must be >= 0"),
    ("adam_epsilon 0", ["--adam_epsilon", "0"], r"adam_epsilon=0\.0 must be > 0"),
    ("max_grad_norm NaN", ["--max_grad_norm", "nan"], r"max_grad_norm=nan must be a finite number"),
    ("label smoothing 1", ["--label_smoothing_factor", "1"], r"label_smoothing_factor=1\.0 must be < 1"),
    ("dataloader workers negative", ["--dataloader_num_workers", "-1"], r"dataloader_num_workers=-1 must be >= 0"),
    ("task sampling temperature NaN", ["--task_sampling_temperature", "nan"],
     r"task_sampling_temperature=nan must be a finite number"),
    ("uncertainty learning rate NaN", ["--loss_weighting", "uncertainty", "--loss_weights_learning_rate", "nan"],
     r"loss_weights_learning_rate=nan must be a finite number"),
    ("warmup steps negative", ["--warmup_steps", "-1"], r"warmup_steps = -1(\.0)?, Expected value warmup_steps >= 0"),
    ("warmup steps NaN", ["--warmup_steps", "nan"], r"warmup_steps=nan must be a finite number"),
    ("logging steps negative", ["--logging_steps", "-1"], r"logging_steps=-1(\.0)? must be > 0"),
    ("save steps negative", ["--save_strategy", "steps", "--save_steps", "-5"], r"save_steps=-5(\.0)? must be > 0"),
    ("eval steps negative", ["--eval_strategy", "steps", "--eval_steps", "-2"], r"eval_steps=-2(\.0)? must be > 0"),
    ("save_total_limit 0", ["--save_total_limit", "0"], r"save_total_limit=0 must be >= 1"),
    ("seed negative", ["--seed", "-1"], r"seed=-1 must be >= 0"),
]  # fmt: skip


def test_numbers_table_is_large_enough():
    assert len(NUMBERS) >= 20 and len({name for name, _, _ in NUMBERS}) == len(NUMBERS)


@pytest.mark.parametrize("flags, message", [c[1:] for c in NUMBERS], ids=[c[0] for c in NUMBERS])
def test_bad_number_is_refused_before_the_previous_run_is_touched(argv, tmp_path, flags, message, capsys):
    out = tmp_path / "run"
    before = make_previous_run(out)
    assert train.cli(argv(*flags)) == 1
    err = error_line(capsys.readouterr().err)
    assert re.search(message, err), err
    assert snapshot(out) == before
    assert_nothing_beside(out)


def test_several_bad_numbers_are_named_in_one_message(argv):
    with pytest.raises(ValueError, match=r"per_device_train_batch_size=0 must be >= 1; gradient_accumulation_steps=0"):
        train.main(argv("--per_device_train_batch_size", "0", "--gradient_accumulation_steps", "0"))


def test_overwrite_replaces_the_previous_run_only_once_the_new_one_has_saved(argv, tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_previous_run(out)
    seen = {}
    save_outputs = train.save_and_push.__globals__["save_outputs"]

    def watching_save_outputs(*args, **kwargs):
        seen["aside while saving"] = sorted(p.name for p in tmp_path.iterdir() if ".previous-" in p.name)
        return save_outputs(*args, **kwargs)

    monkeypatch.setitem(train.save_and_push.__globals__, "save_outputs", watching_save_outputs)
    metrics = train.main(argv())
    assert seen["aside while saving"] == [f".run.previous-{os.getpid()}"]
    assert metrics["train"]["global_steps"] == 2
    assert json.loads((out / "metrics.json").read_text())["train"]["global_steps"] == 2
    assert not (out / "checkpoint-3").exists()
    assert_nothing_beside(out)


class NaNHeadTrainer(train.MultiTaskTrainer):
    """The sentiment head outputs NaN: training stops with a FloatingPointError after the folder is claimed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.heads["sentiment"].register_forward_hook(lambda module, inputs, output: output * float("nan"))


def test_failure_during_training_puts_the_previous_run_back(argv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    before = make_previous_run(out)
    monkeypatch.setattr(train, "MultiTaskTrainer", NaNHeadTrainer)
    assert train.cli(argv("--save_strategy", "steps", "--save_steps", "1")) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: Non-finite training loss (nan) at step 1 on task(s) ['sentiment']"), err
    assert snapshot(out) == before  # the new run's checkpoints are gone, the old run is back byte for byte
    assert_nothing_beside(out)


def test_a_run_that_took_no_step_saves_nothing_and_keeps_the_previous_run(argv, tmp_path, monkeypatch):
    # A stand-in for train(): returns without an optimizer step (the numbers that lead there are refused
    # beforehand, so this pins the last guard on its own).
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    before = make_previous_run(out)
    monkeypatch.setattr(train, "train", lambda trainer, resume_from, mt_args: None)
    message = r"The run took no optimizer step \(global_step 0 .*\), so nothing was saved"
    with pytest.raises(ValueError, match=message):
        train.main(argv())
    assert snapshot(out) == before
    with pytest.raises(ValueError, match=message):
        train.main(argv(out=fresh))
    assert not (fresh / "model.safetensors").exists() and not (fresh / "metrics.json").exists()
    assert_nothing_beside(out)
    assert_nothing_beside(fresh)


# ---------------------------------------------------------------------------------------------------------
# The top-level handler and OS errors
# ---------------------------------------------------------------------------------------------------------


def test_debug_switch_shows_the_traceback(argv, monkeypatch):
    monkeypatch.setenv("MULTITASK_DEBUG", "1")
    with pytest.raises(ValueError, match=r"per_device_train_batch_size=0 must be >= 1"):
        train.cli(argv("--per_device_train_batch_size", "0"))


def test_python_train_py_prints_one_error_line_and_exits_1(argv, tmp_path):
    out = tmp_path / "run"
    before = make_previous_run(out)
    env = {**os.environ, "MULTITASK_DEBUG": "0"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *argv("--gradient_accumulation_steps", "0")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: Training arguments: gradient_accumulation_steps=0 must be >= 1."
    ], result.stderr[-3000:]
    assert snapshot(out) == before


def test_output_path_that_is_a_file_is_refused_naming_it(argv, tmp_path, capsys):
    path = tmp_path / "run"
    path.write_text("not a folder", encoding="utf-8")
    assert train.cli(argv(out=path)) == 1
    assert error_line(capsys.readouterr().err) == (
        f"error: --output_dir {path} is a file, not a folder; remove it or choose another --output_dir."
    )
    assert path.read_text() == "not a folder"
    below = path / "sub"
    assert train.cli(argv(out=below)) == 1
    assert f"error: --output_dir {below}: {path} is a file, so no folder can be created under it" in (
        error_line(capsys.readouterr().err)
    )


def test_output_folder_without_write_permission_is_refused_naming_it(argv, tmp_path, monkeypatch):
    # The tests run as root, for whom every path is writable: os.access is made to answer as for another user.
    out = tmp_path / "run"
    before = make_previous_run(out)
    access = run_folder.os.access
    monkeypatch.setattr(run_folder.os, "access", lambda path, mode: Path(path) != out and access(path, mode))
    with pytest.raises(ValueError, match=rf"--output_dir {out}: no permission to write in {out}; fix its permissions"):
        train.main(argv())
    monkeypatch.setattr(run_folder.os, "access", lambda path, mode: Path(path) != tmp_path and access(path, mode))
    with pytest.raises(ValueError, match=rf"no permission to write in its parent {tmp_path} \(the lock and"):
        train.main(argv())
    assert snapshot(out) == before


def test_os_errors_become_one_line_naming_the_path(argv, tmp_path, monkeypatch, capsys):
    data_file = tmp_path / "mirror" / "sst2" / "train.parquet"

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(data_file))

    monkeypatch.setattr(train.mtdata, "build_data", unreadable)
    assert train.cli(argv()) == 1
    assert error_line(capsys.readouterr().err) == (
        f"error: {data_file}: permission denied; fix the permissions or choose another path "
        f"[PermissionError, errno 13]"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "err, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/r/model.safetensors"),
         "/r/model.safetensors: no space left on the device; free some space"),
        (OSError(errno.EROFS, "Read-only file system", "/r"), "/r: read-only file system; choose another path"),
        (FileExistsError(errno.EEXIST, "File exists", "/r"), "/r: it already exists"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/r/x"), "/r/x: a part of the path is a file"),
        (Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                   "\"No space left on device\" })"), "the output folder's disk: no space left on the device"),
    ],
)  # fmt: skip
def test_user_error_messages_of_os_errors(err, expected):
    assert train.user_error_message(err).startswith(expected)


def test_a_bug_keeps_its_traceback():
    assert train.user_error_message(KeyError("x")) is None


def test_not_enough_disk_space_is_refused_before_the_first_write(argv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    before = make_previous_run(out)
    usage = run_folder.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: usage._replace(free=5 * 2**20))
    assert train.cli(argv()) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"error: Not enough free disk space for --output_dir {out}: saving this model needs about ")
    assert "MB, " in err and " has 5 MB free. Free some space or choose another --output_dir." in err
    assert snapshot(out) == before
    assert_nothing_beside(out)


def test_disk_full_while_saving_names_the_folder_and_keeps_the_previous_run(argv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    before = make_previous_run(out)

    def full_disk(*args, **kwargs):  # what safetensors raises when a write fails with ENOSPC
        raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                        'left on device" })')  # fmt: skip

    monkeypatch.setitem(train.save_and_push.__globals__, "save_outputs", full_disk)
    assert train.cli(argv()) == 1
    assert error_line(capsys.readouterr().err).startswith(
        f"error: {out}: no space left on the device; free some space"
    )
    assert snapshot(out) == before
    assert_nothing_beside(out)


def test_save_estimate_counts_the_weights_each_save_writes(make_model):
    model = make_model()
    weights = sum(p.numel() * 4 for p in model.parameters())
    margin = 16 * 2**20
    assert run_folder.estimate_save_bytes(model, save_checkpoints=False, export_inline=False) == weights + margin
    assert run_folder.estimate_save_bytes(model, save_checkpoints=False, export_inline=True) == 2 * weights + margin
    assert run_folder.estimate_save_bytes(model, save_checkpoints=True, export_inline=True) == 3 * weights + margin


# ---------------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------------


def write_lock(out: Path, pid: int, host: str | None = None) -> Path:
    path = run_folder.lock_path(out)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "then", "command": "train.py x"}
    path.write_text(json.dumps(holder), encoding="utf-8")
    return path


def test_folder_locked_by_a_live_run_is_refused_naming_the_holder(argv, tmp_path, capsys):
    out = tmp_path / "run"
    before = make_previous_run(out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = write_lock(out, holder.pid)
        assert train.cli(argv()) == 1
    finally:
        holder.kill()
        holder.wait()
    err = error_line(capsys.readouterr().err)
    assert err.startswith(
        f"error: Output folder {out} is in use by another run (process {holder.pid} on host "
        f"{socket.gethostname()!r}, started then: train.py x); its lock is {lock}. Wait for that run to finish"
    ), err
    assert snapshot(out) == before and lock.is_file()


def test_stale_lock_is_reported_with_the_command_that_clears_it(argv, tmp_path, capsys):
    out = tmp_path / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = write_lock(out.parent / "run", gone.pid)
    assert train.cli(argv()) == 1
    err = error_line(capsys.readouterr().err)
    assert f"error: Output folder {out} has a stale lock {lock}: its holder, process {gone.pid}" in err
    assert f"is no longer running (it was killed or crashed). If no other run uses the folder, clear the lock " \
           f"with `rm {lock}` and run again" in err
    assert not out.exists() and lock.is_file()  # reported, not broken
    lock.unlink()
    assert train.main(argv())["train"]["global_steps"] == 2
    assert_nothing_beside(out)


def test_unreadable_lock_is_reported(argv, tmp_path):
    out = tmp_path / "run"
    run_folder.lock_path(out).write_text("garbage", encoding="utf-8")
    with pytest.raises(ValueError, match=r"has an unreadable lock .*\.run\.lock\. If no run uses the folder, clear it"):
        train.main(argv())
    assert not out.exists()


def test_lock_of_a_run_on_another_host_is_honoured(argv, tmp_path):
    write_lock(tmp_path / "run", 1, host="some-other-host")
    with pytest.raises(ValueError, match=r"is in use by another run \(process 1 on host 'some-other-host'"):
        train.main(argv())


def test_lock_names_the_command_without_the_token(argv, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train.py", "--hub_token", "hf_secret1", "--hub_token=hf_secret2", "hf_x"])
    seen = {}
    take = run_folder.OutputClaim.take

    def reading_take(self, *args, **kwargs):
        previous = take(self, *args, **kwargs)
        seen.update(json.loads(run_folder.lock_path(out).read_text()))
        return previous

    monkeypatch.setattr(run_folder.OutputClaim, "take", reading_take)
    train.main(argv())
    assert seen["pid"] == os.getpid() and seen["host"] == socket.gethostname()
    assert seen["command"] == "train.py --hub_token *** --hub_token=*** ***"
    assert_nothing_beside(out)  # released at the end


def test_a_previous_run_is_never_set_aside_over_another(tmp_path):
    out, taken = tmp_path / "run", run_folder.previous_path(tmp_path / "run")
    before, kept = make_previous_run(out), make_previous_run(taken)
    previous = run_folder.PreviousRun(out)
    previous.set_aside()
    assert previous.aside == taken.with_name(taken.name + "-2") and snapshot(taken) == kept
    previous.restore()
    assert snapshot(out) == before


def test_other_processes_of_a_launch_never_check_or_take_the_lock(tmp_path):
    # Rank 1 may look at the folder after rank 0 has locked it: its own launch's lock must not stop it, and it
    # must not remove it.
    out = tmp_path / "run"
    lock = write_lock(out, os.getpid())
    rank = {"output_dir": str(out), "resume_from_checkpoint": None, "world_size": 1}
    with pytest.raises(ValueError, match="is in use by another run"):
        train.checks.check_output_dir(SimpleNamespace(**rank, process_index=0), train.MultiTaskArguments())
    rank1 = SimpleNamespace(**rank, process_index=1)
    assert train.checks.check_output_dir(rank1, train.MultiTaskArguments()) is None
    with run_folder.OutputClaim() as claim:
        claim.take(rank1, replace=True)
        assert lock.is_file()
    assert lock.is_file()  # left to its holder


def test_leftover_previous_run_of_a_killed_launch_is_pointed_out(argv, tmp_path, caplog):
    out = tmp_path / "run"
    aside = run_folder.previous_path(out, pid=999999)
    make_previous_run(aside)
    with caplog.at_level("WARNING", logger="checks"):
        train.main(argv())
    assert any(str(aside) in r.getMessage() and "set aside" in r.getMessage() for r in caplog.records)
    assert aside.is_dir()  # never deleted for the user


# ---------------------------------------------------------------------------------------------------------
# Two launches on one folder, and a signal during an overwrite (processes of their own)
# ---------------------------------------------------------------------------------------------------------


def runner_cmd(argv, out: Path, *flags: str) -> list[str]:
    return [sys.executable, str(RUNNER), *argv("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
                                               *flags, out=out)]  # fmt: skip


def start_paused(cmd: list[str], tmp_path: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    signal_path, log = tmp_path / "paused", tmp_path / "first.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "MT_SIGNAL": str(signal_path)},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 300
    while not signal_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"first run did not reach its pause (rc {proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    return proc, log


@pytest.mark.integration
def test_second_launch_on_a_folder_in_use_is_refused_and_the_first_finishes_intact(argv, tmp_path):
    out = tmp_path / "run"
    go_on = tmp_path / "go-on"
    cmd = runner_cmd(argv, out)
    first, log = start_paused(cmd, tmp_path, {"MT_PAUSE_AFTER_CHECKPOINT": "2", "MT_CONTINUE": str(go_on)})
    try:
        during = snapshot(out)
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert error_line(second.stderr).startswith(f"error: Output folder {out} is in use by another run (process {first.pid} "
                                        f"on host {socket.gethostname()!r}"), second.stderr[-3000:]  # fmt: skip
        assert snapshot(out) == during  # the second launch wrote nothing, not even with --overwrite_output_dir
        go_on.write_text("", encoding="utf-8")
        assert first.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        first.kill()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["global_steps"] == 6
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-6", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert_nothing_beside(out)


@pytest.mark.integration
def test_sigterm_during_an_overwrite_puts_the_previous_run_back(argv, tmp_path):
    out = tmp_path / "run"
    before = make_previous_run(out)
    first, log = start_paused(runner_cmd(argv, out), tmp_path, {"MT_PAUSE_AFTER_CHECKPOINT": "2"})
    assert (tmp_path / f".run.previous-{first.pid}").is_dir() and (out / "checkpoint-2").is_dir()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 130, log.read_text()[-4000:]
    assert log.read_text().rstrip().endswith("error: stopped by SIGTERM")
    assert snapshot(out) == before
    assert_nothing_beside(out)


# ---------------------------------------------------------------------------------------------------------
# docs/failure_modes.md: its tables name real tests, cover the test tables, and state their count
# ---------------------------------------------------------------------------------------------------------


def test_failure_modes_tables_name_real_tests_and_state_their_count():
    import test_checks
    import test_modeling

    text = (ROOT / "docs" / "failure_modes.md").read_text(encoding="utf-8")
    tables = text[text.index("\n## Refused inputs") :]
    rows = [line for line in tables.splitlines() if line.startswith("| ") and not line.startswith("| refused input")]
    stated = re.search(r"\*\*(\d+) refused inputs, each covered by a test\*\*", text)
    assert stated and int(stated.group(1)) == len(rows), f"the page says {stated and stated.group(1)}, lists {len(rows)}"
    names = {line.split(" | ")[0][2:] for line in rows}
    for table in (test_checks.CASES, NUMBERS, test_modeling.DOCTORED):
        missing = [case[0] for case in table if case[0] not in names]
        assert not missing, f"docs/failure_modes.md lacks rows for the test cases {missing}"
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if len(cells) < 3:
            continue
        where = re.fullmatch(r"`(test_\w+\.py)::(test_\w+)`", cells[-1])
        assert where, line
        source = (ROOT / "tests" / where.group(1)).read_text(encoding="utf-8")
        assert f"def {where.group(2)}(" in source, f"{where.group(1)} has no {where.group(2)}"
