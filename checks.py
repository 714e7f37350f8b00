"""Checks that run before and during training, and the launcher workarounds.

Before anything is written: the encoder and the model setup (`check_model_setup`, which also builds the one
`MultiTaskConfig` of the run), the numbers of the training arguments (`check_training_args`), the output folder
(`check_output_dir`: a path that can be written, no other run's lock, no other run's files), `--cuda_graphs` (`check_cuda_graphs`) and
`--torch_compile` shapes (`compile_shapes_advice`). During training: `NonFiniteWatch`, which stops a run at the
first non-finite loss or gradient norm. At start-up: `use_cpu_backend_without_accelerator` and
`use_every_core_in_a_lone_cpu_process`, which fix what `accelerate launch` sets on machines without a GPU.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, TrainingArguments

import checkpoints
import lora
from freezing import apply_freezing
from modeling_multitask import (
    MultiTaskConfig,
    MultiTaskModel,
    encoder_attn_implementation,
    encoder_class,
    encoder_config_dict,
)
from run_folder import RunFolderError, check_writable, leftover_previous_runs, lock_problem

if TYPE_CHECKING:  # train.py imports this module
    from train import DataArguments, ModelArguments, MultiTaskArguments

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------


def use_cpu_backend_without_accelerator() -> None:
    """Under `accelerate launch --multi_gpu` (torchrun) on a machine without GPUs, ask accelerate for gloo.

    accelerate only picks its multi-CPU (gloo) mode when told to use the CPU; otherwise every process sets
    itself up as a separate single-process run, and they overwrite each other's output folder.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def use_every_core_in_a_lone_cpu_process() -> str | None:
    """Give a single CPU process launched by `accelerate launch` the cores it may run on.

    Without a GPU, `accelerate launch train.py ...` sets OMP_NUM_THREADS=1 unless it was told `--cpu` (its
    default for --num_cpu_threads_per_process), so the main job would use one core of a multi-core machine.
    Several processes keep what accelerate gave them (they share the cores). `python train.py` is left alone:
    there OMP_NUM_THREADS is the user's. Returns the log line, or None when nothing changed.
    """
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if not launched_by_accelerate or torch.accelerator.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("OMP_NUM_THREADS") != "1" or cores <= 1 or torch.get_num_threads() != 1:
        return None
    torch.set_num_threads(cores)
    return (
        f"accelerate launch set OMP_NUM_THREADS=1 for this single CPU process; using the {cores} cores it may run "
        f"on (torch.set_num_threads({cores})). For one thread run `OMP_NUM_THREADS=1 python train.py ...`."
    )


# ---------------------------------------------------------------------------------------------------------
# Before training
# ---------------------------------------------------------------------------------------------------------


# Model types whose position ids count from pad_token_id + 1 (transformers' create_position_ids_from_input_ids).
POSITIONS_AFTER_PADDING_IDX = frozenset(
    {"roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer",
     "xmod", "mpnet"}
)  # fmt: skip


