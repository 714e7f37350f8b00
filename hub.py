"""Turn a finished run folder into what others use: the model card, a sentence-transformers view, the Hub upload.

    metrics.json + config.json --(model_card.md, Jinja)--> README.md (YAML metadata with model-index + the page)
    model.encoder + tokenizer --> 0_Transformer/ + 1_Pooling/ + modules.json (SentenceTransformer(folder) works)
    folder --(HfApi.create_repo + upload_folder)--> https://huggingface.co/<repo id>

What the card says about each task (description, training sources, label names) and each eval set (dataset,
split) is read from metrics.json, which train.py writes from the task definitions: custom tasks get the same card.
`train.py` calls these at the end of a run. The command line re-does one step on an existing folder:

    python hub.py card runs/quick [--model_id me/multitask-minilm]    # re-render README.md from metrics.json
    python hub.py export-st runs/quick exported/                       # a standalone sentence-transformers folder
    python hub.py push runs/quick --hub_model_id me/multitask-minilm   # create the repo, upload the folder
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
CARD_TEMPLATE = ROOT / "model_card.md"
PLOTS = ("loss_curves.png", "accuracy_curves.png")
# The metrics of the model-index, as (metrics.json key, display name, metric args).
CARD_METRICS = (("accuracy", "Accuracy", None), ("f1", "Macro F1", {"average": "macro"}))
LICENSE = "apache-2.0"  # the packaged encoder's (all-MiniLM-L6-v2) licence

# sentence-transformers layout: the encoder (a plain transformers model) in a subfolder, then mean pooling.
# The encoder weights are stored twice (here and inside model.safetensors): the multi-task checkpoint must load
# with AutoModel in one file, and sentence-transformers can only load a plain encoder checkpoint.
ST_TRANSFORMER_DIR = "0_Transformer"
ST_POOLING_DIR = "1_Pooling"
ST_ROOT_FILES = ("modules.json", "config_sentence_transformers.json")
# What a run folder holds besides the model and must not be uploaded: Trainer checkpoints, TensorBoard logs,
# the staging folder of an unfinished save, hidden files.
NOT_UPLOADED_PREFIXES = ("checkpoint-", ".")
NOT_UPLOADED_NAMES = ("runs",)


# ---------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------


def hub_id_or_none(name: str | None) -> str | None:
    """`name` if it can be a Hub model id (metadata `base_model` must be one), None for local folders."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).exists() or name.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def eval_set_info(name: str, entry: dict) -> dict:
    """Where an eval set's rows come from: the Hub dataset id, a readable name and the split.

    train.py writes them into metrics.json's `eval_sets` entry (outputs.eval_set_card_info); a metrics.json
    from before that names only the set.
    """
    return {
        "type": entry.get("dataset", name),
        "name": entry.get("dataset_name", name),
        "split": entry.get("split", "validation"),
    }


def training_datasets(metrics: dict) -> list[str]:
    """Hub ids of every dataset the run trained or was evaluated on."""
    ids = [source["dataset"] for task in metrics["tasks"] for source in task.get("sources", [])]
    ids += [eval_set_info(n, e)["type"] for n, e in metrics["eval_sets"].items()]
    return list(dict.fromkeys(ids))


def eval_results(metrics: dict) -> list:
    """One `EvalResult` per eval set and metric (accuracy, macro F1), with exactly the numbers of metrics.json.

    The eval set's name is the result's `dataset_config`: the model-index groups results by task type, dataset,
    config and split, and two sets can share a dataset and split (DailyDialog with and without '?'). It also
    lets `model_index_to_eval_results` map every result back to its metrics.json entry.
    """
    from huggingface_hub import EvalResult

    results = []
    for name, values in metrics["final"].items():
        task = metrics["eval_sets"][name]["task"]
        info = eval_set_info(name, metrics["eval_sets"][name])
        for key, display, args in CARD_METRICS:
            if key not in values:
                continue
            results.append(
                EvalResult(
                    task_type="text-classification",
                    task_name=task,
                    dataset_type=info["type"],
                    dataset_name=info["name"],
                    dataset_config=name,
                    dataset_split=info["split"],
                    metric_type=key,
                    metric_name=display,
                    metric_args=args,
                    metric_value=values[key],
                )
            )
    return results


