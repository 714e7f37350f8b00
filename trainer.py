"""`MultiTaskTrainer`: the `Trainer` of a multi-task run (train.py builds it; bench/ builds it directly).

It adds a task-interleaving batch sampler, per-task training statistics, metrics per eval set (each a head),
evaluation in length-sorted batches, each distinct input once, with named progress bars, a separate learning rate for the uncertainty loss
weights, the `--cuda_graphs` training step (cuda_graphs.py), the precision and distribution that accelerate
really uses (`precision_and_distribution`) and a stop at the first non-finite loss or gradient norm
(checks.NonFiniteWatch). Checkpoints hold no pickle and appear atomically (checkpoints.py).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from accelerate.utils import DistributedType
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import EvalPrediction, has_length

import checkpoints
import checks
import cuda_graphs
import distill
from sampler import MultiTaskBatchSampler, make_batch_sampler

if TYPE_CHECKING:  # train.py imports this module
    from train import MultiTaskArguments


class _TaskStatsCallback(TrainerCallback):
    """Logs each task's mean training loss and accuracy over every epoch."""

    def __init__(self, trainer: "MultiTaskTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.task_stats["epoch"].zero_()
        # The Trainer's own set_epoch misses the sampler when a run resumes mid-epoch with several processes:
        # the loader then holds SkipBatchSampler(BatchSamplerShard(sampler)), one level deeper than it looks.
        if self.trainer.batch_sampler is not None:
            self.trainer.batch_sampler.set_epoch(int(math.floor(state.epoch or 0)))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.log(self.trainer.pop_task_stats("epoch", "train_epoch"))


class _NamedProgressCallback(ProgressCallback):
    """The stock progress bars with a name: "train", and "eval <set>" for each eval set's pass."""

    def __init__(self, trainer: "MultiTaskTrainer"):
        super().__init__()
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc="train")
        self.current_step = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader) and self.prediction_bar is None:
            self.prediction_bar = tqdm(
                total=len(eval_dataloader),
                leave=self.training_bar is None,
                dynamic_ncols=True,
                desc=f"eval {self.trainer._eval_name or 'set'}",
            )
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)


def _first_rows(inverse: np.ndarray) -> list[int]:
    """The index of the first row of each distinct input, in the order the inputs were first seen."""
    _, first = np.unique(inverse, return_index=True)
    return first.tolist()


class LengthSortedSampler(Sampler):
    """Indices from the longest row to the shortest (ties in row order): each eval batch pads only to its own
    longest row, as `MultiTaskModel.predict` does. Metrics over a whole set do not depend on the order."""

    def __init__(self, lengths):
        self.order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