def check_model_setup(
    encoder_path: str,
    task_configs: list[dict],
    weights: dict[str, float],
    model_args: ModelArguments,
    data_args: DataArguments,
    mt_args: MultiTaskArguments,
) -> MultiTaskConfig:
    """Check the encoder config, its attention implementation, max_seq_length and the freezing specs before any
    built-in task's data is read or any file written (custom tasks' own files are checked just before, by
    `data.check_custom_tasks`: they give the label names the config needs).

    The encoder must be a model type `AutoModel` builds; `--attn_implementation auto` picks sdpa where its class
    supports it (else eager), an explicit choice it does not support is refused here. Returns the run's
    `MultiTaskConfig` (its own checks run here: pooling, dropout, task names, task weights);
    `MultiTaskModel.from_encoder(..., config=config)` builds the model on it. The freezing specs are tried on a
    model built on the meta device: the same code as the real run (so the same errors), with no weights read
    and no memory used.
    """
    try:
        encoder_config = AutoConfig.from_pretrained(encoder_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--encoder {model_args.encoder!r}: cannot read its config ({type(err).__name__}: {str(err)[:300]}). "
            f"Pass a local folder holding config.json and weights, or connect to the Hub (a Hub id needs network "
            f"unless it is cached; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r})."
        ) from err
    if isinstance(getattr(encoder_config, "encoder", None), dict) and getattr(encoder_config, "tasks", None):
        # A saved multi-task model: its config.json names the encoder's model type, so AutoConfig reads it as a
        # plain encoder config that the model's weights (under encoder.*) would not fill.
        raise ValueError(
            f"--encoder {model_args.encoder!r} is a saved multi-task model (its config.json has tasks and an encoder "
            f"config), not an encoder. Pass its plain encoder copy, {model_args.encoder}/0_Transformer (written by "
            f"--export_sentence_transformers inline), or the encoder it was trained from "
            f"({getattr(encoder_config, 'encoder_name_or_path', None)!r})."
        )
    attn_implementation = encoder_attn_implementation(encoder_class(encoder_config), model_args.attn_implementation)
    max_positions = getattr(encoder_config, "max_position_embeddings", None)
    usable = max_positions
    if max_positions and encoder_config.model_type in POSITIONS_AFTER_PADDING_IDX:
        # RoBERTa-style position ids start after the padding index: 514 embeddings hold 512 tokens.
        usable = max_positions - (encoder_config.pad_token_id or 0) - 1
    if usable and data_args.max_seq_length > usable:
        offset = "" if usable == max_positions else f" minus {max_positions - usable} positions its model type skips"
        raise ValueError(
            f"max_seq_length={data_args.max_seq_length} exceeds the {usable} tokens the encoder can place "
            f"(max_position_embeddings={max_positions}{offset}; {model_args.encoder}); set --max_seq_length "
            f"{usable} or less."
        )
    if mt_args.pad_to_buckets and mt_args.pad_to_buckets[-1] > data_args.max_seq_length:
        raise ValueError(
            f"pad_to_buckets {mt_args.pad_to_buckets} has lengths above max_seq_length={data_args.max_seq_length}: "
            f"no batch is longer than max_seq_length, so those buckets would only add padding. Drop them or raise "
            f"--max_seq_length."
        )
    config = MultiTaskConfig(
        encoder=encoder_config_dict(encoder_config),
        tasks=task_configs,
        pooling=model_args.pooling,
        classifier_dropout=model_args.classifier_dropout,
        loss_weighting=mt_args.loss_weighting,
        task_weights=weights,
        encoder_name_or_path=model_args.encoder,
    )
    skeleton = _skeleton(config, attn_implementation, model_args)
    lora.apply_lora(skeleton, model_args)  # LoRA target modules and its combination with freezing
    apply_freezing(skeleton, mt_args.freeze, mt_args.unfreeze)
    return config


def _skeleton(config: MultiTaskConfig, attn_implementation: str, model_args: ModelArguments) -> MultiTaskModel:
    """The model on the meta device (no weights): what the preflight checks LoRA and freezing against."""
    try:
        with torch.device("meta"):
            skeleton = MultiTaskModel(config, encoder_attn_implementation=attn_implementation)
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        raise ValueError(
            f"--attn_implementation {model_args.attn_implementation}: {err} Use --attn_implementation auto or eager."
        ) from err
    logger.info(
        "Encoder %s: %s, attention %s, token_type_ids %s",
        model_args.encoder,
        type(skeleton.encoder).__name__,
        attn_implementation,
        "used" if skeleton.encoder_takes_token_type_ids else "not taken (dropped)",
    )
    return skeleton


