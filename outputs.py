"""What a run leaves behind: its metrics, metrics.json, the plots and the output folder.

`build_compute_metrics` gives the Trainer its per-eval-set metrics; `split_eval_metrics` and `epoch_table` turn
the Trainer's flat logs into metrics.json's layout, and `run_metrics` assembles the whole file, including what
the model card says about each task (`task_card_info`, `eval_set_card_info`: read from the TaskSpecs at training
time, so hub.py needs no task registry). `save_outputs` writes the final folder atomically; `clear_output_dir`
and `take_over_push_to_hub` handle the folder and the upload settings before training.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shutil
from pathlib import Path

import torch
import transformers
from torch.nn import functional as F
from transformers import TrainingArguments

import hub
import lora
from modeling_multitask import MultiTaskModel

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
# Readable names of the datasets of the built-in tasks; any other dataset is shown by its id.
DATASET_NAMES = {"stanfordnlp/sst2": "SST-2", "CogComp/trec": "TREC", "li2017dailydialog/daily_dialog": "DailyDialog"}


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
        return {"loss": loss, **metric.compute(predictions=predictions.tolist(), references=labels.tolist())}

    return compute_metrics


EVAL_METRICS = ("loss", "accuracy", "f1", "precision", "recall", "f1_pos")


def split_eval_metrics(metrics: dict, eval_names: list[str]) -> dict[str, dict]:
    """{"eval_question_gold_f1": x, ...} -> {"question_gold": {"f1": x}, ...} (names may prefix each other)."""
    return {
        name: {m: metrics[f"eval_{name}_{m}"] for m in EVAL_METRICS if f"eval_{name}_{m}" in metrics}
        for name in eval_names
    }



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


def source_display(source) -> str:
    """'SST-2 validation', 'DailyDialog validation, strip question marks': a `data.Source` for readers."""
    name = DATASET_NAMES.get(source.dataset, source.dataset)
    extra = f", {source.transform.__name__.replace('_', ' ')}" if source.transform is not None else ""
    return f"{name} {source.split}{extra}"


def task_card_info(spec) -> dict:
    """What the model card says about a task (a `data.TaskSpec`): its description and training sources."""
    return {
        "description": spec.description,
        "sources": [{"dataset": s.dataset, "split": s.split, "display": source_display(s)} for s in spec.train],
    }


def eval_set_card_info(name: str, spec) -> dict:
    """Where eval set `name` of task `spec` comes from: the Hub dataset id, a readable name and the split."""
    for ev in spec.eval:
        if ev.name == name:
            return {"dataset": ev.source.dataset, "dataset_name": source_display(ev.source), "split": ev.source.split}
    if spec.holdout_name == name and spec.train:
        pool = " + ".join(DATASET_NAMES.get(s.dataset, s.dataset) for s in spec.train)
        kind = "heuristic labels" if spec.label_fn is not None else "gold labels"
        first = spec.train[0]
        return {
            "dataset": first.dataset,
            "dataset_name": f"held-out part of the {spec.name} training pool ({pool} {first.split}, {kind})",
            "split": f"{first.split} (held out)",
        }
    return {"dataset": name, "dataset_name": name, "split": "validation"}


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
                **eval_set_card_info(n, specs[mt.eval_tasks[n]]),
            }
            for n in eval_names
        },
        "before": evals["before"],
        "epochs": epoch_table(trainer.state.log_history, eval_names, task_names),
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


def hardware_summary() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    processor = platform.processor() or platform.machine()
    return f"CPU ({processor}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


# ---------------------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------------------


def clear_output_dir(training_args: TrainingArguments) -> None:
    out = Path(training_args.output_dir)
    if out.is_dir() and any(out.iterdir()):
        logger.warning("--overwrite_output_dir: deleting the previous run in %s.", out)
        shutil.rmtree(out)


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
) -> None:
    """Save the final folder (rank 0) and, with --push_to_hub, upload it once; every rank calls this.
    With LoRA (`lora_settings`) the adapters are merged into a copy of the model, which is what gets saved."""
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
            adapter_model=adapter_model,
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


def save_outputs(
    model: MultiTaskModel,
    tokenizer,
    metrics: dict,
    training_args: TrainingArguments,
    state_dict: dict | None = None,
    export_sentence_transformers: str = "inline",
    model_id: str | None = None,
    adapter_model: MultiTaskModel | None = None,
) -> list[str]:
    """Write the model, tokenizer, plots, metrics.json, the model card (README.md) and the sentence-transformers
    files into a staging folder, then move them into place, metrics.json last: a killed run never leaves a folder
    that looks finished. Returns the top-level names written (what push_to_hub uploads).
    `adapter_model` (--lora_save adapter): the unmerged LoRA model whose adapter replaces the full weights."""
    out = Path(training_args.output_dir)
    staging = out / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
    if adapter_model is not None:
        lora.save_adapter(adapter_model, staging)
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
