"""Seed soups: the uniform average of the weights of several train.py runs of one recipe that differ only in
`--seed`, scored beside each run on every evaluation set of their tasks (custom tasks from the definitions the runs'
metrics.json records).

Runs of one recipe start from the same pretrained encoder and, after fine-tuning, still lie close enough that the
average of their weights is a working model of its own (a "uniform model soup", Wortsman et al., 2022): one
model, one forward pass, no ensemble to serve. Every set is scored the same way for each run and for the soup
(argmax of the head, the texts truncated to the runs' `max_seq_length`, the local metric module), so the rows
compare like with like and a run's row matches its own metrics.json.

    python bench/seed_soup.py runs/seed42 runs/seed1 runs/seed2 --data_dir ../shared/data
    python bench/seed_soup.py runs/seed42 runs/seed1 runs/seed2 --data_dir ../shared/data --save_dir runs/soup

`--save_dir` writes the soup as a model folder (config.json, model.safetensors, the remote-code files, the
tokenizer, metrics.json, the model card README.md and manifest.json), which predict.py, `from_pretrained`,
`pipeline()` and `hub.py card` / `export-st` / `push` take like a train.py folder. Its metrics.json has a run's
layout with the soup's own figures as `final`, the rules scored on the same sets, and `soup` (each run's folder,
seed and figures) in place of the before-training figures and curves, which belong to each run; the card shows
the runs' table and the recipe with every seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch
from common import head_predictions, headlines, markdown_table, recorded_max_length, report, setting

logger = logging.getLogger("bench.seed_soup")

REMOTE_CODE_FILES = ("modeling_multitask.py", "pipeline_multitask.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="Output folders of finished train.py runs of one recipe (two or more).")
    parser.add_argument("--data_dir", required=True, help="The data mirror the runs were scored on (../shared/data).")
    parser.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="Truncate texts to this many tokens (default: the runs' max_seq_length, from their metrics.json).",
    )
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--save_dir", default=None, help="Write the soup here as a model folder (must not exist).")
    parser.add_argument("--out", help="Append the markdown report to this file (bench/RESULTS.md).")
    parser.add_argument("--note", default="", help="Written beside the results (e.g. 'loaded machine').")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error(f"give two or more run folders to average, got {len(args.runs)}.")
    if len({Path(r).resolve() for r in args.runs}) < len(args.runs):
        parser.error("a run folder is named twice; each run counts once in the average.")
    if args.save_dir and Path(args.save_dir).exists():
        parser.error(f"--save_dir {args.save_dir} exists; name a new folder (nothing there is replaced).")
    return args


def read_run(folder: Path) -> dict:
    """The run's model (this repository's class, safetensors only, no folder code), tokenizer and metrics.json."""
    from hub import read_metrics
    from predict import load_model, load_tokenizer

    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ValueError(
            f"{folder}: not a finished train.py run (config.json and model.safetensors are needed); pass the "
            f"--output_dir of a run that saved its model."
        )
    metrics = read_metrics(folder, required=False)
    if "soup" in metrics:
        made_of = " ".join(run["folder"] for run in metrics["soup"]["runs"])
        raise ValueError(f"{folder} is a seed soup, not a training run; average the runs it was made from: {made_of}")
    model = load_model(folder, device="cpu")
    return {"folder": folder, "model": model, "tokenizer": load_tokenizer(folder), "metrics": metrics}


def check_same_recipe(runs: list[dict]) -> None:
    """The runs must share tasks, labels and every tensor's name and shape; the first difference is named."""
    first = runs[0]
    tasks = [(t["name"], t["num_labels"]) for t in first["model"].config.tasks]
    weights = {k: v.shape for k, v in first["model"].state_dict().items()}
    for run in runs[1:]:
        other = [(t["name"], t["num_labels"]) for t in run["model"].config.tasks]
        if other != tasks:
            raise ValueError(
                f"{run['folder']}: tasks {other} differ from {first['folder']}'s {tasks}; a soup averages runs of "
                f"one recipe (same tasks and labels, other seeds)."
            )
        state = run["model"].state_dict()
        for name, shape in weights.items():
            if name not in state or state[name].shape != shape:
                found = "missing" if name not in state else f"shape {tuple(state[name].shape)}"
                raise ValueError(
                    f"{run['folder']}: weight {name} is {found}, {first['folder']} has shape {tuple(shape)}; the "
                    f"runs must share the encoder and heads (same --encoder and tasks)."
                )
        extra = sorted(set(state) - set(weights))
        if extra:
            raise ValueError(f"{run['folder']}: weight {extra[0]} is not in {first['folder']}; same encoder needed.")


