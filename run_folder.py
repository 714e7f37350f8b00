"""The output folder of a run: its lock, the previous run kept aside under --overwrite_output_dir, free space.

- `OutputLock`: `<parent>/.<name>.lock`, a file created exclusively by the main process of a launch (global rank
  0) and holding its pid, host and command. Another launch on the same folder is refused naming the holder; a
  lock whose process is gone (same host, dead pid) is reported as stale with the command that clears it. The
  other processes of a launch never take, check or remove it: they learn rank 0's verdict by a broadcast.
- `PreviousRun`: with --overwrite_output_dir the old run is renamed to `<parent>/.<name>.previous-<pid>` (a
  rename: no copy, no space), and deleted only once the new run has saved; on an error or a SIGTERM/SIGINT the
  new run's files are removed and the old run is moved back.
- `OutputClaim`: both of the above for one run (`train.main` holds it around the run), let go however the run
  ends.
- `check_free_space`: the bytes the first save needs, estimated from the parameters, against the free space.
- `os_error_message`: an `OSError` as one line naming the path and the fix.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)


class RunFolderError(ValueError):
    """A refusal about the output folder (a user error: train.py prints it without a traceback)."""


SECRET_FLAGS = ("--hub_token",)


def redacted_command(argv: list[str]) -> str:
    """The command line for the lock file, with the values of token flags (and anything shaped like a Hugging
    Face token) replaced by ***."""
    words, hide_next = [], False
    for word in argv:
        flag, eq, _ = word.partition("=")
        if hide_next or word.startswith("hf_"):
            word = "***"
        elif eq and flag in SECRET_FLAGS:
            word = f"{flag}=***"
        hide_next = word in SECRET_FLAGS
        words.append(word)
    return " ".join(words)


def lock_path(output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir).absolute()
    return out.parent / f".{out.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_lock(path: Path) -> dict | None:
    """The lock's holder ({pid, host, started, command}), {} for an unreadable lock, None without one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def lock_problem(output_dir: str | os.PathLike) -> str | None:
    """Why `output_dir` cannot be locked now (held by a live run, stale, unreadable), or None when it is free."""
    path = lock_path(output_dir)
    holder = read_lock(path)
    if holder is None:
        return None
    pid, host = holder.get("pid"), holder.get("host")
    who = f"process {pid} on host {host!r}, started {holder.get('started', '?')}: {holder.get('command', '?')}"
    clear = f"rm {path}"
    if not isinstance(pid, int) or pid <= 0 or not host:
        return (
            f"Output folder {Path(output_dir)} has an unreadable lock {path}. If no run uses the folder, clear it: "
            f"`{clear}`."
        )
    if host == socket.gethostname() and not _pid_alive(pid):
        return (
            f"Output folder {Path(output_dir)} has a stale lock {path}: its holder, {who}, is no longer running (it "
            f"was killed or crashed). If no other run uses the folder, clear the lock with `{clear}` and run again "
            f"(--resume_from_checkpoint auto continues a killed run)."
        )
    return (
        f"Output folder {Path(output_dir)} is in use by another run ({who}); its lock is {path}. Wait for that run "
        f"to finish, or choose another --output_dir."
    )


