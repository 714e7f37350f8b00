"""The question rules alone on the gold dialogue sets: question-class F1 (P / R) of every rule of
`question.RULES`, as written and with every `?` removed, on DailyDialog validation (all dialogs, then the
even- and odd-numbered dialogs apart) and Switchboard validation.

    python bench/question_rules.py --data_dir ../shared/data
    python bench/question_rules.py --data_dir ../shared/data --disagree dialog switchboard

The dialog teacher's DailyDialog rules are read from errors on even-numbered dialogs; the odd-numbered ones are
the check that a rule holds beyond the dialogs it was read from (docs/question_detection.md). `--disagree A B`
adds the utterances on which two rules differ, set by set, with how many of them are gold questions: for `dialog`
and `switchboard`, the rows where the two conventions part. The sets are the
question task's gold evaluation sets, read as train.py reads them. No model is involved and nothing is trained:
gold labels are only read here.
"""

from __future__ import annotations

import argparse
import sys

from common import markdown_table, question_class_scores  # first: puts the repository root on sys.path

import data as mtdata  # noqa: E402
from question import RULES  # noqa: E402

# Each gold set: its view as written and its view with every `?` removed (the question task's eval sets).
VIEWS = {"DailyDialog": ("question_gold", "question_gold_noqm"), "Switchboard": ("question_swda", "question_swda_noqm")}


def gold_sets(data_dir: str) -> dict[str, tuple[list[str], list[str], list[int]]]:
    """set name -> (texts as written, texts without `?`, gold labels): DailyDialog (whole, even and odd dialogs)
    and Switchboard validation."""
    task = mtdata.TASKS["question"]
    sources = {e.name: e.source for e in task.eval}
    sets, datasets = {}, {}
    for set_name, (written, stripped) in VIEWS.items():
        datasets[set_name], texts, gold = mtdata.read_dataset(sources[written], task, data_dir)
        # the ?-free view from the rows just read, by the `*_noqm` source's own transform
        sets[set_name] = (texts, [sources[stripped].transform(t) for t in texts], gold)
    dialogs = datasets["DailyDialog"]
    if "dialog_id" not in dialogs.column_names:
        raise ValueError(
            f"{sources['question_gold'].describe(data_dir)}: no column 'dialog_id' to split the dialogs by; the "
            "mirror's README lists the columns."
        )
    written, stripped, gold = sets["DailyDialog"]
    for half, parity in (("even", 0), ("odd", 1)):
        rows = [i for i, dialog in enumerate(dialogs["dialog_id"][:]) if dialog % 2 == parity]
        sets[f"DailyDialog, {half} dialogs"] = tuple([column[i] for i in rows] for column in (written, stripped, gold))
    order = ("DailyDialog", "DailyDialog, even dialogs", "DailyDialog, odd dialogs", "Switchboard")
    return {name: sets[name] for name in order}


def table(sets: dict[str, tuple[list[str], list[str], list[int]]]) -> str:
    rows = []
    for rule_name, rule in RULES.items():
        for set_name, (written, stripped, gold) in sets.items():
            cells = []
            for texts in (written, stripped):
                f1, precision, recall = question_class_scores(gold, [int(rule(t)) for t in texts])
                cells.append(f"{f1:.4f} ({precision:.3f} / {recall:.3f})")
            rows.append([f"`{rule_name}`", set_name, f"{len(gold)} ({sum(gold)})", *cells])
    columns = ["rule", "set", "rows (questions)", "F1 as written (P / R)", "F1 with `?` removed (P / R)"]
    return markdown_table(columns, rows)


def disagreement_table(sets: dict[str, tuple[list[str], list[str], list[int]]], first: str, second: str) -> str:
    """The utterances on which rules `first` and `second` differ, per set (the whole ones, not the halves) and view:
    each distinct text with its rows, the gold questions among them and each rule's answer."""
    rows = []
    for set_name in VIEWS:  # the whole sets: the halves of DailyDialog hold the same rows again
        written, stripped, gold = sets[set_name]
        for view, texts in (("as written", written), ("`?` removed", stripped)):
            counts: dict[str, list[int]] = {}
            for text, label in zip(texts, gold):
                if RULES[first](text) != RULES[second](text):
                    counts.setdefault(text, []).append(label)
            for text, labels in sorted(counts.items(), key=lambda item: (-len(item[1]), item[0])):
                answers = [("question" if RULES[name](text) else "not") for name in (first, second)]
                rows.append([set_name, view, f"`{text}`", str(len(labels)), str(sum(labels)), *answers])
            if not counts:
                rows.append([set_name, view, "(none)", "0", "0", "", ""])
    columns = ["set", "view", "text", "rows", "gold questions", f"`{first}`", f"`{second}`"]
    return markdown_table(columns, rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="The data mirror holding dailydialog/ and swda/.")
    parser.add_argument(
        "--disagree", nargs=2, metavar=("RULE", "RULE"), choices=sorted(RULES),
        help="Also list the gold utterances on which these two rules differ, e.g. `dialog switchboard`.",
    )
    args = parser.parse_args(argv)
    sets = gold_sets(args.data_dir)
    text = table(sets)
    if args.disagree:
        text += "\n\n" + disagreement_table(sets, *args.disagree)
    print(text)
    return text


if __name__ == "__main__":
    from run_folder import run_cli

    sys.exit(run_cli(main))