def max_length_of(runs: list[dict], given: int | None) -> int:
    if given is not None:
        return given
    lengths = {recorded_max_length(run["metrics"]) for run in runs}
    if None in lengths:
        missing = next(r["folder"] for r in runs if recorded_max_length(r["metrics"]) is None)
        raise ValueError(
            f"{missing}: metrics.json does not record max_seq_length; pass --max_length (the runs' value)."
        )
    if len(lengths) > 1:
        raise ValueError(f"the runs were trained with different max_seq_length {sorted(lengths)}; pass --max_length.")
    return lengths.pop()


def average_weights(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of float tensors (summed in float32, cast back); other tensors (integer buffers such as
    position ids) must be equal in every run and are kept as they are."""
    averaged = {}
    for name, first in state_dicts[0].items():
        if first.is_floating_point():
            total = sum(sd[name].float() for sd in state_dicts)
            averaged[name] = (total / len(state_dicts)).to(first.dtype)
        elif all(torch.equal(sd[name], first) for sd in state_dicts[1:]):
            averaged[name] = first.clone()
        else:
            raise ValueError(f"the runs differ in the non-float tensor {name}, which cannot be averaged.")
    return averaged


def eval_sets(model_tasks: list[dict], data_dir: str, definitions: list[dict] | None = None) -> dict[str, dict]:
    """name -> {"task", "texts", "labels"} for every eval set of the runs' tasks (`model_tasks`, the config's
    records): built-in tasks from `data.TASKS`, custom ones from the definitions the runs' metrics.json records
    (`recipe.task_definitions`), their class ids those of the runs' `id2label`."""
    from dataclasses import replace

    import data as mtdata

    custom = mtdata.parse_task_definitions(definitions)
    sets = {}
    for record in model_tasks:
        task = mtdata.TASKS.get(record["name"]) or custom.get(record["name"])
        if task is None:
            logger.warning("task %r: not built in, and the runs' metrics.json records no definition of it; its "
                           "evaluation set is not scored here.", record["name"])  # fmt: skip
            continue
        if record["name"] in custom:
            id2label = {int(k): v for k, v in record["id2label"].items()}
            task = replace(task, label_names=tuple(id2label[i] for i in range(len(id2label))))
        for source in task.eval:
            texts, labels = mtdata.read_source(source.source, task, data_dir)
            sets[source.name] = {"task": task.name, "texts": list(texts), "labels": list(labels)}
    return sets


def score(model, tokenizer, sets: dict[str, dict], max_length: int, batch_size: int, metric) -> dict[str, dict]:
    """Each set's metrics (the local metric module: accuracy, F1, the positive class's P/R/F1) from the argmax of
    its task's head. Each distinct text of a task is run once: a gold set and its `?`-free view share most texts."""
    num_labels = {t["name"]: t["num_labels"] for t in model.config.tasks}
    texts_by_task: dict[str, dict[str, None]] = {}
    for rows in sets.values():
        texts_by_task.setdefault(rows["task"], {}).update(dict.fromkeys(rows["texts"]))
    predicted = {}
    for task, texts in texts_by_task.items():
        unique = list(texts)
        labels = head_predictions(model, tokenizer, unique, task, batch_size, max_length)
        predicted[task] = dict(zip(unique, labels.tolist()))
    return {
        name: metric.compute(
            predictions=[predicted[rows["task"]][t] for t in rows["texts"]],
            references=[int(x) for x in rows["labels"]],
            num_labels=num_labels[rows["task"]],
        )
        for name, rows in sets.items()
    }


EVAL_CAPS = ("max_eval_samples", "max_gold_eval_samples")


def soup_metrics(runs: list[dict], sets: dict[str, dict], soup: dict, heads: dict, metric, max_length: int) -> dict:
    """metrics.json of the soup's folder, in a run's layout so the model card and `hub.py` read it alike: the first
    run's task and eval-set records (the recipe is shared), the soup's figures as `final`, the rules scored on the
    same sets, and `soup`: each run's folder, seed and figures. No `before` or `epochs`: those are each run's own."""
    import question

    first = runs[0]["metrics"]
    eval_sets = {}
    for name, rows in sets.items():
        entry = {k: v for k, v in first["eval_sets"].get(name, {"task": rows["task"]}).items() if k != "capped"}
        eval_sets[name] = {**entry, "rows": len(rows["texts"])}  # scored whole here, whatever cap the runs had
    questions = {name: rows for name, rows in sets.items() if rows["task"] == "question"}
    heuristics = question.rule_metrics(
        metric,
        {n: r["texts"] for n, r in questions.items()},
        {n: [int(x) for x in r["labels"]] for n, r in questions.items()},
    )
    seeds = [run["metrics"]["recipe"].get("seed") for run in runs]
    walls = [run["metrics"].get("train", {}).get("wall_seconds") for run in runs]
    train = {k: v for k, v in first["train"].items() if k not in ("train_loss", "wall_seconds")}
    train["wall_seconds"] = sum(walls) if None not in walls else None  # the runs' training, all together
    names = list(sets)
    return {
        "tasks": first["tasks"],
        "eval_sets": eval_sets,
        "before": {},
        "epochs": [],
        "final": soup,
        "heuristics": heuristics,
        "train": train,
        # The soup was scored on whole sets: the runs' evaluation caps do not describe it.
        "recipe": {**first["recipe"], "seed": seeds, "max_seq_length": max_length, **dict.fromkeys(EVAL_CAPS)},
        "soup": {
            "runs": [
                {"folder": str(run["folder"]), "seed": seed, "headline": dict(zip(names, values))}
                for run, seed, values in zip(runs, seeds, heads.values())
            ],
            "headline": "accuracy, or the question class's F1 for question sets",
        },
    }