def card_data(metrics: dict, model_name: str, sentence_transformers: bool):
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import eval_results_to_model_index

    tags = ["multi-task", "text-classification", "sentence-embeddings", "custom_code"]
    tags += [t["name"] for t in metrics["tasks"]]
    if sentence_transformers:
        tags.insert(0, "sentence-transformers")
    data = ModelCardData(
        language="en",
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="text-classification",
        base_model=hub_id_or_none(metrics["recipe"]["encoder"]),
        datasets=training_datasets(metrics),
        tags=tags,
        metrics=[key for key, _, _ in CARD_METRICS],
    )
    # Set as raw metadata rather than via `eval_results=`: ModelCardData would rebuild it the same way, but
    # building it here keeps the one place that decides the model-index visible.
    data["model-index"] = eval_results_to_model_index(model_name, eval_results(metrics))
    return data


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _freezing(freeze: list[str], unfreeze: list[str]) -> str:
    freeze = [f for f in freeze if f != "none"]
    unfreeze = [f for f in unfreeze if f != "none"]
    if not freeze:
        return "none (every parameter trained)"
    text = "freeze " + ", ".join(f"`{f}`" for f in freeze)
    return text + (", then unfreeze " + ", ".join(f"`{f}`" for f in unfreeze) if unfreeze else "")


def _recipe_rows(metrics: dict, config: dict) -> list[tuple[str, str]]:
    recipe, train = metrics["recipe"], metrics["train"]
    epochs = metrics["epochs"][-1]["epoch"] if metrics["epochs"] else None
    if train.get("max_steps", -1) and train["max_steps"] > 0:
        length = f"{train['global_steps']} optimizer steps (max_steps={train['max_steps']}, {_fmt(epochs, 2)} epochs)"
    else:
        length = f"{_fmt(train.get('epochs'))} epochs ({train['global_steps']} optimizer steps)"
    sampling = recipe["task_sampling"]
    if sampling == "temperature":
        sampling += f" (T={recipe['task_sampling_temperature']})"
    weights = ", ".join(f"{k} {v:.3g}" for k, v in train.get("loss_weights", {}).items())
    rows = [
        ("Encoder", f"`{recipe['encoder']}`"),
        ("Pooling", f"{config.get('pooling', 'mean')} over tokens, {config.get('encoder', {}).get('hidden_size')}-d"),
        ("Freezing", _freezing(recipe["freeze"], recipe["unfreeze"])),
        ("Parameters", f"{train['trainable_parameters']:,} trainable of {train['total_parameters']:,}"),
        ("Task sampling", f"{sampling}, one task per batch"),
        ("Loss weighting", f"{recipe['loss_weighting']} ({weights})" if weights else recipe["loss_weighting"]),
        ("Training rows", ", ".join(f"{k} {v:,}" for k, v in train["rows_per_task"].items())),
        ("Length", length),
        ("Batch size", f"{recipe['per_device_train_batch_size']} per device x {recipe['num_processes']} process(es)"),
        ("Learning rate", f"{recipe['learning_rate']:g}"),
        ("Seed", str(recipe["seed"])),
        ("Hardware", recipe["hardware"]),
        ("Training time", f"{_duration(train.get('wall_seconds'))} (train loss {_fmt(train.get('train_loss'))})"),
        ("Software", ", ".join(f"{k} {v}" for k, v in recipe.get("versions", {}).items())),
    ]
    lora = recipe.get("lora")
    if lora:
        targets = ", ".join(f"`{t}`" for t in lora["target_modules"])
        saved = "merged into the saved weights" if lora["save"] == "merged" else "saved as an adapter (peft format)"
        freezing = "the encoder's own weights (LoRA trains adapters on them)"
        if [f for f in recipe["freeze"] if f != "none"]:
            freezing += "; " + _freezing(recipe["freeze"], recipe["unfreeze"])
        rows[2] = ("Freezing", freezing)
        settings = f"rank {lora['r']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g} on {targets}; {saved}"
        rows.insert(3, ("LoRA", settings))
    return rows


def _epoch_table(metrics: dict, task: str, eval_names: list[str]) -> dict:
    """Rows: before training (epoch 0), then every logged epoch/evaluation: train loss/acc + this task's eval sets."""
    header = ["epoch", "step", "train loss", "train acc"]
    for name in eval_names:
        header += [f"{name} loss", f"{name} acc", f"{name} F1"]
    rows = []
    if any(name in metrics.get("before", {}) for name in eval_names):
        row = ["0 (before)", "0", "–", "–"]
        for name in eval_names:
            values = metrics["before"].get(name, {})
            row += [_fmt(values.get("loss")), _fmt(values.get("accuracy")), _fmt(values.get("f1"))]
        rows.append(row)
    for entry in metrics["epochs"]:
        train = entry["train"].get(task, {})
        if not train and not any(name in entry["eval"] for name in eval_names):
            continue
        row = [_fmt(entry["epoch"], 2), str(entry.get("step", "–")), _fmt(train.get("loss")), _fmt(train.get("accuracy"))]
        for name in eval_names:
            values = entry["eval"].get(name, {})
            row += [_fmt(values.get("loss")), _fmt(values.get("accuracy")), _fmt(values.get("f1"))]
        rows.append(row)
    return {"task": task, "header": header, "rows": rows}


