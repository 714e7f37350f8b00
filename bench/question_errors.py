"""Where does the trained question head disagree with a heuristic on the gold dialogue sets?

    python bench/question_errors.py runs/quick --data_dir ../shared/data
    python bench/question_errors.py runs/quick --data_dir ../shared/data --rule dialog --limit 20
    python bench/question_errors.py RUN [RUN ...] --data_dir ../shared/data --override dialog switchboard --limit 0

For each gold view (DailyDialog `question_gold`, Switchboard `question_swda`, each as written and with every `?`
removed: `*_noqm`) it prints the
F1 of the question class for the model and the rule, then the rows where the two disagree, in two groups:
"model right" (the rule is wrong there) and "rule right" (the model is wrong there), each with its count, how
many of them are gold questions, and a seeded sample of the sentences. `--override A B` also scores each model as
if it followed rule B's convention where rules A and B part: on the rows where they differ, B's answer replaces
the model's (for `dialog switchboard`, the 27 backchannels of docs/question_detection.md), and it counts how many
of those rows the model calls a question; with several runs, a table ends the report with their mean. Gold labels
are only read here, never trained on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import data as mtdata  # noqa: E402
from hub import read_metrics  # noqa: E402
from question import RULES  # noqa: E402
from common import head_predictions, markdown_table, question_class_scores, recorded_max_length  # noqa: E402
from modeling_multitask import MultiTaskModel  # noqa: E402

VIEWS = {
    "question_gold": "DailyDialog, the text as written",
    "question_gold_noqm": "DailyDialog, every '?' removed",
    "question_swda": "Switchboard, the text as written",
    "question_swda_noqm": "Switchboard, every '?' removed",
}


def aligned(what: str, *columns: Sequence[int]) -> list[np.ndarray]:
    """The columns as int arrays; a ValueError naming `what` and the lengths when they are not all one length."""
    arrays = [np.asarray(column, dtype=int) for column in columns]
    if len({len(a) for a in arrays}) > 1:
        raise ValueError(f"{what} differ in length: {', '.join(str(len(a)) for a in arrays)}.")
    return arrays


def disagreements(gold: Sequence[int], model: Sequence[int], rule: Sequence[int]) -> dict[str, list[int]]:
    """Row indices where model and rule disagree, split by who matches gold: {'model_right': [...], 'rule_right':
    [...]}. With binary labels, a disagreement always has exactly one side right."""
    gold, model, rule = aligned("gold, model and rule predictions", gold, model, rule)
    differ = model != rule
    return {
        "model_right": np.flatnonzero(differ & (model == gold)).tolist(),
        "rule_right": np.flatnonzero(differ & (rule == gold)).tolist(),
    }


def question_scores(gold: Sequence[int], pred: Sequence[int]) -> str:
    """'F1 0.862 (P 0.801, R 0.933)' for the question class."""
    f1, precision, recall = question_class_scores(gold, pred)
    return f"F1 {f1:.3f} (P {precision:.3f}, R {recall:.3f})"


def override(model: Sequence[int], first: Sequence[int], second: Sequence[int]) -> tuple[list[int], list[int]]:
    """The model's predictions with rule `second`'s answer on the rows where rules `first` and `second` differ,
    and those rows' indices."""
    model, first, second = aligned("model and rule predictions", model, first, second)
    rows = np.flatnonzero(first != second)
    merged = model.copy()
    merged[rows] = second[rows]
    return merged.tolist(), rows.tolist()


def predict(model: MultiTaskModel, tokenizer, texts: Sequence[str], batch_size: int = 128, max_length: int = 128):
    """The question head's class per text (argmax), in input order."""
    return head_predictions(model, tokenizer, texts, "question", batch_size, max_length)


def trained_length(model_dir: Path, default: int = 128) -> int:
    """The max_seq_length the run was trained and evaluated with (its metrics.json), so the F1 printed here is the
    one of metrics.json; `default` for a folder without one."""
    return recorded_max_length(read_metrics(model_dir, required=False)) or default


def report(name: str, texts, gold, model, rule, rule_name: str, limit: int, seed: int) -> str:
    groups = disagreements(gold, model, rule)
    lines = [
        f"== {name} ({VIEWS.get(name, name)}): {len(texts)} rows, {int(np.sum(gold))} gold questions",
        f"   question class: model {question_scores(gold, model)}, {rule_name} {question_scores(gold, rule)}; "
        f"they disagree on {sum(len(v) for v in groups.values())} rows",
    ]
    rng = np.random.default_rng(seed)
    for group, title in (("model_right", "model right"), ("rule_right", f"{rule_name} right")):
        rows = groups[group]
        questions = sum(int(gold[i]) for i in rows)
        lines.append(f"-- {title}: {len(rows)} rows ({questions} gold questions, {len(rows) - questions} not)")
        shown = sorted(rng.choice(rows, size=min(limit, len(rows)), replace=False).tolist()) if rows else []
        for i in shown:
            label = "question" if gold[i] else "not     "
            lines.append(f"   [gold {label}] {texts[i]}")
    return "\n".join(lines)