class MultiTaskTrainer(checkpoints.SafeCheckpointMixin, Trainer):
    """`Trainer` with a task-interleaving batch sampler, the model's joint loss and metrics per task.

    Checkpoints hold no pickle and appear atomically (see checkpoints.py).

    Eval sets are a dict name -> dataset; `eval_tasks` maps each name to the head it evaluates, giving
    `eval_<name>_{loss,accuracy,f1,precision,recall,f1_pos}`.
    """

    def __init__(self, *args, task_sizes, eval_tasks, mt_args: MultiTaskArguments, distilled_tasks=(), **kwargs):
        model, tokenizer = kwargs.get("model"), kwargs.get("processing_class")
        if model is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            # The Trainer copies the tokenizer's pad id into the config, with a warning, when they differ.
            model.config.pad_token_id = tokenizer.pad_token_id
        super().__init__(*args, **kwargs)
        self.task_sizes = list(task_sizes)
        self.eval_tasks = dict(eval_tasks)
        self.mt_args = mt_args
        self.distilled_tasks = list(distilled_tasks)  # tasks whose training rows carry a teacher's logits
        self.task_names = self.model.config.task_names
        self.batch_sampler: MultiTaskBatchSampler | None = None
        self._eval_task: str | None = None
        self._eval_name: str | None = None
        # (head, input ids) -> logits over one evaluate() round of every set; None outside a round (_deduplicated)
        self._eval_logits: dict[tuple, np.ndarray] | None = None
        # Per task: [sum of loss * rows, rows, correct rows, sum of the distillation term * rows], over the logging
        # interval and over the epoch.
        # Kept on the training device and read only at log time: a per-step .cpu() makes the CPU wait for the GPU.
        device = self.args.device
        self.task_stats = {k: torch.zeros(len(self.task_names), 4, device=device) for k in ("interval", "epoch")}
        self.nonfinite = checks.NonFiniteWatch(self.task_names, device, self.accelerator)
        # On the CPU reading the watch costs nothing, so check every step and stop before the bad update reaches
        # the weights; on an accelerator check at each log (one read) so no step waits for the GPU.
        self._check_every_step = device.type == "cpu"
        self._all_ranks = self.nonfinite.all_ranks
        self._non_embedding_parameters: int | None = None  # for floating_point_ops, counted once
        if self.args.logging_nan_inf_filter:
            # The stock filter would quietly replace a non-finite loss by the running mean, and reads the loss
            # on the host every step; _check_finite stops the run instead.
            self.args.logging_nan_inf_filter = False
        self.add_callback(_TaskStatsCallback(self))
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(_NamedProgressCallback(self))
        checks.check_cuda_graphs(self.args, mt_args, device.type == "cuda" or self.emulate_cuda_graphs)
        self.step_graphs: cuda_graphs.TrainStepGraphs | None = None  # built at the first step (--cuda_graphs)

    # Tests on machines without CUDA set this: --cuda_graphs then runs its bookkeeping with eager "replays".
    emulate_cuda_graphs = False
    # evaluate() reads each set longest row first (LengthSortedSampler); predict() keeps the dataset's order.
    sort_eval_by_length = True
    # evaluate() runs each distinct input of a set once and scores every row (_deduplicated) ...
    deduplicate_eval = True
    # ... and, in a round over every set, skips the inputs an earlier set of the round ran through the same head.
    share_eval_logits = True

    def precision_and_distribution(self) -> dict:
        """What the run really uses: accelerate's mixed precision (a launch config's `mixed_precision: bf16`
        autocasts even when TrainingArguments say bf16 False), its distributed type and process count, and a
        note when FSDP was asked for but accelerate fell back to plain data parallelism (no GPU)."""
        accelerator = self.accelerator
        info = {
            "mixed_precision": str(accelerator.mixed_precision),
            "mixed_precision_from": "TrainingArguments"
            if self.args.bf16 or self.args.fp16
            else "accelerate config" if accelerator.mixed_precision != "no" else "default",
            "distributed_type": str(accelerator.distributed_type.value),
            "num_processes": accelerator.num_processes,
        }
        fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(self.args.fsdp)
        if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:
            info["fsdp_fallback"] = (
                f"FSDP was requested but accelerate runs {info['distributed_type']} (no GPU on this machine): plain "
                f"data parallelism over {accelerator.num_processes} process(es), every process holds the whole model "
                "and its optimizer state."
            )
        return info

    # ---- checkpoints: the per-task running statistics resume with the run ----
    def checkpoint_extra_state(self) -> dict:
        return {f"task_stats_{k}": v.clone() for k, v in self.task_stats.items()}

    def restore_checkpoint_extra_state(self, extra: dict) -> None:
        # At an epoch boundary the finished epoch's statistics were logged (or lost with the kill): start at zero.
        at_epoch_boundary = float(self.state.epoch or 0).is_integer()
        for which, stats in self.task_stats.items():
            saved = extra.get(f"task_stats_{which}")
            if saved is not None and saved.shape == stats.shape and not (which == "epoch" and at_epoch_boundary):
                stats.copy_(saved)

    # ---- data ----
    def get_train_dataloader(self) -> DataLoader:
        lengths = self.train_dataset["length"][:] if self.mt_args.length_grouping else None
        self.batch_sampler = make_batch_sampler(
            self.task_sizes,
            batch_size=self._train_batch_size,
            strategy=self.mt_args.task_sampling,
            temperature=self.mt_args.task_sampling_temperature,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            lengths=lengths,
            drop_last=self.args.dataloader_drop_last,
        )
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
        )
        if loader.pin_memory:
            # A blocking host-to-device copy waits until the GPU has finished the previous step; pinned batches can
            # be copied asynchronously instead, so the host keeps queueing work.
            self.accelerator.dataloader_config.non_blocking = True
        # accelerate deals the global batch list to the ranks (BatchSamplerShard) and moves batches to device.
        return self.accelerator.prepare(loader)

    # ---- training ----
    def get_decay_parameter_names(self, model) -> list[str]:
        # Decaying the uncertainty log-variances would pull every task weight towards 1.
        return [n for n in super().get_decay_parameter_names(model) if not n.endswith("loss_log_vars")]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        opt_model = self.model if model is None else model
        log_vars = [p for n, p in opt_model.named_parameters() if n.endswith("loss_log_vars") and p.requires_grad]
        if log_vars and self.mt_args.loss_weights_learning_rate is not None:
            held = {id(p) for p in log_vars}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in held]
            optimizer.add_param_group(
                {"params": log_vars, "weight_decay": 0.0, "lr": self.mt_args.loss_weights_learning_rate}
            )
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.mt_args.cuda_graphs:
            return super().training_step(model, inputs, num_items_in_batch)
        # check_cuda_graphs has ruled out what the stock step adds here: gradient accumulation, several GPUs,
        # fp16 loss scaling.
        model.train()
        inputs = self._prepare_inputs(inputs)
        if self.step_graphs is None:
            params = [p for p in model.parameters() if p.requires_grad]

            def forward_backward(batch):
                outputs = model(**batch)
                self.accelerator.backward(outputs.loss)
                return outputs

            self.step_graphs = cuda_graphs.TrainStepGraphs(forward_backward, params, emulate=self.emulate_cuda_graphs)
        outputs = self.step_graphs(inputs)
        self._accumulate(outputs, inputs)
        if self._check_every_step:
            self._check_finite(current_step=self.state.global_step + 1)
        # A copy: the recorded loss is rewritten by the next replay.
        return outputs.loss.detach().clone()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_logits = inputs.pop("teacher_logits", None)  # training rows of a --distill_from run
        outputs = model(**inputs)
        loss = outputs.loss
        terms = None
        if teacher_logits is not None and model.training:
            terms = distill.distillation_terms(
                outputs.logits, teacher_logits, inputs["task_ids"], self.task_names, self.mt_args.distill_temperature
            )
            loss = loss + self.mt_args.distill_weight * torch.stack(list(terms.values())).sum()
        if model.training:
            self._accumulate(outputs, inputs, terms)
            if self._check_every_step and not self._all_ranks:
                # Several processes: the check waits for _get_grad_norm, which every rank reaches at each optimizer
                # step (a non-finite loss makes the averaged gradients non-finite on every rank).
                self._check_finite(current_step=self.state.global_step + 1)
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs) -> int:
        # The stock version walks every module and parameter each step (num_parameters) to count the same number.
        if self._non_embedding_parameters is None:
            self._non_embedding_parameters = self.accelerator.unwrap_model(self.model).num_parameters(
                exclude_embeddings=True
            )
        return 6 * inputs["input_ids"].numel() * self._non_embedding_parameters

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # A finite loss can still give non-finite gradients (overflow in backward); the optimizer step would
        # then write NaN into every weight. With fp16 the GradScaler skips such steps itself, so leave it be.
        watched = grad_norm is not None and getattr(self.accelerator, "scaler", None) is None
        self.nonfinite.note_grad_norm(self.state.global_step + 1, grad_norm if watched else None)
        if self._check_every_step and (watched or self._all_ranks):
            self._check_finite(current_step=self.state.global_step + 1)
        return grad_norm

    @torch.no_grad()
    def _accumulate(self, outputs, inputs, distill_terms: dict[str, torch.Tensor] | None = None) -> None:
        """Add this step's per-task loss, rows, correct rows and distillation term to the stats, and note a
        non-finite loss.

        Only tensor ops on the device: nothing here waits for the GPU, so the next step is queued at once.
        """
        task_ids, labels = inputs["task_ids"], inputs["labels"]
        own = task_ids[:, None] == torch.arange(len(self.task_names), device=task_ids.device)  # (batch, tasks)
        predictions = torch.stack([outputs.logits[name].argmax(-1) for name in self.task_names], dim=1)
        task_losses = torch.stack([outputs.task_losses[name].float() for name in self.task_names])  # (tasks,)
        rows = own.sum(0).float()
        correct = ((predictions == labels[:, None]) & own).sum(0).float()
        distilled = torch.zeros_like(task_losses)
        if distill_terms is not None:
            distilled = torch.stack([distill_terms[name].detach().float() for name in self.task_names])
        step = torch.stack([task_losses * rows, rows, correct, distilled * rows], dim=1)  # (tasks, 4)
        for stats in self.task_stats.values():
            stats += step
        self.nonfinite.note_loss(self.state.global_step + 1, outputs.loss, rows, task_losses)

    def _check_finite(self, current_step: int | None = None) -> None:
        """Stop on a non-finite training loss or gradient norm (checks.NonFiniteWatch).

        Checked at every log (one device->host read) rather than every step, so a run on an accelerator never
        waits for the loss; the steps between the bad one and the next log are the price.
        """
        self.nonfinite.check(self.state.global_step if current_step is None else current_step)

    def pop_task_stats(self, which: str, prefix: str) -> dict[str, float]:
        stats = self.task_stats[which]
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats.to(self.accelerator.device), "sum").cpu()
        logs = {}
        for index, name in enumerate(self.task_names):
            loss_sum, rows, correct, distill_sum = stats[index].tolist()
            if rows > 0:
                logs[f"{prefix}_{name}_loss"] = loss_sum / rows
                logs[f"{prefix}_{name}_accuracy"] = correct / rows
                if name in self.distilled_tasks:
                    logs[f"{prefix}_{name}_distill_loss"] = distill_sum / rows
        self.task_stats[which].zero_()
        return logs

    def task_loss_weights(self) -> dict[str, float]:
        model = self.accelerator.unwrap_model(self.model)
        if model.loss_log_vars is not None:
            return {n: float(torch.exp(-v)) for n, v in zip(self.task_names, model.loss_log_vars.detach().cpu())}
        return {n: float(model.config.task_weights.get(n, 1.0)) for n in self.task_names}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._check_finite()
        if "loss" in logs and "eval_loss" not in logs:  # a training log: every rank is here
            logs.update(self.pop_task_stats("interval", "train"))
            logs.update({f"loss_weight_{n}": w for n, w in self.task_loss_weights().items()})
        super().log(logs, start_time)

    # ---- evaluation ----
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        sets = self.eval_dataset if eval_dataset is None else eval_dataset
        if self.deduplicate_eval and self.share_eval_logits and isinstance(sets, dict) and self._eval_logits is None:
            # A round over every set: the Trainer calls evaluate() once per set, with the same weights throughout.
            self._eval_logits = {}
            try:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            finally:
                self._eval_logits = None
        name = metric_key_prefix.removeprefix("eval_")
        if name in self.eval_tasks:
            self._eval_task, self._eval_name = self.eval_tasks[name], name
        compute_metrics = self.compute_metrics
        if isinstance(eval_dataset, str) and isinstance(self.eval_dataset, dict):  # the Trainer passes set names
            eval_dataset = self.eval_dataset[eval_dataset]
        if self.deduplicate_eval and compute_metrics is not None and isinstance(eval_dataset, datasets.Dataset):
            eval_dataset, self.compute_metrics = self._deduplicated(eval_dataset, compute_metrics)
        self._evaluating = True
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._evaluating = False
            self.compute_metrics = compute_metrics

    def _deduplicated(self, dataset, compute_metrics):
        """Each distinct model input once: the dataset of the first rows of each (their `labels` column replaced by
        the input's index, carried through gathering and any sampler order), and a compute_metrics that gives every
        row of the full set its input's logits and its own label. Dialogue sets repeat many short turns ("yeah .",
        "uh-huh ."). Within one round over every set (`_eval_logits`), an input that an earlier set already ran
        through the same head is not run again: a `?`-free view runs only the rows that had a `?`."""
        if "labels" not in dataset.column_names or "input_ids" not in dataset.column_names:
            return dataset, compute_metrics
        first: dict[tuple, int] = {}
        inverse = np.array([first.setdefault(tuple(ids), len(first)) for ids in dataset["input_ids"][:]])
        cache, task = self._eval_logits, self._eval_task
        inputs = list(first)
        known = [] if cache is None else [i for i, ids in enumerate(inputs) if (task, ids) in cache]
        if cache is None and len(inputs) == len(dataset):
            return dataset, compute_metrics
        known_set = set(known)
        run = [i for i in range(len(inputs)) if i not in known_set] or [0]  # the Trainer's loop needs one batch
        first_rows = _first_rows(inverse)
        labels = np.asarray(dataset["labels"][:])
        # A new in-memory set rather than select + add_column, whose "Flattening the indices" pass shows its own
        # progress bar on every evaluation.
        columns = dataset.select([first_rows[i] for i in run]).with_format(None)[:]
        rows = datasets.Dataset.from_dict({**columns, "labels": run})

        def expanded(prediction: EvalPrediction):
            logits = np.asarray(prediction.predictions)
            by_input = np.empty((len(inputs), *logits.shape[1:]), dtype=logits.dtype)
            for i in known:
                by_input[i] = cache[(task, inputs[i])]
            ran = np.asarray(prediction.label_ids)
            by_input[ran] = logits
            if cache is not None:
                cache.update(((task, inputs[i]), by_input[i]) for i in ran.tolist())
            return compute_metrics(EvalPrediction(predictions=by_input[inverse], label_ids=labels))

        return rows, expanded

    def _get_eval_sampler(self, eval_dataset):
        columns = getattr(eval_dataset, "column_names", None) or []
        if not (self.sort_eval_by_length and getattr(self, "_evaluating", False) and "input_ids" in columns):
            return super()._get_eval_sampler(eval_dataset)
        lengths = eval_dataset["length"][:] if "length" in columns else [len(x) for x in eval_dataset["input_ids"][:]]
        return LengthSortedSampler(lengths)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self._eval_task is None:
            raise ValueError("MultiTaskTrainer.evaluate needs a named eval set (eval_dataset as a dict).")
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels", None)
        inputs.pop("task_ids", None)
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(**inputs, task=self._eval_task).logits  # (batch, num_labels)
        loss = None
        if labels is not None and (prediction_loss_only or self.compute_metrics is None):
            loss = F.cross_entropy(logits.float(), labels).detach()
        # Otherwise compute_metrics takes the loss over the gathered logits: the Trainer's mean of per-batch losses
        # would count the rows accelerate repeats to even out the last batch over several processes.
        return loss, (None if prediction_loss_only else logits.detach()), labels