def card_context(metrics: dict, config: dict, model_id: str, folder: Path, image_prefix: str = "") -> dict:
    """Everything the template shows, formatted; the template only lays it out."""
    eval_sets = metrics["eval_sets"]
    tasks = []
    for task in metrics["tasks"]:
        labels = [task["id2label"][k] for k in sorted(task["id2label"], key=int)]
        sources = task.get("sources", [])
        names = [n for n, e in eval_sets.items() if e["task"] == task["name"]]
        tasks.append(
            {
                "name": task["name"],
                "labels": labels,
                "description": task.get("description", ""),
                "trained_on": " + ".join(s["display"] for s in sources) if sources else "–",
                "eval_sets": names,
                "epoch_table": _epoch_table(metrics, task["name"], names),
            }
        )
    results = []
    for name, entry in eval_sets.items():
        before, after = metrics.get("before", {}).get(name, {}), metrics["final"].get(name, {})
        results.append(
            {
                "name": name,
                "task": entry["task"],
                "rows": f"{entry['rows']:,}",
                "dataset": eval_set_info(name, entry)["name"],
                "acc_before": _fmt(before.get("accuracy")),
                "acc_after": _fmt(after.get("accuracy")),
                "f1_before": _fmt(before.get("f1")),
                "f1_after": _fmt(after.get("f1")),
            }
        )
    heuristics = []
    for name, rules in metrics.get("heuristics", {}).items():
        after = metrics["final"].get(name, {})
        heuristics.append(
            {
                "name": name,
                "model": (_fmt(after.get("accuracy")), _fmt(after.get("f1"))),
                "rules": [(rule, _fmt(v.get("accuracy")), _fmt(v.get("f1"))) for rule, v in rules.items()],
            }
        )
    return {
        "model_id": model_id,
        "model_name": model_id.rstrip("/").split("/")[-1],
        "encoder": metrics["recipe"]["encoder"],
        "base_model": hub_id_or_none(metrics["recipe"]["encoder"]),
        "pooling": config.get("pooling", "mean"),
        "hidden_size": config.get("encoder", {}).get("hidden_size"),
        "tasks": tasks,
        "task_names": [t["name"] for t in tasks],
        "results": results,
        "heuristics": heuristics,
        "recipe": _recipe_rows(metrics, config),
        "plots": [image_prefix + p for p in PLOTS if (folder / p).is_file()],
        "sentence_transformers": (folder / "modules.json").is_file(),
        "has_question_task": any(t["name"] == "question" for t in tasks),
        "has_sentiment_task": any(t["name"] == "sentiment" for t in tasks),
        "example_texts": ["is this any good", "a gorgeous film ."],
    }


def render_card(
    folder: str | Path,
    model_id: str | None = None,
    template: str | Path = CARD_TEMPLATE,
    image_prefix: str = "",
    output: str | Path | None = None,
):
    """Render `template` from `folder`/metrics.json and config.json into `output` (default `folder`/README.md).

    `model_id` is what the usage snippet loads: the Hub repo id, or by default the folder's absolute path.
    `image_prefix` is prepended to the plot file names (for a copy of the card that lives elsewhere).
    """
    from huggingface_hub import ModelCard

    folder = Path(folder)
    for required in ("metrics.json", "config.json"):
        if not (folder / required).is_file():
            raise ValueError(f"{folder} has no {required}; render the card from a finished train.py output folder.")
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_id = model_id or str(folder.resolve())
    context = card_context(metrics, config, model_id, folder, image_prefix)
    data = card_data(metrics, context["model_name"], context["sentence_transformers"])
    card = ModelCard.from_template(data, template_path=str(template), **context)
    output = Path(output) if output is not None else folder / "README.md"
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(str(card), encoding="utf-8")
    os.replace(tmp, output)
    return card


# ---------------------------------------------------------------------------------------------------------
# sentence-transformers export
# ---------------------------------------------------------------------------------------------------------