def override_line(gold, model, first, second, names: tuple[str, str]) -> tuple[str, dict]:
    """One line on the rows where the two rules differ, and its figures: how many the model calls a question and
    its question-class F1 with the second rule's answer there."""
    merged, rows = override(model, first, second)
    figures = {
        "rows": len(rows),
        "gold_questions": int(sum(gold[i] for i in rows)),
        "model_questions": int(sum(model[i] for i in rows)),
        "f1": question_class_scores(gold, model)[0],
        "f1_override": question_class_scores(gold, merged)[0],
    }
    line = (
        f"   where {names[0]} and {names[1]} differ: {figures['rows']} rows ({figures['gold_questions']} gold "
        f"questions), the model calls {figures['model_questions']} of them questions; with {names[1]}'s answer "
        f"there the model scores F1 {figures['f1_override']:.4f} (its own {figures['f1']:.4f})"
    )
    return line, figures


def override_table(results: dict[str, dict[str, dict]], names: tuple[str, str]) -> str:
    """Per view and model (and their mean when there are several): F1, the rows where the rules differ, the model's
    questions among them, F1 with the second rule's answer there."""
    rows = []
    for view in VIEWS:
        runs = [(model_dir, figures[view]) for model_dir, figures in results.items() if view in figures]
        for model_dir, f in runs:
            rows.append([view, model_dir, f"{f['f1']:.4f}", f"{f['rows']} ({f['gold_questions']})",
                         str(f["model_questions"]), f"{f['f1_override']:.4f}"])
        if len(runs) > 1:
            mean = {key: float(np.mean([f[key] for _, f in runs])) for key in ("f1", "model_questions", "f1_override")}
            rows.append([view, f"**mean of {len(runs)}**", f"**{mean['f1']:.4f}**", "",
                         f"{mean['model_questions']:.1f}", f"**{mean['f1_override']:.4f}**"])
    columns = ["view", "model", "F1", f"rows where `{names[0]}` and `{names[1]}` differ (gold questions)",
               "model calls question", f"F1 with `{names[1]}`'s answer there"]
    return markdown_table(columns, rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="+", help="Output folders of train.py (model + tokenizer), question head.")
    parser.add_argument("--data_dir", required=True, help="The data mirror holding dailydialog/ and swda/.")
    parser.add_argument("--rule", default="heuristic", choices=sorted(RULES), help="The rule to compare against.")
    parser.add_argument(
        "--override", nargs=2, metavar=("RULE", "RULE"), choices=sorted(RULES),
        help="Also score each model with the second rule's answer where the two rules differ: `dialog switchboard`.",
    )
    parser.add_argument("--limit", type=int, default=12, help="Sentences shown per group (0: counts only).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample of sentences shown.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument(
        "--max_length", type=int, default=None,
        help="Truncate texts to this many tokens (default: each run's max_seq_length from its metrics.json, else 128).",
    )
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error(f"--limit {args.limit}: pass 0 or more sentences per group.")
    if args.max_length is not None and args.max_length < 1:
        parser.error(f"--max_length {args.max_length}: pass a positive number of tokens, or leave it out.")

    from predict import load_model, load_tokenizer

    models = {}
    for model_dir in args.model_dir:
        if not (Path(model_dir) / "config.json").is_file():
            raise ValueError(f"{model_dir} holds no config.json: pass the output folder of a finished train.py run.")
        model = load_model(model_dir, device="cpu")  # this repository's class, safetensors only, no folder code
        if "question" not in model.config.task_names:
            raise ValueError(f"{model_dir}: the model has no 'question' head (tasks {model.config.task_names}).")
        models[model_dir] = (model, load_tokenizer(model_dir), args.max_length or trained_length(Path(model_dir)))
    task = mtdata.TASKS["question"]
    sections, results = [], {model_dir: {} for model_dir in models}
    for eval_source in task.eval:
        if eval_source.name not in VIEWS:
            continue
        texts, gold = mtdata.read_source(eval_source.source, task, args.data_dir)
        rule_pred = [int(RULES[args.rule](t)) for t in texts]
        pair = [[int(RULES[name](t)) for t in texts] for name in args.override or ()]
        for model_dir, (model, tokenizer, max_length) in models.items():
            model_pred = predict(model, tokenizer, texts, args.batch_size, max_length)
            section = report(eval_source.name, texts, gold, model_pred, rule_pred, args.rule, args.limit, args.seed)
            if len(models) > 1:
                section = f"{model_dir}\n{section}"
            if args.override:
                line, results[model_dir][eval_source.name] = override_line(gold, model_pred, *pair, args.override)
                section = f"{section}\n{line}"
            sections.append(section)
    if args.override:
        sections.append(override_table(results, tuple(args.override)))
    text = "\n\n".join(sections)
    print(text)
    return text


if __name__ == "__main__":
    from run_folder import run_cli

    sys.exit(run_cli(main))