class OutputLock:
    """The exclusive lock of the output folder; `release` (or leaving the `with` block) removes it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = lock_path(output_dir)
        self.held = False

    def acquire(self) -> None:
        problem = lock_problem(self.output_dir)
        if problem:
            raise RunFolderError(problem)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": redacted_command(sys.argv)[:500],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another launch took it between the check and here
            raise RunFolderError(lock_problem(self.output_dir) or f"{self.path} was taken by another run.") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(holder, f)
        self.held = True
        logger.info("Locked %s (%s).", self.output_dir, self.path)

    def release(self) -> None:
        if not self.held:
            return
        holder = read_lock(self.path) or {}
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def previous_path(output_dir: str | os.PathLike, pid: int | None = None) -> Path:
    out = Path(output_dir).absolute()
    return out.parent / f".{out.name}.previous-{os.getpid() if pid is None else pid}"


def leftover_previous_runs(output_dir: str | os.PathLike) -> list[Path]:
    """Old runs set aside by an --overwrite_output_dir launch that was killed before it could finish or undo."""
    out = Path(output_dir).absolute()
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.glob(f".{out.name}.previous-*") if p.is_dir())


class PreviousRun:
    """The run that --overwrite_output_dir replaces, kept aside until the new run has saved.

    `set_aside` renames the folder; `discard` deletes the old run (after the final save); `restore` removes what
    the new run wrote and moves the old run back (after a failure). Nothing happens when there was no old run.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.aside: Path | None = None

    def set_aside(self) -> None:
        out = self.output_dir
        if not (out.is_dir() and any(out.iterdir())):
            return
        aside, n = previous_path(out), 1
        while aside.exists():  # a folder some killed launch with this pid left: never ours to delete
            n += 1
            aside = aside.with_name(f"{previous_path(out).name}-{n}")
        os.rename(out, aside)
        self.aside = aside
        logger.warning(
            "--overwrite_output_dir: the previous run in %s is kept in %s until this run has saved; it is moved "
            "back if this run fails.", out, aside
        )

    def discard(self) -> None:
        if self.aside is None:
            return
        shutil.rmtree(self.aside, ignore_errors=True)
        logger.info("--overwrite_output_dir: deleted the previous run (%s).", self.aside)
        self.aside = None

    def restore(self) -> None:
        if self.aside is None:
            return
        if self.output_dir.exists():
            shutil.rmtree(self.output_dir, ignore_errors=True)
        os.rename(self.aside, self.output_dir)
        logger.warning("This run failed: the previous run is back in %s, as it was.", self.output_dir)
        self.aside = None


def estimate_save_bytes(model, save_checkpoints: bool, export_inline: bool) -> int:
    """Bytes of the largest single save: the final folder (weights, plus the sentence-transformers copy of the
    encoder when inline), or a checkpoint (weights and Adam's two moments); plus 16 MB for tokenizer, plots,
    JSON."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    final = weights * (2 if export_inline else 1)
    checkpoint = weights * 3 if save_checkpoints else 0
    return max(final, checkpoint) + 16 * 2**20


def check_free_space(output_dir: str | os.PathLike, needed: int) -> None:
    """Refuse to start a run whose first save cannot fit on the output folder's disk."""
    at = Path(output_dir).absolute()
    while not at.exists():
        at = at.parent
    free = shutil.disk_usage(at).free
    if free < needed:
        raise RunFolderError(
            f"Not enough free disk space for --output_dir {output_dir}: saving this model needs about "
            f"{needed / 2**20:,.0f} MB, {at} has {free / 2**20:,.0f} MB free. Free some space or choose another "
            f"--output_dir."
        )


