"""Turn a finished run folder into what others use: the model card, a sentence-transformers view, the Hub upload.

    metrics.json + config.json --(model_card.md, Jinja)--> README.md (YAML metadata with model-index + the page)
    model.encoder + tokenizer --> 0_Transformer/ + 1_Pooling/ + modules.json (SentenceTransformer(folder) works)
    files listed in manifest.json --(HfApi.create_repo + create_commit)--> https://huggingface.co/<repo id>

What the card says about each task (description, training sources, label names) and each eval set (dataset,
split) is read from metrics.json, which train.py writes from the task definitions: custom tasks get the same card.
`train.py` calls these at the end of a run. The command line re-does one step on an existing folder:

    python hub.py card runs/quick [--model_id me/multitask-minilm]    # re-render README.md from metrics.json
    python hub.py export-st runs/quick exported/                       # a standalone sentence-transformers folder
    python hub.py push runs/quick --hub_model_id me/multitask-minilm   # create the repo, upload the run's files

A push uploads exactly the files listed in the folder's manifest.json (what the run wrote), never other files
in the folder, and refuses symbolic links and paths that resolve outside it (`uploadable_names`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
CARD_TEMPLATE = ROOT / "model_card.md"
PLOTS = ("loss_curves.png", "accuracy_curves.png", "f1_curves.png")
# The metrics of the model-index, as (metrics.json key, display name, metric args); plus each task's headline
# metric where it is none of these (question: F1 of the question class, the README's figure).
CARD_METRICS = (("accuracy", "Accuracy", None), ("f1", "Macro F1", {"average": "macro"}))
METRIC_NAMES = {"accuracy": "accuracy", "f1": "macro F1", "f1_pos": "F1 of class {label}"}
LICENSE = "apache-2.0"  # the packaged encoder's (all-MiniLM-L6-v2) licence

# sentence-transformers layout: the encoder (a plain transformers model) in a subfolder, then mean pooling.
# The encoder weights are stored twice (here and inside model.safetensors): the multi-task checkpoint must load
# with AutoModel in one file, and sentence-transformers can only load a plain encoder checkpoint.
ST_TRANSFORMER_DIR = "0_Transformer"
ST_POOLING_DIR = "1_Pooling"
ST_ROOT_FILES = ("modules.json", "config_sentence_transformers.json")


# ---------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------


def read_metrics(folder: str | Path, required: bool = True) -> dict:
    """`folder`/metrics.json, the record train.py writes last in a run's folder; {} for a folder without one unless
    `required`. A file that is not a JSON mapping (cut short, edited) is refused naming it."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        if required:
            raise ValueError(f"{folder} has no metrics.json; pass the output folder of a finished train.py run.")
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}): it was cut short or edited after the run. train.py writes it "
            f"whole; take it from a copy of the folder (the folder's manifest.json holds its sha256) or run again."
        ) from err
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} holds a {type(metrics).__name__}, not the mapping train.py writes; run again.")
    return metrics


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
    """Where an eval set's rows come from: the dataset id (a Hub id, or a custom one such as
    `question-pool-heldout` for a set labelled by a rule), a readable name, the split and the text transform.

    train.py writes them into metrics.json's `eval_sets` entry (outputs.eval_set_card_info); a metrics.json
    from before that names only the set.
    """
    return {
        "type": entry.get("dataset", name),
        "name": entry.get("dataset_name", name),
        "split": entry.get("split", "validation"),
        "transform": entry.get("transform"),
    }


def training_datasets(metrics: dict) -> list[str]:
    """Hub ids of the datasets the run trained on (the Hub reads `datasets:` as training data): evaluation-only
    sets such as DailyDialog are not listed, nor a task's own local files given without a dataset id."""
    ids = [s["dataset"] for task in metrics["tasks"] for s in task.get("sources", []) if not s.get("local")]
    return list(dict.fromkeys(ids))


def headline_metric(task: dict) -> str:
    return task.get("headline_metric", "accuracy")


def metric_display(key: str, task: dict) -> str:
    """'accuracy', 'macro F1', 'F1 of class `question`' (class 1 of the task)."""
    labels = task.get("id2label", {})
    label = labels.get("1", labels.get(1, "1"))
    return METRIC_NAMES.get(key, key).format(label=f"`{label}`")


