"""Run `train.main()` in-process on the tiny encoder and keep the `MultiTaskTrainer` it built.

Tests inspect that trainer's model and optimizer after real optimiser steps, so they go through the same
parse -> freezing -> Trainer path as `accelerate launch train.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def tiny_argv(encoder_dir: Path, data_dir: Path, output_dir: Path, *flags: str) -> list[str]:
    """Flags for a run of a few seconds: 64 rows per task, batch 8, lr 1e-3, no evaluation during training."""
    return [
        "--encoder", str(encoder_dir),
        "--data_dir", str(data_dir),
        "--output_dir", str(output_dir),
        "--overwrite_output_dir", "true",
        "--max_train_samples", "64",
        "--question_pool_per_source", "60",
        "--max_eval_samples", "32",
        "--gold_eval", "false",
        "--max_seq_length", "32",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "32",
        "--learning_rate", "1e-3",
        "--eval_before_training", "false",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--report_to", "none",
        "--seed", "0",
        *flags,
    ]  # fmt: skip


def run_main(monkeypatch, argv: list[str], trainer_cls=None):
    """`train.main(argv)` with its Trainer class swapped for a recording subclass of `trainer_cls`.

    Returns (trainer, metrics); `trainer.initial_state` holds every parameter as it was after freezing,
    before the first step.
    """
    import train

    base = trainer_cls or train.MultiTaskTrainer
    built = []

    class RecordingTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initial_state = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            built.append(self)

    monkeypatch.setattr(train, "MultiTaskTrainer", RecordingTrainer)
    metrics = train.main(argv)
    return built[-1], metrics


def optimizer_parameter_ids(trainer) -> set[int]:
    return {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}


def changed_and_unchanged(trainer) -> tuple[set[str], set[str]]:
    """Names of parameters that moved during training, and of those that are bit-identical to the start."""
    changed, unchanged = set(), set()
    for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters():
        (unchanged if torch.equal(p.detach(), trainer.initial_state[name]) else changed).add(name)
    return changed, unchanged


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
