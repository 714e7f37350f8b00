"""The question rules alone on the gold dialogue sets: question-class F1 (P / R) of every rule of
`question.RULES`, as written and with every `?` removed, on DailyDialog validation (all dialogs, then the
even- and odd-numbered dialogs apart) and Switchboard validation.

    python bench/question_rules.py --data_dir ../shared/data

The dialog teacher's DailyDialog rules are read from errors on even-numbered dialogs; the odd-numbered ones are
the check that a rule holds beyond the dialogs it was read from (docs/question_detection.md). No model is
involved and nothing is trained: gold labels are only read here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from question import RULES, strip_question_marks  # noqa: E402

COLUMNS = ("text", "is_question")


def scores(rule: Callable[[str], bool], texts: Sequence[str], gold: Sequence[int]) -> tuple[float, float, float]:
    """Question-class F1, precision and recall of `rule` on `texts`."""
    pred = [bool(rule(t)) for t in texts]
    tp = sum(p and g for p, g in zip(pred, gold))
    predicted, positives = sum(pred), sum(gold)
    precision = tp / predicted if predicted else 0.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * tp / (predicted + positives) if predicted + positives else 0.0
    return f1, precision, recall


def gold_sets(data_dir: str) -> dict[str, pd.DataFrame]:
    """DailyDialog (whole, even and odd dialogs) and Switchboard validation, each with `text` and `is_question`."""
    paths = {"DailyDialog": "dailydialog/validation.parquet", "Switchboard": "swda/validation.parquet"}
    frames = {}
    for name, rel in paths.items():
        path = Path(data_dir) / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass --data_dir the data mirror (../shared/data).")
        frame = pd.read_parquet(path)
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; the mirror's README lists the columns.")
        frames[name] = frame
    dialogs = frames["DailyDialog"]
    if "dialog_id" not in dialogs.columns:
        raise ValueError(f"{Path(data_dir) / paths['DailyDialog']}: no column 'dialog_id' to split the dialogs by.")
    return {
        "DailyDialog": dialogs,
        "DailyDialog, even dialogs": dialogs[dialogs["dialog_id"] % 2 == 0],
        "DailyDialog, odd dialogs": dialogs[dialogs["dialog_id"] % 2 == 1],
        "Switchboard": frames["Switchboard"],
    }


def table(sets: dict[str, pd.DataFrame]) -> str:
    lines = [
        "| rule | set | rows (questions) | F1 as written (P / R) | F1 with `?` removed (P / R) |",
        "|---|---|---|---|---|",
    ]
    for rule_name, rule in RULES.items():
        for set_name, frame in sets.items():
            texts, gold = frame["text"].tolist(), [int(y) for y in frame["is_question"]]
            cells = []
            for view in (texts, [strip_question_marks(t) for t in texts]):
                f1, precision, recall = scores(rule, view, gold)
                cells.append(f"{f1:.4f} ({precision:.3f} / {recall:.3f})")
            lines.append(f"| `{rule_name}` | {set_name} | {len(texts)} ({sum(gold)}) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="The data mirror holding dailydialog/ and swda/.")
    args = parser.parse_args(argv)
    text = table(gold_sets(args.data_dir))
    print(text)
    return text


if __name__ == "__main__":
    main()