def _number_problem(name: str, value, low: float | None = None, high: float | None = None, *,
                    low_open: bool = False, high_open: bool = False, integer: bool = False) -> str | None:
    """Why `value` is not a finite number in the interval, or None when it is."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"{name}={value!r} is not a number"
    if not math.isfinite(number):
        return f"{name}={value} must be a finite number"
    if integer and number != int(number):
        return f"{name}={value} must be a whole number"
    if low is not None and (number <= low if low_open else number < low):
        return f"{name}={value} must be {'>' if low_open else '>='} {low:g}"
    if high is not None and (number >= high if high_open else number > high):
        return f"{name}={value} must be {'<' if high_open else '<='} {high:g}"
    return None


def check_training_args(training_args: TrainingArguments, mt_args: MultiTaskArguments) -> None:
    """Every number of the run that the Trainer would only trip over later (a `ZeroDivisionError` in the
    dataloader, a NaN learning rate that trains garbage, zero epochs that save an untrained model)."""
    args = training_args
    problems = [
        _number_problem("per_device_train_batch_size", args.per_device_train_batch_size, 1, integer=True),
        _number_problem("per_device_eval_batch_size", args.per_device_eval_batch_size, 1, integer=True),
        _number_problem("gradient_accumulation_steps", args.gradient_accumulation_steps, 1, integer=True),
        _number_problem("learning_rate", args.learning_rate, 0, low_open=True),
        _number_problem("weight_decay", args.weight_decay, 0),
        _number_problem("adam_beta1", args.adam_beta1, 0, 1, high_open=True),
        _number_problem("adam_beta2", args.adam_beta2, 0, 1, high_open=True),
        _number_problem("adam_epsilon", args.adam_epsilon, 0, low_open=True),
        _number_problem("max_grad_norm", args.max_grad_norm),
        _number_problem("warmup_steps", args.warmup_steps, 0),
        _number_problem("label_smoothing_factor", args.label_smoothing_factor, 0, 1, high_open=True),
        _number_problem("dataloader_num_workers", args.dataloader_num_workers, 0, integer=True),
        _number_problem("num_train_epochs", args.num_train_epochs),
        _number_problem("max_steps", args.max_steps, integer=True),
        _number_problem("task_sampling_temperature", mt_args.task_sampling_temperature, 0, low_open=True),
        _number_problem("loss_weights_learning_rate", mt_args.loss_weights_learning_rate, 0, low_open=True),
    ]
    for strategy, steps in (("logging", "logging_steps"), ("save", "save_steps"), ("eval", "eval_steps")):
        if getattr(args, f"{strategy}_strategy") == "steps":
            problems.append(_number_problem(steps, getattr(args, steps), 0, low_open=True))
    problems.append(_number_problem("save_total_limit", args.save_total_limit, 1, integer=True))
    problems.append(_number_problem("seed", args.seed, 0, 2**32 - 1, integer=True))
    if args.max_steps <= 0 and args.num_train_epochs <= 0:  # max_steps > 0 overrides the epochs
        problems.append(
            f"num_train_epochs={args.num_train_epochs} with max_steps={args.max_steps} trains for no step: set "
            f"--num_train_epochs above 0 or --max_steps to a positive number of steps"
        )
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("Training arguments: " + "; ".join(problems) + ".")


def check_took_steps(state, training_args: TrainingArguments) -> None:
    """After training: a run that took no optimizer step saves nothing (its folder would look like a model)."""
    if state.global_step > 0:
        return
    raise ValueError(
        f"The run took no optimizer step (global_step 0 after {state.epoch or 0:g} epochs; num_train_epochs="
        f"{training_args.num_train_epochs}, max_steps={training_args.max_steps}, per_device_train_batch_size="
        f"{training_args.per_device_train_batch_size}, gradient_accumulation_steps="
        f"{training_args.gradient_accumulation_steps}), so nothing was saved: give it more rows, more epochs or "
        f"a smaller batch."
    )


def check_output_dir(training_args: TrainingArguments, mt_args: MultiTaskArguments) -> str | None:
    """Refuse to mix two runs in one folder; returns the checkpoint to resume from, if any.

    Touches nothing: with --overwrite_output_dir the previous run is set aside by `run_folder.PreviousRun`, once
    every check of the config and the data has passed. The lock is checked by the main process only (the other
    processes of a launch must not mistake their own launch's lock for another run's).
    """
    out = Path(training_args.output_dir)
    check_writable(out)
    if training_args.process_index == 0:
        problem = lock_problem(out)
        if problem:
            raise RunFolderError(problem)
        for aside in leftover_previous_runs(out):
            logger.warning(
                "%s holds a run that an --overwrite_output_dir launch set aside and could not put back (it was "
                "killed); move it back to %s, or delete it, once you have checked which run you want.", aside, out
            )
    resume = training_args.resume_from_checkpoint
    world_size = training_args.world_size
    holds_files = out.is_dir() and any(out.iterdir())
    if resume in ("auto", "latest", "True", "true"):
        last = checkpoints.latest_checkpoint(out, world_size)
        if last is not None:
            logger.info("resume_from_checkpoint=%s: resuming from %s.", resume, last)
            return last
        if holds_files and not mt_args.overwrite_output_dir:
            raise ValueError(
                f"--resume_from_checkpoint {resume}: {out} holds no complete checkpoint-N folder but other files "
                f"{sorted(p.name for p in out.iterdir())[:8]}. Pass --overwrite_output_dir true to start afresh "
                f"there, or choose another --output_dir."
            )
        logger.info("resume_from_checkpoint=%s: no checkpoint in %s, starting fresh.", resume, out)
        return None
    if resume is not None:
        checkpoints.check_checkpoint(resume, world_size)
        return resume
    if holds_files and not mt_args.overwrite_output_dir:
        hint = ""
        if checkpoints.latest_checkpoint(out, world_size) is not None:
            hint = "--resume_from_checkpoint auto to continue it, "
        raise ValueError(
            f"Output folder {out} already holds files of another run ({sorted(p.name for p in out.iterdir())[:8]}). "
            f"Pass --overwrite_output_dir true to replace it, {hint}or choose another --output_dir."
        )
    return None


def check_cuda_graphs(training_args: TrainingArguments, mt_args: MultiTaskArguments, cuda: bool) -> None:
    """`--cuda_graphs true` (`cuda`: the steps run on a CUDA device): refuse what a recording cannot do."""
    if not mt_args.cuda_graphs:
        return
    problems = []
    if not cuda:
        problems.append("it needs a CUDA GPU (this run has none); drop --cuda_graphs")
    if not (mt_args.pad_to_buckets or mt_args.pad_to_multiple_of):
        problems.append(
            "every batch length would be a new recording: pass --pad_to_buckets (e.g. 16 32 64 128, the last one "
            "at most max_seq_length)"
        )
    if training_args.gradient_accumulation_steps != 1:
        problems.append(
            f"gradient_accumulation_steps is {training_args.gradient_accumulation_steps}: a recorded backward "
            f"cannot add to the previous micro-batch's gradients; set it to 1 (raise the batch size instead)"
        )
    if training_args.world_size > 1:
        problems.append(f"it runs in one process only, this run has {training_args.world_size}")
    if training_args.fp16:
        problems.append("fp16's loss scaler steps outside the recording; use --bf16 true (or fp32)")
    if training_args.activation_checkpointing:
        problems.append(
            "activation (gradient) checkpointing is not supported with it (its recomputation saves and restores "
            "the random state, which a recording cannot; untested): drop --activation_checkpointing"
        )
    mode = training_args.torch_compile_mode or "default"
    if training_args.torch_compile and ("reduce-overhead" in mode or mode == "max-autotune"):
        problems.append(
            f"--torch_compile_mode {mode} records CUDA graphs itself; use mode default (or "
            f"max-autotune-no-cudagraphs) with --cuda_graphs, or drop --cuda_graphs"
        )
    if problems:
        raise ValueError("--cuda_graphs true: " + "; ".join(problems) + ".")


def compile_shapes_advice(training_args: TrainingArguments, mt_args: MultiTaskArguments) -> str | None:
    """A compiled run whose batches may take any length compiles and records again and again."""
    if not training_args.torch_compile or mt_args.pad_to_buckets or mt_args.pad_to_multiple_of:
        return None
    mode = training_args.torch_compile_mode or "default"
    graphs = " and records another CUDA graph" if "reduce-overhead" in mode else ""
    return (
        f"--torch_compile true (mode {mode}) without --pad_to_buckets or --pad_to_multiple_of: each new batch "
        f"length is a new shape, which the compiler meets mid-run{graphs}. Pass --pad_to_buckets 16 32 64 128 "
        f"for a few fixed shapes (measured in bench/RESULTS.md, on one H100)."
    )


# ---------------------------------------------------------------------------------------------------------
# During training
# ---------------------------------------------------------------------------------------------------------


def _noticed(step: int, current: int) -> str:
    return "" if step == current else f"; noticed at step {current}"


class NonFiniteWatch:
    """Notes the first step whose training loss, or gradient norm, is not finite; `check` raises on it.

    Everything is recorded with tensor ops on the training device, so noting never waits for the GPU; only
    `check` reads the records on the host. With several processes every rank must stop at the same point, or
    the others wait in the next collective until it times out: `check` is then a collective that gathers the
    records of all ranks, and every rank raises the same error.
    """

    def __init__(self, task_names: list[str], device: torch.device, accelerator):
        n = len(task_names)
        self.task_names = list(task_names)
        self.accelerator = accelerator
        self.all_ranks = accelerator.num_processes > 1
        # The first step whose loss is not finite (0: none yet) and [loss, rows per task, loss per task] at that
        # step; likewise the first non-finite gradient norm and [norm, rows per task].
        self.loss_step = torch.zeros((), dtype=torch.long, device=device)
        self.loss_record = torch.zeros(1 + 2 * n, device=device)
        self.grad_step = torch.zeros((), dtype=torch.long, device=device)
        self.grad_record = torch.zeros(1 + n, device=device)
        self.step_rows = torch.zeros(n, device=device)  # rows per task in this optimizer step

    @torch.no_grad()
    def note_loss(self, step: int, loss: torch.Tensor, rows: torch.Tensor, task_losses: torch.Tensor) -> None:
        """One micro-batch: its loss, rows per task (tasks,) and loss per task (tasks,)."""
        self.step_rows += rows
        first = ~torch.isfinite(loss.detach()) & (self.loss_step == 0)
        self.loss_step = torch.where(first, step, self.loss_step)
        record = torch.cat([loss.detach().float().view(1), rows, task_losses])
        self.loss_record = torch.where(first, record, self.loss_record)

    @torch.no_grad()
    def note_grad_norm(self, step: int, grad_norm) -> None:
        """End of an optimizer step; `grad_norm` None: not watched (fp16's GradScaler skips such steps itself)."""
        step_rows, self.step_rows = self.step_rows, torch.zeros_like(self.step_rows)
        if grad_norm is None:
            return
        norm = torch.as_tensor(grad_norm, dtype=torch.float32).to(step_rows.device).reshape(1)
        first = ~torch.isfinite(norm[0]) & (self.grad_step == 0)
        self.grad_step = torch.where(first, step, self.grad_step)
        self.grad_record = torch.where(first, torch.cat([norm, step_rows]), self.grad_record)

    def check(self, current: int) -> None:
        """Raise `FloatingPointError` naming the first bad step and the task(s) of that batch (a collective with
        several processes: every rank calls it at the same point)."""
        if not self.all_ranks and not (int(self.loss_step) or int(self.grad_step)):
            return  # the usual case, checked every step on the CPU: two reads, nothing built
        mine = torch.cat(
            [
                torch.stack([self.loss_step, self.grad_step]).double(),
                self.loss_record.double(),
                self.grad_record.double(),
            ]
        )
        if self.all_ranks:
            ranks = self.accelerator.gather(mine.view(1, -1).to(self.accelerator.device)).cpu().view(-1, mine.numel())
        else:
            ranks = mine.view(1, -1).cpu()
        if ranks[:, :2].any():
            raise self._error(ranks, current)

    def _error(self, ranks: torch.Tensor, current: int) -> FloatingPointError:
        n = len(self.task_names)
        # The earliest event over the ranks; at equal steps a non-finite loss explains a non-finite gradient.
        events = []
        for rank, row in enumerate(ranks.tolist()):
            step, grad_step = int(row[0]), int(row[1])
            if step:
                events.append((step, 0, rank, row[2 : 3 + 2 * n]))
            if grad_step:
                events.append((grad_step, 1, rank, row[3 + 2 * n :]))
        step, kind, rank, record = min(events, key=lambda event: event[:3])
        where = f" in process {rank} of {len(ranks)}" if self.all_ranks else ""
        if kind == 1:
            tasks = [name for name, rows in zip(self.task_names, record[1:]) if rows > 0]
            return FloatingPointError(
                f"Non-finite gradient norm ({record[0]}) at step {step} on task(s) {tasks}{where}"
                f"{_noticed(step, current)}. Stopping instead of training on garbage: lower --learning_rate, "
                f"set --max_grad_norm, check the data of that task, or use fp32."
            )
        present = [name for name, rows in zip(self.task_names, record[1 : 1 + n]) if rows > 0]
        per_task = {name: loss for name, rows, loss in zip(self.task_names, record[1 : 1 + n], record[1 + n :]) if rows}
        return FloatingPointError(
            f"Non-finite training loss ({record[0]}) at step {step} on task(s) {present} (per-task: {per_task})"
            f"{where}{_noticed(step, current)}. Stopping instead of training on garbage: lower --learning_rate, "
            f"check the data of that task, or use fp32."
        )