def eval_results(metrics: dict) -> list:
    """One `EvalResult` per eval set and metric (accuracy, macro F1, the task's headline metric), with exactly
    the numbers of metrics.json.

    The dataset fields are the set's real ones: Hub id (or a custom id for rule-labelled sets), split. The
    model-index groups results by task type, dataset, config and split, so a set that is another set's text
    transformed (DailyDialog with its '?' removed) joins that set's entry: its metrics carry the transform in
    their name and in `args.input_transform`.
    """
    from huggingface_hub import EvalResult

    tasks = {t["name"]: t for t in metrics["tasks"]}
    results = []
    for name, values in metrics["final"].items():
        task = tasks.get(metrics["eval_sets"][name]["task"], {"name": metrics["eval_sets"][name]["task"]})
        info = eval_set_info(name, metrics["eval_sets"][name])
        wanted = list(CARD_METRICS)
        headline = headline_metric(task)
        if headline not in {key for key, _, _ in CARD_METRICS}:
            display = metric_display(headline, task).replace("`", "")
            wanted.append((headline, display, {"average": "binary", "pos_label": 1}))
        for key, display, args in wanted:
            if key not in values:
                continue
            if info["transform"]:
                args = {**(args or {}), "input_transform": info["transform"]}
                display = f"{display} ({info['transform'].replace('_', ' ')})"
            results.append(
                EvalResult(
                    task_type="text-classification",
                    task_name=task["name"],
                    dataset_type=info["type"],
                    dataset_name=info["name"],
                    dataset_split=info["split"],
                    metric_type="f1" if key == "f1_pos" else key,
                    metric_name=display,
                    metric_args=args,
                    metric_value=values[key],
                )
            )
    # Untransformed sets first: a model-index entry takes its dataset name from its first result.
    return sorted(results, key=lambda r: bool((r.metric_args or {}).get("input_transform")))


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
        datasets=training_datasets(metrics) or None,  # None: no `datasets:` key (no Hub dataset trained on)
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


def _learning_rates(recipe: dict) -> str:
    # Runs of bench/learning_rates.py record a layer-wise decay and a head rate in the recipe; train.py's do not.
    text = f"{recipe['learning_rate']:g}"
    if recipe.get("layerwise_lr_decay", 1.0) != 1.0:
        text += f", layer-wise decay {recipe['layerwise_lr_decay']:g} per encoder layer down from the top"
    if recipe.get("head_learning_rate") is not None:
        text += f"; heads {recipe['head_learning_rate']:g}"
    return text


def _distillation(distillation: dict) -> str:
    tasks = ", ".join(distillation["tasks"])
    teachers = distillation.get("teachers") or [distillation.get("teacher")]  # a run folder may name one `teacher`
    source = f"`{teachers[0]}`" if len(teachers) == 1 else "the mean logits of " + ", ".join(f"`{t}`" for t in teachers)
    return (
        f"soft targets of {source} on the {tasks} training rows: cross-entropy + "
        f"{distillation['weight']:g} x T^2 x KL at T = {distillation['temperature']:g}"
    )


def _seeds(seed) -> str:
    """A run's seed, or a seed soup's list of them."""
    if isinstance(seed, list):
        return ", ".join(map(str, seed)) + f": {len(seed)} runs, their weights averaged (a seed soup)"
    return str(seed)


def _training_time(train: dict, seed) -> str:
    if isinstance(seed, list):
        return f"{_duration(train.get('wall_seconds'))}, the {len(seed)} runs together"
    return f"{_duration(train.get('wall_seconds'))} (train loss {_fmt(train.get('train_loss'))})"