def check_writable(output_dir: str | os.PathLike) -> None:
    """The output path is a folder (or can become one) that this user may write."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--output_dir {out} is a file, not a folder; remove it or choose another --output_dir.")
    at = out.absolute()
    while not at.exists():
        at = at.parent
    if not at.is_dir():
        raise RunFolderError(
            f"--output_dir {out}: {at} is a file, so no folder can be created under it; choose another --output_dir."
        )
    if not os.access(at, os.W_OK | os.X_OK):
        raise RunFolderError(
            f"--output_dir {out}: no permission to write in {at}; fix its permissions or choose another --output_dir."
        )
    parent = out.absolute().parent
    if at == out.absolute() and parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(
            f"--output_dir {out}: no permission to write in its parent {parent} (the lock and, with "
            f"--overwrite_output_dir, the previous run are kept there); fix its permissions or choose another "
            f"--output_dir."
        )


OS_ERROR_FIXES = {
    errno.ENOSPC: "no space left on the device; free some space (a killed save leaves only *.partial folders, "
    "and --resume_from_checkpoint auto continues from the last complete checkpoint)",
    errno.EDQUOT: "disk quota exceeded; free some space",
    errno.EACCES: "permission denied; fix the permissions or choose another path",
    errno.EPERM: "operation not permitted; fix the permissions or choose another path",
    errno.EROFS: "read-only file system; choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, a file was expected",
    errno.EEXIST: "it already exists",
    errno.ENOENT: "no such file or folder",
}


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """`main(argv)` for a command line: a refusal (ValueError) or an OS error is printed as one `error: <message>`
    line on stderr, exit status 1, no traceback (MULTITASK_DEBUG=1 shows it), as train.py prints its own."""
    try:
        main(argv)
    except (ValueError, OSError) as err:
        if os.environ.get("MULTITASK_DEBUG", "0") not in ("", "0"):
            raise
        has_path = isinstance(err, OSError) and (err.filename or err.errno)
        print(f"error: {os_error_message(err) if has_path else err}", file=sys.stderr)
        return 1
    return 0


def os_error_message(err: OSError) -> str:
    paths = [p for p in (err.filename, err.filename2) if p]
    where = " -> ".join(str(p) for p in paths) or "(no path given)"
    fix = OS_ERROR_FIXES.get(err.errno, err.strerror or str(err))
    return f"{where}: {fix} [{type(err).__name__}, errno {err.errno}]"


def no_space_message(err: BaseException, output_dir: str | os.PathLike) -> str | None:
    """For errors that report a full disk in their text only (safetensors' `SafetensorError`)."""
    if "No space left on device" not in str(err) and "Disk quota exceeded" not in str(err):
        return None
    return (
        f"{output_dir}: {OS_ERROR_FIXES[errno.ENOSPC]} ({type(err).__name__}: {str(err)[:200]})"
    )


def _broadcast_verdict(problem: str | None, world_size: int) -> str | None:
    """Rank 0's verdict on the lock, given to every process of the launch (so they all stop, or all go on)."""
    if world_size <= 1:
        return problem
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([problem], from_process=0)[0]


class OutputClaim:
    """What a run holds of its output folder, let go however the run ends: `with OutputClaim() as claim:` around
    the run, `claim.take(...)` once every check has passed (the first write). Leaving the block by an exception
    (or a signal that train.py turns into one) moves the previous run back; the lock is always released."""

    def __init__(self):
        self.lock: OutputLock | None = None
        self.previous: PreviousRun | None = None

    def take(self, training_args, replace: bool, needed_bytes: int = 0) -> PreviousRun:
        """On the main process: check that `needed_bytes` fit on the folder's disk, take the lock and, with
        `replace`, set the previous run aside; every process gets the main process's verdict. Returns the
        `PreviousRun`, whose `discard` the caller runs once the new run has saved."""
        out = Path(training_args.output_dir)
        previous = PreviousRun(out)
        problem = None
        if training_args.process_index == 0:
            self.lock = OutputLock(out)
            try:
                check_free_space(out, needed_bytes)
                self.lock.acquire()
                if replace:
                    previous.set_aside()
            except (RunFolderError, OSError) as err:
                self.lock.release()
                problem = str(err) if isinstance(err, RunFolderError) else os_error_message(err)
            self.previous = previous
        problem = _broadcast_verdict(problem, training_args.world_size)
        if problem:
            raise RunFolderError(problem)
        return previous

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None and self.previous is not None:
                try:
                    self.previous.restore()
                except OSError as err:
                    logger.error(
                        "Could not move the previous run back from %s to %s: %s",
                        self.previous.aside, self.previous.output_dir, err,
                    )
        finally:
            if self.lock is not None:
                self.lock.release()
        full_disk = exc is not None and self.previous is not None and no_space_message(exc, self.previous.output_dir)
        if full_disk:  # safetensors reports a full disk without a path: name the folder
            raise RunFolderError(full_disk) from exc
        return False
