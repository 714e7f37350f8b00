"""Evaluation time of gold sets: every row in dataset order, every row longest first, each distinct input of a set
once longest first, and each distinct input once over all the sets of the round (`MultiTaskTrainer` does the
last: `sort_eval_by_length`, `deduplicate_eval`, `share_eval_logits`).

Builds the quick config's question data with `max_seq_length` 64 (configs/quick.yaml), a fresh multi-task model
on the packaged MiniLM, and times one `trainer.evaluate` round over the gold sets of `--gold_set` (default the
DailyDialog one, 8,069 rows; name a set and its `_noqm` view to see what the round's sharing saves) the chosen
ways (`--ways`), taking turns, in one process, so machine load hits them alike. Prints the seconds, the rows and
padded tokens the model saw and the largest metric difference to the first way.

    python bench/eval_order.py [--gold_set question_swda question_swda_noqm] [--ways sorted_distinct shared]
                               [--repeats 2] [--batch_size 128] [--max_rows N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

import common
from common import markdown_table, report, resolve_encoder, setting


# way -> (sort_eval_by_length, deduplicate_eval, share_eval_logits)
WAYS = {
    "unsorted": (False, False, False),
    "sorted": (True, False, False),
    "sorted_distinct": (True, True, False),
    "shared": (True, True, True),
}
LABELS = {
    "unsorted": "every row, dataset order",
    "sorted": "every row, longest first",
    "sorted_distinct": "each distinct input of a set once, longest first",
    "shared": "each distinct input once per round, longest first",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=128, help="per_device_eval_batch_size (quick.yaml: 128).")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="Timed passes per order.")
    parser.add_argument("--max_rows", type=int, default=None, help="Cap the gold set (max_gold_eval_samples).")
    parser.add_argument(
        "--gold_set",
        nargs="+",
        default=["question_gold"],
        choices=["question_gold", "question_gold_noqm", "question_swda", "question_swda_noqm"],
        help="The gold sets of the round, evaluated in this order.",
    )
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS), help="The first is the baseline.")
    return parser.parse_args(argv)


def build_trainer(args: argparse.Namespace, encoder_path: str, names: list[str]):
    """The question task's gold sets `names` (tokenized as train.py does) and a MultiTaskTrainer that evaluates them
    with the packaged encoder and fresh heads; returns (trainer, the sets by name)."""
    from transformers import AutoTokenizer, TrainingArguments

    import data as mtdata
    import question
    import train
    from modeling_multitask import MultiTaskModel
    from outputs import build_compute_metrics

    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    tasks = mtdata.get_tasks(["question"], {}, {"question": question.QuestionPool(question.QuestionArguments())})
    data_args = train.DataArguments(
        data_dir=args.data_dir, tasks=["question"], max_seq_length=args.max_seq_length, max_train_samples=64,
        max_gold_eval_samples=args.max_rows,
    )  # fmt: skip
    mt = mtdata.build_data(tasks, tokenizer, data_args, seed=args.seed)
    gold = {name: mt.eval_sets[name] for name in names}
    model = MultiTaskModel.from_encoder(encoder_path, tasks=[t.to_config() for t in tasks], attn_implementation="sdpa")
    trainer = train.MultiTaskTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="eval_order-"), per_device_eval_batch_size=args.batch_size, report_to="none",
            disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        ),  # fmt: skip
        train_dataset=mt.train,
        eval_dataset=gold,
        processing_class=tokenizer,
        data_collator=mtdata.MultiTaskCollator(tokenizer.pad_token_id),
        compute_metrics=build_compute_metrics(),
        task_sizes=mt.task_sizes,
        eval_tasks=dict.fromkeys(names, "question"),
        mt_args=train.MultiTaskArguments(),
    )
    return trainer, gold


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    common.apply_threads(args.threads)
    encoder_path = resolve_encoder(args.encoder)
    info = setting("cpu")
    names = list(dict.fromkeys(args.gold_set))
    trainer, gold = build_trainer(args, encoder_path, names)
    rows = sum(len(gold[name]) for name in names)
    real = sum(len(ids) for name in names for ids in gold[name]["input_ids"])  # tokens without padding
    ways = {way: WAYS[way] for way in args.ways}
    base = args.ways[0]
    padded, seen, current = {}, {}, [base]
    original_step = trainer.prediction_step

    def counting_step(model, inputs, *rest, **kwargs):
        padded[current[0]] += inputs["input_ids"].numel()
        seen[current[0]] += int(inputs["input_ids"].shape[0])
        return original_step(model, inputs, *rest, **kwargs)

    try:
        warm_up = gold[names[0]].select(range(min(256, len(gold[names[0]]))))
        trainer.evaluate(eval_dataset=warm_up, metric_key_prefix=f"eval_{names[0]}")  # untimed: threads, allocator
        trainer.prediction_step = counting_step
        seconds = {way: [] for way in ways}
        metrics = {}
        for _ in range(args.repeats):
            for way, (sort, distinct, shared) in ways.items():
                trainer.sort_eval_by_length, trainer.deduplicate_eval = sort, distinct
                trainer.share_eval_logits = shared
                current[0], padded[way], seen[way] = way, 0, 0
                started = time.perf_counter()
                metrics[way] = trainer.evaluate()
                seconds[way].append(time.perf_counter() - started)
    finally:  # the Trainer's scratch output_dir (evaluation writes nothing there), on success or failure
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    keys = [k for k in metrics[base] if k.endswith(("_loss", "_accuracy", "_f1", "_f1_pos"))]
    diff = max(abs(metrics[base][k] - metrics[way][k]) for k in keys for way in ways)
    median = {way: statistics.median(seconds[way]) for way in ways}
    table_rows = [
        [LABELS[way], rows, seen[way], median[way], median[base] / median[way], padded[way], real / padded[way]]
        for way in ways
    ]
    columns = ["evaluation", "rows", "rows the model saw", "seconds (median)", "speed-up", "padded tokens"]
    table = markdown_table(columns + ["real / padded (every row)"], table_rows)
    result = {
        "setting": info,
        "gold_sets": names,
        "rows": rows,
        "rows_seen": seen,
        "seconds": seconds,
        "padded_tokens": padded,
        "baseline": base,
        "speedup": {way: median[base] / median[way] for way in ways},
        "max_metric_difference": diff,
        "metrics": {k: metrics[args.ways[-1]][k] for k in keys},
    }
    speedups = ", ".join(f"{LABELS[way]} {result['speedup'][way]:.2f}x" for way in args.ways[1:])
    notes = [
        f"gold sets {', '.join(names)}; speed-up vs {LABELS[base]} (median): {speedups or '-'}; "
        f"largest metric difference {diff:.2e}",
    ]
    report("Gold-set evaluation: order and distinct inputs", table, result, args.out, notes)
    return result


if __name__ == "__main__":
    from run_folder import run_cli

    sys.exit(run_cli(main))
