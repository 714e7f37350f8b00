"""Run `train.cli()` (`python train.py`) in a subprocess with fault hooks; tests/test_e2e.py drives it.

    python tests/fault_runner.py CONFIG.yaml --flag value ...

Environment:
- MT_BLOCK_NETWORK=FILE: every IP socket connect and DNS lookup raises OSError and is appended to FILE
  (installed before anything else is imported, so no library holds an unpatched reference).
- MT_PAUSE_AFTER_CHECKPOINT=N: once checkpoint-N is complete, write MT_SIGNAL and hang (the test SIGKILLs or
  SIGTERMs it), or with MT_CONTINUE=FILE wait until FILE exists and go on.
- MT_PAUSE_DURING_CHECKPOINT=N: while checkpoint N is half written (model and optimizer saved, RNG state not),
  write MT_SIGNAL and hang.
- MT_NAN_HEAD=TASK:RANK: in process RANK only, that task's head outputs NaN (a forward hook: DDP copies rank 0's
  weights to every rank, so NaN weights would not stay on one rank).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _block_network(log_path: str) -> None:
    def refuse(what: str, target) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"{what} {target!r}\n")
        raise OSError(f"network blocked by tests/fault_runner.py: {what} {target!r}")

    original_connect, original_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse("connect", address)
        return original_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse("connect_ex", address)
        return original_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        refuse("getaddrinfo", host)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
    socket.create_connection = lambda address, *a, **k: refuse("create_connection", address)


def _hang(signal_path: str) -> None:
    Path(signal_path).write_text("paused", encoding="utf-8")
    go_on = os.environ.get("MT_CONTINUE")
    while not (go_on and Path(go_on).exists()):  # until the test kills this process or lets it go on
        time.sleep(0.2)


def _install_pauses(trainer_cls) -> None:
    after = os.environ.get("MT_PAUSE_AFTER_CHECKPOINT")
    during = os.environ.get("MT_PAUSE_DURING_CHECKPOINT")
    signal_path = os.environ.get("MT_SIGNAL", "")
    if after:
        save_checkpoint = trainer_cls._save_checkpoint

        def _save_checkpoint(self, model, trial):
            save_checkpoint(self, model, trial)
            if self.state.global_step == int(after):
                _hang(signal_path)

        trainer_cls._save_checkpoint = _save_checkpoint
    if during:
        save_rng_state = trainer_cls._save_rng_state

        def _save_rng_state(self, output_dir):
            if self.state.global_step == int(during):
                _hang(signal_path)
            save_rng_state(self, output_dir)

        trainer_cls._save_rng_state = _save_rng_state


def _install_nan_head(trainer_cls, spec: str) -> None:
    task, rank = spec.split(":")
    init = trainer_cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.accelerator.process_index == int(rank):
            self.model.heads[task].register_forward_hook(lambda module, inputs, output: output * float("nan"))

    trainer_cls.__init__ = __init__


if __name__ == "__main__":
    if os.environ.get("MT_BLOCK_NETWORK"):
        _block_network(os.environ["MT_BLOCK_NETWORK"])
    sys.path.insert(0, str(ROOT))
    import train

    _install_pauses(train.MultiTaskTrainer)
    if os.environ.get("MT_NAN_HEAD"):
        _install_nan_head(train.MultiTaskTrainer, os.environ["MT_NAN_HEAD"])
    sys.exit(train.cli(sys.argv[1:]))
