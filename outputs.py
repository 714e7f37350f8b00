"""What a run leaves behind: its metrics, metrics.json, the plots and the output folder.

`build_compute_metrics` gives the Trainer its per-eval-set metrics; `split_eval_metrics`, `epoch_table` and
`step_table` turn the Trainer's flat logs into metrics.json's layout, and `run_metrics` assembles the whole file,
including what the model card says about each task (`task_card_info`, `eval_set_card_info`: read from the
TaskSpecs and their pools at training time, so hub.py needs no task registry). `plot_curves` draws the plots,
`result_files` the Trainer-style *_results.json. `save_outputs` writes the final folder atomically;
`take_over_push_to_hub` settles the upload before training (the folder's lock and the run it replaces: run_folder.py).
"""

from __future__ import annotations

import dataclasses
import copy
import functools
import json
import logging
import os
import platform
import re
import shutil
from pathlib import Path

import torch
import transformers
from torch.nn import functional as F
from transformers import TrainingArguments

import checkpoints
import hub
import pipeline_multitask
import lora
from modeling_multitask import MultiTaskModel

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
# Readable names of the datasets of the built-in tasks; any other dataset is shown by its id.
DATASET_NAMES = {
    "stanfordnlp/sst2": "SST-2",
    "CogComp/trec": "TREC",
    "li2017dailydialog/daily_dialog": "DailyDialog",
    "swda": "Switchboard (SwDA)",
}


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


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
        scores = metric.compute(
            predictions=predictions.tolist(), references=labels.tolist(), num_labels=int(logits.shape[-1])
        )
        return {"loss": loss, **scores}

    return compute_metrics


EVAL_METRICS = ("loss", "accuracy", "f1", "precision", "recall", "f1_pos")
# A multi-class task's macro and per-class metrics (metrics/classification): precision_macro, f1_3, ...
PER_CLASS_METRIC = re.compile(r"(?:precision|recall|f1)_(?:macro|\d+)")


def split_eval_metrics(metrics: dict, eval_names: list[str]) -> dict[str, dict]:
    """{"eval_question_gold_f1": x, ...} -> {"question_gold": {"f1": x}, ...} (names may prefix each other)."""
    out = {}
    for name in eval_names:
        prefix = f"eval_{name}_"
        values = {m: metrics[prefix + m] for m in EVAL_METRICS if prefix + m in metrics}
        for key, value in metrics.items():
            if key.startswith(prefix) and PER_CLASS_METRIC.fullmatch(key[len(prefix) :]):
                values[key[len(prefix) :]] = value
        out[name] = values
    return out



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


def step_table(log_history: list[dict], task_names: list[str]) -> list[dict]:
    """One row per training log (every `logging_steps`): the joint loss and each task's loss and accuracy over
    the batches of that interval (tasks without a batch in it are absent)."""
    rows = []
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        tasks = {}
        for task in task_names:
            values = {m: entry[f"train_{task}_{m}"] for m in ("loss", "accuracy") if f"train_{task}_{m}" in entry}
            if values:
                tasks[task] = values
        rows.append({"step": entry["step"], "epoch": round(entry.get("epoch", 0.0), 4), "loss": entry["loss"],
                     "tasks": tasks})  # fmt: skip
    return rows


def pool_teacher(spec) -> str | None:
    """The rule that labelled a weakly labelled task's pool (question: --question_teacher), if it names one."""
    return getattr(getattr(spec.pool, "args", None), "question_teacher", None)


def pool_options(spec) -> dict:
    """The options of a weakly labelled task's pool as this run set them (question: the QuestionArguments)."""
    args = getattr(spec.pool, "args", None)
    return dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {}


def source_display(source) -> str:
    """'SST-2 validation', 'DailyDialog validation, strip question marks': a `data.Source` for readers."""
    name = DATASET_NAMES.get(source.dataset, source.dataset)
    extra = f", {source.transform.__name__.replace('_', ' ')}" if source.transform is not None else ""
    return f"{name} {source.split}{extra}"


def _local(source, spec) -> bool:
    """A task's own data file with no dataset id given (`dataset` then is the task's name): not a Hub dataset."""
    return source.path is not None and source.dataset == spec.name