def export_sentence_transformers(model, tokenizer, folder: str | Path) -> list[str]:
    """Write the files that make `SentenceTransformer(folder)` return `model`'s pooled embeddings.

    The formats are sentence-transformers' own (modules.json, sentence_bert_config.json, 1_Pooling/config.json,
    legacy keys that v2 to v6 all read); nothing here imports sentence_transformers. Returns the top-level
    names written, so a caller can move or upload exactly these.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pooling = model.config.pooling
    encoder_dir = folder / ST_TRANSFORMER_DIR
    model.encoder.save_pretrained(encoder_dir, safe_serialization=True)
    tokenizer.save_pretrained(encoder_dir)
    st_config = {"max_seq_length": model.max_input_length(tokenizer), "do_lower_case": False}
    if "add_pooling_layer" in inspect.signature(type(model.encoder).__init__).parameters:
        # The multi-task model builds its encoder without BERT's pooler; so must sentence-transformers, or it
        # reports (unused) pooler weights as missing and initialises them randomly.
        st_config["model_args"] = {"add_pooling_layer": False}
    _write_json(encoder_dir / "sentence_bert_config.json", st_config)
    _write_json(
        folder / ST_POOLING_DIR / "config.json",
        {
            "word_embedding_dimension": model.encoder.config.hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    modules = [
        {"idx": 0, "name": "0", "path": ST_TRANSFORMER_DIR, "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": ST_POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    _write_json(folder / "modules.json", modules)
    # No normalisation module: the embeddings are exactly the heads' input; cosine similarity normalises anyway.
    _write_json(
        folder / "config_sentence_transformers.json",
        {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )
    return [ST_TRANSFORMER_DIR, ST_POOLING_DIR, *ST_ROOT_FILES]


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Hub upload
# ---------------------------------------------------------------------------------------------------------


def uploadable_names(folder: str | Path) -> list[str]:
    """The top-level files and folders of a run folder that belong on the Hub (not checkpoints or logs)."""
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if not p.name.startswith(NOT_UPLOADED_PREFIXES)
        and p.name not in NOT_UPLOADED_NAMES
        and not p.name.endswith((".partial", ".tmp"))
    )


def push_folder(
    folder: str | Path,
    repo_id: str,
    names: list[str] | None = None,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload multi-task model (card, plots, code, weights, tokenizer)",
) -> str:
    """Create `repo_id` if needed and upload `names` (default: `uploadable_names(folder)`) from `folder`.

    The card is re-rendered first with the repo id the Hub returns (`me/x` for a bare `x`), so its usage snippet
    loads the right repo. Returns that repo id.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    names = list(names) if names is not None else uploadable_names(folder)
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise ValueError(f"push_to_hub: {missing} are not in {folder}; nothing was uploaded.")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if (folder / "metrics.json").is_file() and (folder / "README.md").is_file():
        render_card(folder, model_id=repo_id)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    allow = [f"{n}/**" if (folder / n).is_dir() else n for n in names]
    logger.info("Uploading %s to https://huggingface.co/%s", ", ".join(names), repo_id)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=allow,
        commit_message=commit_message,
        revision=revision,
        repo_type="model",
    )
    return repo_id


def check_push_credentials(token: str | None) -> None:
    """Fail before training, not after it, when an upload at the end could not authenticate."""
    from huggingface_hub import get_token

    if token is None and get_token() is None:
        raise ValueError(
            "Uploading to the Hub (--push_to_hub) needs a Hugging Face token with write access: run "
            "`hf auth login`, set HF_TOKEN, or pass --hub_token. A finished run can be uploaded later with "
            "`python hub.py push OUTPUT_DIR --hub_model_id NAME`."
        )


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    card = commands.add_parser("card", help="Re-render OUTPUT_DIR/README.md from its metrics.json.")
    card.add_argument("output_dir")
    card.add_argument("--model_id", help="Repo id the usage snippet loads (default: the folder's path).")
    export = commands.add_parser("export-st", help="Write a standalone sentence-transformers folder.")
    export.add_argument("output_dir")
    export.add_argument("destination")
    push = commands.add_parser("push", help="Upload a finished run folder to the Hub.")
    push.add_argument("output_dir")
    push.add_argument("--hub_model_id", required=True)
    push.add_argument("--hub_token")
    push.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s - %(name)s - %(message)s")

    if args.command == "card":
        render_card(args.output_dir, model_id=args.model_id)
        print(Path(args.output_dir) / "README.md")
    elif args.command == "export-st":
        from transformers import AutoTokenizer

        from modeling_multitask import MultiTaskModel

        model = MultiTaskModel.from_pretrained(args.output_dir)
        export_sentence_transformers(model, AutoTokenizer.from_pretrained(args.output_dir), args.destination)
        print(args.destination)
    else:
        check_push_credentials(args.hub_token)
        print(push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.private or None))


if __name__ == "__main__":
    main()
