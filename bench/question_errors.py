"""Where does the trained question head disagree with a heuristic on the gold dialogue sets?

    python bench/question_errors.py runs/quick --data_dir ../shared/data
    python bench/question_errors.py runs/quick --data_dir ../shared/data --rule dialog --limit 20

For each gold view (DailyDialog `question_gold`, Switchboard `question_swda`, each as written and with every `?`
removed: `*_noqm`) it prints the
F1 of the question class for the model and the rule, then the rows where the two disagree, in two groups:
"model right" (the rule is wrong there) and "rule right" (the model is wrong there), each with its count, how
many of them are gold questions, and a seeded sample of the sentences. Gold labels are only read here, never
trained on.
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
from question import RULES  # noqa: E402
from common import head_predictions, question_class_scores  # noqa: E402
from modeling_multitask import MultiTaskModel  # noqa: E402

VIEWS = {
    "question_gold": "DailyDialog, the text as written",
    "question_gold_noqm": "DailyDialog, every '?' removed",
    "question_swda": "Switchboard, the text as written",
    "question_swda_noqm": "Switchboard, every '?' removed",
}


def disagreements(gold: Sequence[int], model: Sequence[int], rule: Sequence[int]) -> dict[str, list[int]]:
    """Row indices where model and rule disagree, split by who matches gold: {'model_right': [...], 'rule_right':
    [...]}. With binary labels, a disagreement always has exactly one side right."""
    gold, model, rule = (np.asarray(x, dtype=int) for x in (gold, model, rule))
    if not len(gold) == len(model) == len(rule):
        raise ValueError(f"gold, model and rule predictions differ in length: {len(gold)}, {len(model)}, {len(rule)}.")
    differ = model != rule
    return {
        "model_right": np.flatnonzero(differ & (model == gold)).tolist(),
        "rule_right": np.flatnonzero(differ & (rule == gold)).tolist(),
    }


def question_scores(gold: Sequence[int], pred: Sequence[int]) -> str:
    """'F1 0.862 (P 0.801, R 0.933)' for the question class."""
    f1, precision, recall = question_class_scores(gold, pred)
    return f"F1 {f1:.3f} (P {precision:.3f}, R {recall:.3f})"


def predict(model: MultiTaskModel, tokenizer, texts: Sequence[str], batch_size: int = 128, max_length: int = 128):
    """The question head's class per text (argmax), in input order."""
    return head_predictions(model, tokenizer, texts, "question", batch_size, max_length)


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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="An output folder of train.py (model + tokenizer) with a question head.")
    parser.add_argument("--data_dir", required=True, help="The data mirror holding dailydialog/validation.*")
    parser.add_argument("--rule", default="heuristic", choices=sorted(RULES), help="The rule to compare against.")
    parser.add_argument("--limit", type=int, default=12, help="Sentences shown per group.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample of sentences shown.")
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args(argv)

    from predict import load_model, load_tokenizer

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} holds no config.json: pass the output folder of a finished train.py run.")
    model = load_model(model_dir, device="cpu")  # this repository's class, safetensors only, no folder code
    if "question" not in model.config.task_names:
        raise ValueError(f"{model_dir}: the model has no 'question' head (tasks {model.config.task_names}).")
    tokenizer = load_tokenizer(model_dir)
    task = mtdata.TASKS["question"]
    rule_fn = RULES[args.rule]
    sections = []
    for eval_source in task.eval:
        if eval_source.name not in VIEWS:
            continue
        texts, gold = mtdata.read_source(eval_source.source, task, args.data_dir)
        model_pred = predict(model, tokenizer, texts, args.batch_size)
        rule_pred = [int(rule_fn(t)) for t in texts]
        sections.append(report(eval_source.name, texts, gold, model_pred, rule_pred, args.rule, args.limit, args.seed))
    text = "\n\n".join(sections)
    print(text)
    return text


if __name__ == "__main__":
    main()