def task_card_info(spec) -> dict:
    """What the model card says about a task (a `data.TaskSpec`): its description, training sources, headline
    metric and, for a weakly labelled task, the teacher rule and the pool options of this run."""
    info = {
        "description": spec.description,
        "sources": [
            {"dataset": s.dataset, "split": s.split, "display": source_display(s), "local": _local(s, spec)}
            for s in spec.train
        ],
        "headline_metric": getattr(spec, "headline_metric", "accuracy"),
    }
    if spec.pool is not None:
        info["teacher"] = pool_teacher(spec)
        info["pool_options"] = pool_options(spec)
    return info


def eval_set_card_info(name: str, spec) -> dict:
    """Where eval set `name` of task `spec` comes from: the dataset id, a readable name, the split, the text
    transform if any, and whether its labels are gold or the teacher's. A held-out part of a weakly labelled pool
    is no split of any Hub dataset: its `dataset` is a custom id, `<task>-pool-heldout`."""
    for ev in spec.eval:
        if ev.name == name:
            transform = ev.source.transform.__name__ if ev.source.transform is not None else None
            return {
                "dataset": ev.source.dataset,
                "dataset_name": source_display(ev.source),
                "split": ev.source.split,
                "transform": transform,
                "labels": "gold",
            }
    if spec.holdout_name == name and spec.train:
        pool = " + ".join(f"{DATASET_NAMES.get(s.dataset, s.dataset)} {s.split}" for s in spec.train)
        teacher = pool_teacher(spec)
        by = f"labelled by the `{teacher}` teacher rule" if teacher else "labelled by the task's rule"
        return {
            "dataset": f"{spec.name}-pool-heldout",
            "dataset_name": f"held-out part of the {spec.name} training pool ({pool}), {by}",
            "split": "heldout",
            "transform": None,
            "labels": "teacher",
        }
    return {"dataset": name, "dataset_name": name, "split": "validation", "transform": None, "labels": "gold"}