def save_soup(save_dir: Path, first: dict, weights: dict[str, torch.Tensor], metrics: dict) -> None:
    """The soup as a model folder (weights, config, code, tokenizer, metrics.json, the card), built in a temporary
    folder beside `save_dir` and moved into place whole."""
    from safetensors.torch import save_file

    import checkpoints
    import hub

    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.", dir=save_dir.parent))
    try:
        shutil.copy2(first["folder"] / "config.json", tmp / "config.json")
        for name in REMOTE_CODE_FILES:
            if (first["folder"] / name).is_file():
                shutil.copy2(first["folder"] / name, tmp / name)
        first["tokenizer"].save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        hub.render_card(tmp, model_id=str(save_dir.resolve()))
        checkpoints.write_manifest(tmp)
        tmp.rename(save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    args = parse_args(argv)
    measured_in = setting("cpu")  # before the work: the load average at start
    from outputs import classification_metric

    runs = [read_run(Path(folder)) for folder in args.runs]
    check_same_recipe(runs)
    max_length = max_length_of(runs, args.max_length)
    if args.save_dir and "tasks" not in runs[0]["metrics"]:
        raise ValueError(f"{runs[0]['folder']}: no metrics.json; the soup's folder and card are built from it.")
    definitions = runs[0]["metrics"].get("recipe", {}).get("task_definitions")
    sets = eval_sets(runs[0]["model"].config.tasks, args.data_dir, definitions)
    if not sets:
        raise ValueError("the runs have no task with an evaluation set to score (built in, or defined in metrics.json)")
    metric = classification_metric()

    rows = {}
    for run in runs:
        seed = run["metrics"].get("recipe", {}).get("seed")
        label = f"{run['folder'].name} (seed {seed})" if seed is not None else run["folder"].name
        logger.info("scoring %s", label)
        rows[label] = score(run["model"], run["tokenizer"], sets, max_length, args.batch_size, metric)
    soup_model = runs[0]["model"]
    weights = average_weights([run["model"].state_dict() for run in runs])
    soup_model.load_state_dict(weights)
    logger.info("scoring the soup of %d runs", len(runs))
    soup = score(soup_model, runs[0]["tokenizer"], sets, max_length, args.batch_size, metric)

    names, tasks = list(sets), {name: rows["task"] for name, rows in sets.items()}
    heads = {label: list(headlines(values, tasks).values()) for label, values in rows.items()}
    mean = np.mean(list(heads.values()), axis=0).tolist()
    heads_soup = list(headlines(soup, tasks).values())
    table = markdown_table(
        ["weights", *names],
        [[label, *(f"{v:.4f}" for v in values)] for label, values in heads.items()]
        + [
            ["mean of the runs", *(f"{v:.4f}" for v in mean)],
            [f"soup of {len(runs)}", *(f"{v:.4f}" for v in heads_soup)],
        ],
    )
    result = {
        "runs": [str(run["folder"]) for run in runs],
        "max_length": max_length,
        "headline": {"runs": heads, "mean": dict(zip(names, mean)), "soup": dict(zip(names, heads_soup))},
        "soup": soup,
        "setting": measured_in,
    }
    notes = [
        f"headline per set: accuracy, or the question class's F1 for question sets; texts cut at {max_length} tokens"
    ]
    if args.note:
        notes.append(args.note)
    report(f"Seed soup of {len(runs)} runs", table, result, args.out, notes)
    if args.save_dir:
        save_soup(Path(args.save_dir), runs[0], weights, soup_metrics(runs, sets, soup, heads, metric, max_length))
        logger.info("soup saved to %s", args.save_dir)
    return result


if __name__ == "__main__":
    from run_folder import run_cli

    sys.exit(run_cli(main))