def _soup_table(metrics: dict) -> dict | None:
    """For a seed soup's folder (bench/seed_soup.py): each run's headline figure per eval set, their mean and the
    soup's, so the card shows what averaging did."""
    soup = metrics.get("soup")
    if not soup:
        return None
    names = list(soup["runs"][0]["headline"])
    tasks = {t["name"]: t for t in metrics["tasks"]}
    values = [[run["headline"][n] for n in names] for run in soup["runs"]]
    averaged = [metrics["final"][n][headline_metric(tasks.get(metrics["eval_sets"][n]["task"], {}))] for n in names]
    rows = [[f"seed {run['seed']}", *map(_fmt, v)] for run, v in zip(soup["runs"], values)]
    rows.append(["mean of the runs", *(_fmt(sum(col) / len(col)) for col in zip(*values))])
    rows.append([f"**soup of {len(values)}**", *(f"**{_fmt(v)}**" for v in averaged)])
    return {"count": len(values), "header": ["weights", *(f"`{n}`" for n in names)], "rows": rows}


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
    weak = [
        f"`{t['name']}`: teacher `{t.get('teacher')}`; "
        + ", ".join(f"{k} {v}" for k, v in t.get("pool_options", {}).items() if k != "question_teacher")
        for t in metrics["tasks"]
        if "pool_options" in t
    ]
    precision = recipe.get("mixed_precision")
    if precision == "no":
        precision = "no (fp32)"
    elif precision is not None:
        precision = f"{precision} autocast (set by the {recipe.get('mixed_precision_from', 'launch')})"
    distributed = None
    if recipe.get("distributed_type") is not None:
        distributed = f"{recipe['distributed_type']}, {recipe.get('num_processes', 1)} process(es)"
        if recipe.get("fsdp_fallback"):
            distributed += f"; {recipe['fsdp_fallback']}"
    caps = [f"{k} {recipe[k]:,}" for k in ("max_train_samples", "max_eval_samples", "max_gold_eval_samples")
            if recipe.get(k) is not None]  # fmt: skip
    rows = [
        ("Encoder", f"`{recipe['encoder']}`"),
        ("Pooling", f"{config.get('pooling', 'mean')} over tokens, {config.get('encoder', {}).get('hidden_size')}-d"),
        ("Freezing", _freezing(recipe["freeze"], recipe["unfreeze"])),
        ("Parameters", f"{train['trainable_parameters']:,} trainable of {train['total_parameters']:,}"),
        ("Task sampling", f"{sampling}, one task per batch"),
        ("Loss weighting", f"{recipe['loss_weighting']} ({weights})" if weights else recipe["loss_weighting"]),
        *([("Distillation", _distillation(recipe["distillation"]))] if recipe.get("distillation") else []),
        *[("Weak labels", line) for line in weak],
        ("Training rows", ", ".join(f"{k} {v:,}" for k, v in train["rows_per_task"].items())),
        *([("Row caps", ", ".join(caps))] if caps else []),
        ("Length", length),
        ("Batch size", f"{recipe['per_device_train_batch_size']} per device x {recipe['num_processes']} process(es)"),
        ("Learning rate", _learning_rates(recipe)),
        ("Seed", _seeds(recipe["seed"])),
        *([("Mixed precision", precision)] if precision is not None else []),
        *([("Distributed", distributed)] if distributed is not None else []),
        ("Hardware", recipe["hardware"]),
        ("Training time", _training_time(train, recipe["seed"])),
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


def _rows(entry: dict, how: bool = True) -> str:
    """'8,069', or for a capped set '500 of 8,069 (capped: max_gold_eval_samples, seeded stratified)'."""
    capped = entry.get("capped")
    if not capped:
        return f"{entry['rows']:,}"
    return f"{entry['rows']:,} of {capped['of']:,}" + (f" (capped: {capped['how']})" if how else "")


def _labels(name: str, entry: dict, metrics: dict) -> str:
    if entry.get("labels") != "teacher":
        return "gold"
    task = next((t for t in metrics["tasks"] if t["name"] == entry["task"]), {})
    return f"teacher `{task['teacher']}`" if task.get("teacher") else "rule"


def _headlines(metrics: dict, tasks: list[dict]) -> list[str]:
    """Per task: its headline metric after training on its gold-labelled sets, and how its teacher rule scores
    on the same sets (whether the model trails or beats it)."""
    lines = []
    eval_sets = metrics["eval_sets"]
    for task in metrics["tasks"]:
        key = headline_metric(task)
        names = [n for n, e in eval_sets.items() if e["task"] == task["name"] and n in metrics["final"]]
        gold = [n for n in names if eval_sets[n].get("labels", "gold") == "gold"] or names
        gold = [n for n in gold if key in metrics["final"][n]]
        if not gold:
            continue
        shown = ", ".join(
            f"**{_fmt(metrics['final'][n][key])}** on `{n}` ({eval_set_info(n, eval_sets[n])['name']}, "
            f"{_rows(eval_sets[n], how=False)} rows)"
            for n in gold
        )
        line = f"`{task['name']}`, {metric_display(key, task)}: {shown}."
        teacher = task.get("teacher")
        rules = metrics.get("heuristics", {})
        compared = [n for n in gold if teacher and key in rules.get(n, {}).get(teacher, {})]
        if compared:
            parts = []
            for n in compared:
                model, rule = metrics["final"][n][key], rules[n][teacher][key]
                verdict = "trails" if model < rule else "beats" if model > rule else "ties"
                parts.append(f"on `{n}` {_fmt(rule)}: the model {verdict} its teacher by {abs(model - rule):.4f}")
            line += f" Its teacher, the `{teacher}` rule: " + "; ".join(parts) + "."
        lines.append(line)
    return lines


def card_context(metrics: dict, config: dict, model_id: str, folder: Path, image_prefix: str = "") -> dict:
    """Everything the template shows, formatted; the template only lays it out."""
    eval_sets = metrics["eval_sets"]
    tasks = []
    for task in metrics["tasks"]:
        labels = [task["id2label"][k] for k in sorted(task["id2label"], key=int)]
        sources = task.get("sources", [])
        names = [n for n, e in eval_sets.items() if e["task"] == task["name"]]
        trained_on = " + ".join(s["display"] for s in sources) if sources else "–"
        if task.get("teacher"):
            trained_on += f", labelled by the `{task['teacher']}` teacher rule"
        tasks.append(
            {
                "name": task["name"],
                "labels": labels,
                "description": task.get("description", ""),
                "trained_on": trained_on,
                "teacher": task.get("teacher"),
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
                "rows": _rows(entry),
                "labels": _labels(name, entry, metrics),
                "dataset": eval_set_info(name, entry)["name"],
                "acc_before": _fmt(before.get("accuracy")),
                "acc_after": _fmt(after.get("accuracy")),
                "f1_before": _fmt(before.get("f1")),
                "f1_after": _fmt(after.get("f1")),
            }
        )
    heuristics = []
    by_name = {t["name"]: t for t in metrics["tasks"]}
    heuristic_task = by_name.get(next((eval_sets[n]["task"] for n in metrics.get("heuristics", {})), ""), {})
    heuristic_key = headline_metric(heuristic_task)
    for name, rules in metrics.get("heuristics", {}).items():
        after = metrics["final"].get(name, {})
        heuristics.append(
            {
                "name": name,
                "labels": _labels(name, eval_sets[name], metrics),
                "model": (_fmt(after.get("accuracy")), _fmt(after.get(heuristic_key))),
                "rules": [(rule, _fmt(v.get("accuracy")), _fmt(v.get(heuristic_key))) for rule, v in rules.items()],
            }
        )
    teachers = sorted({t["teacher"] for t in metrics["tasks"] if t.get("teacher")})
    return {
        "model_id": model_id,
        "model_name": model_id.rstrip("/").split("/")[-1],
        "encoder": metrics["recipe"]["encoder"],
        "base_model": hub_id_or_none(metrics["recipe"]["encoder"]),
        "pooling": config.get("pooling", "mean"),
        "hidden_size": config.get("encoder", {}).get("hidden_size"),
        "tasks": tasks,
        "task_names": [t["name"] for t in tasks],
        "headlines": _headlines(metrics, metrics["tasks"]),
        "results": results,
        "heuristics": heuristics,
        "heuristic_metric": metric_display(heuristic_key, heuristic_task) if heuristics else "",
        "teacher": teachers[0] if len(teachers) == 1 else (", ".join(teachers) or "heuristic"),
        "recipe": _recipe_rows(metrics, config),
        "plots": [image_prefix + p for p in PLOTS if (folder / p).is_file()],
        "sentence_transformers": (folder / "modules.json").is_file(),
        "has_question_task": any(t["name"] == "question" for t in tasks),
        "has_sentiment_task": any(t["name"] == "sentiment" for t in tasks),
        "example_texts": ["is this any good", "a gorgeous film ."],
        "soup": _soup_table(metrics),
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
    metrics = read_metrics(folder)
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


def uploadable_names(folder: str | Path, names: list[str] | None = None) -> list[str]:
    """The files of a run folder that go to the Hub: exactly those its manifest.json lists (the files train.py or
    `hub.py export-st` wrote), as relative paths; `names` keeps only those under these top-level entries.

    Anything else in the folder (checkpoints, logs, notes, files added later) is left out. A listed file that is
    a symbolic link, sits under one, is not a regular file or resolves outside the folder is refused, and so is
    the whole push: nothing is uploaded.
    """
    import checkpoints

    folder = Path(folder)
    if (folder / checkpoints.MANIFEST_NAME).is_symlink():
        raise ValueError(f"push: refusing to upload {folder}: its {checkpoints.MANIFEST_NAME} is a symbolic link.")
    manifest = checkpoints.read_manifest(folder)
    if manifest is None:
        raise ValueError(
            f"push: {folder} has no {checkpoints.MANIFEST_NAME} listing the files the run wrote, so nothing is "
            f"uploaded (only listed files are). train.py and `hub.py export-st` write it; upload a folder made "
            f"otherwise with `hf upload`, choosing its files yourself."
        )
    files = sorted(manifest)
    if names is not None:
        unknown = [n for n in names if n != checkpoints.MANIFEST_NAME and not any(_top(f) == n for f in files)]
        if unknown:
            raise ValueError(f"push: {unknown} are not in {folder / checkpoints.MANIFEST_NAME}; nothing was uploaded.")
        files = [f for f in files if _top(f) in names]
    for rel in files:
        _checked_file(folder, rel)
    return files


def _top(rel: str) -> str:
    return rel.split("/", 1)[0]


def _checked_file(folder: Path, rel: str) -> Path:
    """`folder`/`rel` when it is a regular file inside `folder` reached through no symbolic link; else refuse."""
    refuse = f"push: refusing to upload {folder}: "
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise ValueError(f"{refuse}its manifest lists {rel!r}, which is not a plain path inside the folder.")
    path = folder
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise ValueError(
                f"{refuse}{path.relative_to(folder).as_posix()} is a symbolic link (to {os.readlink(path)}); "
                f"a run writes regular files only. Remove the link (copy the real file there if it belongs to the "
                f"model) and push again. Nothing was uploaded."
            )
    if not path.is_file():
        raise ValueError(f"{refuse}{rel}, listed in its manifest, is missing or not a regular file; nothing was uploaded.")
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if root not in real.parents:
        raise ValueError(f"{refuse}{rel} resolves to {real}, outside the folder. Nothing was uploaded.")
    return real


def _left_out(folder: Path, files: list[str]) -> list[str]:
    """What the folder holds besides `files` (and the manifest), folders that hold none of them as `name/`."""
    import checkpoints

    listed = set(files) | {checkpoints.MANIFEST_NAME}
    tops = {_top(f) for f in files}
    out = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name in listed:
            continue
        if entry.is_dir() and not entry.is_symlink() and entry.name not in tops:
            out.append(entry.name + "/")
        elif entry.is_dir() and not entry.is_symlink():
            for root, dirs, names in os.walk(entry):
                dirs[:] = sorted(dirs)
                for name in sorted(names + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
                    rel = Path(root, name).relative_to(folder).as_posix()
                    if rel not in listed:
                        out.append(rel)
        else:
            out.append(entry.name)
    return out


def push_folder(
    folder: str | Path,
    repo_id: str,
    names: list[str] | None = None,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload multi-task model (card, plots, code, weights, tokenizer)",
) -> str:
    """Create `repo_id` if needed and upload the files of `uploadable_names(folder, names)`, one commit.

    Logs every file it will upload (and what it leaves out) before it contacts the Hub. The card is re-rendered
    first with the repo id the Hub returns (`me/x` for a bare `x`), so its usage snippet loads the right repo.
    Returns that repo id.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    import checkpoints

    folder = Path(folder)
    files = uploadable_names(folder, names)
    sizes = {rel: (folder / rel).stat().st_size for rel in files}
    logger.info(
        "Will upload %d files (%.1f MB, listed in %s): %s",
        len(files),
        sum(sizes.values()) / 1e6,
        folder / checkpoints.MANIFEST_NAME,
        ", ".join(f"{rel} ({sizes[rel]:,} B)" for rel in files),
    )
    left_out = _left_out(folder, files)
    if left_out:
        logger.info("Not uploaded (not written by the run, or kept local): %s", ", ".join(left_out))
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if "README.md" in files and (folder / "metrics.json").is_file():
        render_card(folder, model_id=repo_id)
        manifest = json.loads((folder / checkpoints.MANIFEST_NAME).read_text(encoding="utf-8"))
        readme = folder / "README.md"
        manifest["files"]["README.md"] = {"size": readme.stat().st_size, "sha256": checkpoints.file_sha256(readme)}
        _write_json(folder / checkpoints.MANIFEST_NAME, manifest)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    logger.info("Uploading to https://huggingface.co/%s", repo_id)
    operations = [CommitOperationAdd(rel, str(_checked_file(folder, rel))) for rel in files]
    api.create_commit(
        repo_id=repo_id,
        operations=operations,
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
        from predict import load_model, load_tokenizer  # this repository's class, safetensors only, no folder code

        import checkpoints

        model = load_model(args.output_dir, device="cpu")
        names = export_sentence_transformers(model, load_tokenizer(args.output_dir), args.destination)
        checkpoints.write_manifest(args.destination, names)  # what `hub.py push DESTINATION` uploads
        print(args.destination)
    else:
        check_push_credentials(args.hub_token)
        print(push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.private or None))


def cli(argv: list[str] | None = None) -> int:
    """`python hub.py ...`: `main`, with a refusal (a missing or damaged file, a symlink in the folder, no token) or
    an OS error printed as `error: <message>` on stderr, exit 1, no traceback (MULTITASK_DEBUG=1 shows it), as
    train.py prints its own."""
    from run_folder import run_cli

    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