def run_metrics(
    tasks: list, mt, trainer, train_result, evals: dict, heuristics: dict, counts: dict, args: tuple
) -> dict:
    """metrics.json: tasks (with what the card says about them), eval sets, metrics before/per epoch/final,
    the question heuristics' own metrics, training figures and the recipe. `evals` holds "before" and "final";
    `counts` wall_seconds, trainable_parameters and total_parameters (counted before the Trainer shards the
    model); `args` is (model_args, data_args, mt_args, training_args)."""
    model_args, data_args, mt_args, training_args = args
    specs = {t.name: t for t in tasks}
    eval_names = list(mt.eval_sets)
    task_names = [t.name for t in tasks]
    return {
        "tasks": [{**t.to_config(), **task_card_info(t)} for t in tasks],
        "eval_sets": {
            n: {
                "task": mt.eval_tasks[n],
                "rows": len(mt.eval_sets[n]),
                **({"capped": mt.eval_capped[n]} if n in getattr(mt, "eval_capped", {}) else {}),
                **eval_set_card_info(n, specs[mt.eval_tasks[n]]),
            }
            for n in eval_names
        },
        "before": evals["before"],
        "epochs": epoch_table(trainer.state.log_history, eval_names, task_names),
        "steps": step_table(trainer.state.log_history, task_names),
        "final": evals["final"],
        "heuristics": heuristics,
        "train": {
            "rows_per_task": dict(zip(task_names, mt.task_sizes)),
            "global_steps": trainer.state.global_step,
            "epochs": training_args.num_train_epochs if training_args.max_steps <= 0 else None,
            "max_steps": training_args.max_steps,
            "train_loss": train_result.training_loss,
            "samples_per_second": train_result.metrics.get("train_samples_per_second"),
            "wall_seconds": round(counts["wall_seconds"], 1),
            "trainable_parameters": counts["trainable_parameters"],
            "total_parameters": counts["total_parameters"],
            "loss_weights": trainer.task_loss_weights(),
            "trainer_metrics": dict(train_result.metrics),  # train_results.json, as Trainer.save_metrics writes it
        },
        "recipe": {
            "encoder": model_args.encoder,
            "tasks": data_args.tasks,
            "task_definitions": task_definitions_record(data_args.task_definitions, data_args.tasks),
            "freeze": mt_args.freeze,
            "unfreeze": mt_args.unfreeze,
            "task_sampling": mt_args.task_sampling,
            "task_sampling_temperature": mt_args.task_sampling_temperature,
            "loss_weighting": mt_args.loss_weighting,
            "distillation": distillation_recipe(mt_args, mt),
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "learning_rate": training_args.learning_rate,
            "num_processes": training_args.world_size,
            **trainer.precision_and_distribution(),
            "max_seq_length": data_args.max_seq_length,
            "max_train_samples": data_args.max_train_samples,
            "max_eval_samples": data_args.max_eval_samples,
            "max_gold_eval_samples": getattr(data_args, "max_gold_eval_samples", None),
            "data_dir": data_args.data_dir,  # None: the datasets came from the Hub
            "report_to": list(training_args.report_to or []),
            "seed": training_args.seed,
            "hardware": hardware_summary(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        },
    }


def task_definitions_record(definitions, tasks: list[str]) -> list[dict] | None:
    """The config's `task_definitions` of the run's tasks (the list, or its JSON as on the command line), so that
    the record names where a custom task's data came from; None when the run has none."""
    if isinstance(definitions, str):
        definitions = json.loads(definitions) if definitions.strip() else None
    used = [d for d in definitions or [] if d.get("name") in tasks]
    return used or None


def distillation_recipe(mt_args, mt) -> dict | None:
    """What --distill_from did in this run: the teacher(s), the tasks they labelled and the loss settings; None
    without a teacher."""
    if not getattr(mt_args, "distill_from", None):
        return None
    return {
        "teachers": list(mt_args.distill_from),
        "tasks": list(mt.distilled_tasks),
        "weight": mt_args.distill_weight,
        "temperature": mt_args.distill_temperature,
    }


def hardware_summary() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def cpu_name() -> str:
    """The processor's model name ("Intel(R) Xeon(R) Processor", "AMD EPYC 7B13") where Linux tells it, else the
    platform's word for it ("arm", "x86_64"): CPU timings are only comparable on the same processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------------------


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


def save_and_push(
    trainer,
    tokenizer,
    metrics: dict,
    export_sentence_transformers: str,
    hub_repo: str | None,
    lora_settings: dict | None = None,
    on_saved=None,
) -> None:
    """Save the final folder (rank 0) and, with --push_to_hub, upload it once; every rank calls this.
    With LoRA (`lora_settings`) the adapters are merged into a copy of the model, which is what gets saved.

    `on_saved()` runs on rank 0 once the folder is complete, before the upload (train.py deletes the run that
    --overwrite_output_dir replaces there: a failed upload must not cost the saved run)."""
    training_args = trainer.args
    model, adapter_model, state_dict = trainer.accelerator.unwrap_model(trainer.model), None, None
    if lora_settings is not None:
        # An ordinary MultiTaskModel folder (no peft needed to load it); lora refuses FSDP, so no collective here.
        adapter_model = model if lora_settings["save"] == "adapter" else None
        model = lora.merged_copy(model) if trainer.is_world_process_zero() else None
    else:
        # Under FSDP gathering the full weights is a collective: every rank takes part, then rank 0 writes them.
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        saved = save_outputs(
            model,
            tokenizer,
            metrics,
            training_args,
            state_dict=state_dict,
            export_sentence_transformers=export_sentence_transformers,
            model_id=hub_repo,
            trainer_state=trainer.state,
            adapter_model=adapter_model,
        )
        if on_saved is not None:
            on_saved()
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


def save_outputs(
    model: MultiTaskModel,
    tokenizer,
    metrics: dict,
    training_args: TrainingArguments,
    state_dict: dict | None = None,
    export_sentence_transformers: str = "inline",
    model_id: str | None = None,
    trainer_state=None,
    adapter_model: MultiTaskModel | None = None,
) -> list[str]:
    """Write the model, tokenizer, plots, metrics.json (plus the Trainer-style *_results.json and
    trainer_state.json), the model card (README.md) and the sentence-transformers files into a staging folder,
    then move them into place, metrics.json last: a killed run never leaves a folder that looks finished. Returns
    the top-level names written (what push_to_hub uploads).
    `adapter_model` (--lora_save adapter): the unmerged LoRA model whose adapter replaces the full weights."""
    out = Path(training_args.output_dir)
    staging = out / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model_files(model, tokenizer, staging, state_dict=state_dict)
    if adapter_model is not None:
        lora.save_adapter(adapter_model, staging)
    plot_curves(metrics, staging)
    (staging / "training_args.json").write_text(training_args.to_json_string(), encoding="utf-8")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    for name, values in result_files(metrics).items():
        (staging / name).write_text(json.dumps(values, indent=2, sort_keys=True), encoding="utf-8")
    if trainer_state is not None:
        trainer_state.save_to_json(str(staging / "trainer_state.json"))  # the final state (Trainer.save_state)
    if export_sentence_transformers == "inline":
        hub.export_sentence_transformers(model, tokenizer, staging)
    elif export_sentence_transformers != "none":
        written = hub.export_sentence_transformers(model, tokenizer, export_sentence_transformers)
        checkpoints.write_manifest(export_sentence_transformers, written)
        logger.info("Wrote a sentence-transformers folder to %s", export_sentence_transformers)
    # The card's usage snippet loads the Hub repo, or this folder where it will end up.
    hub.render_card(staging, model_id=model_id or str(out.resolve()))
    names = sorted(p.name for p in staging.iterdir() if p.name != "metrics.json") + ["metrics.json"]
    checkpoints.write_manifest(staging, names)  # every file written here: what a push uploads, nothing else
    for name in [checkpoints.MANIFEST_NAME, *names]:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
    logger.info("Saved model, tokenizer, plots, model card and metrics.json to %s", out)
    return names


PLOT_FILES = {"loss": "loss_curves.png", "accuracy": "accuracy_curves.png", "f1": "f1_curves.png"}
# macro F1 over the classes: the question-class F1 that the README and the card headline is in metrics.json (f1_pos)
PLOT_TITLES = {"f1": "macro F1"}


def save_model_files(model: MultiTaskModel, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """The loadable part of the folder: weights, config.json (with `auto_map` and `custom_pipelines`), the remote
    code (modeling_multitask.py, copied by save_pretrained; pipeline_multitask.py) and the tokenizer."""
    model.config.custom_pipelines = copy.deepcopy(pipeline_multitask.CUSTOM_PIPELINES)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    shutil.copy(Path(pipeline_multitask.__file__), Path(folder) / "pipeline_multitask.py")
    tokenizer.save_pretrained(folder)


def plot_curves(metrics: dict, output_dir: Path) -> list[str]:
    """loss_curves.png, accuracy_curves.png, f1_curves.png: one panel per task, x = epoch (0 = before training).

    Training loss and accuracy are drawn at every logging step (the mean over that interval's batches of the
    task), so a one-epoch run shows its whole curve; each eval set of the task is a marker per evaluation
    (before training and after each epoch or eval step), its last value written beside it. Training F1 is not
    computed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t["name"] for t in metrics["tasks"]]
    written = []
    for metric, filename in PLOT_FILES.items():
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            steps = [row for row in metrics.get("steps", []) if metric in row["tasks"].get(task, {})]
            if steps:
                ax.plot([r["epoch"] for r in steps], [r["tasks"][task][metric] for r in steps], linewidth=1.2,
                        label=f"train ({len(steps)} logging steps)")  # fmt: skip
            for name, entry in metrics["eval_sets"].items():
                if entry["task"] != task:
                    continue
                before = metrics.get("before", {}).get(name, {})
                points = [(0.0, before[metric])] if metric in before else []
                points += [
                    (r["epoch"], r["eval"][name][metric]) for r in metrics["epochs"] if metric in r["eval"].get(name, {})
                ]
                if not points:
                    continue
                xs, ys = zip(*points)
                line = ax.plot(xs, ys, marker="o", markersize=6, linestyle=":", linewidth=1, label=f"eval {name}")[0]
                ax.annotate(f"{ys[-1]:.3f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())  # fmt: skip
            ax.set_title(f"{task}: {PLOT_TITLES.get(metric, metric)}")
            ax.set_xlabel("epoch (0 = before training)")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(output_dir / filename, dpi=110)
        plt.close(fig)
        written.append(filename)
    return written


def result_files(metrics: dict) -> dict[str, dict]:
    """train_results.json, eval_results.json and all_results.json as `Trainer.save_metrics` writes them: the
    Trainer's train metrics, and the final eval metrics flat (`eval_<set>_<metric>`)."""
    train = dict(metrics["train"].get("trainer_metrics", {}))
    train["train_samples"] = sum(metrics["train"]["rows_per_task"].values())
    final = {f"eval_{name}_{k}": v for name, values in metrics["final"].items() for k, v in values.items()}
    final.update({f"eval_{name}_samples": metrics["eval_sets"][name]["rows"] for name in metrics["final"]})
    if "epoch" in train:
        final["epoch"] = train["epoch"]
    return {"train_results.json": train, "eval_results.json": final, "all_results.json": {**train, **final}}
