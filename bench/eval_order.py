"""Evaluation time of one gold set, rows in dataset order vs longest first (`MultiTaskTrainer` sorts by length).

Builds the quick config's question data with `max_seq_length` 64 (configs/quick.yaml), a fresh multi-task model
on the packaged MiniLM, and times `trainer.evaluate` on the DailyDialog gold set (8,069 rows) both ways,
alternating, in one process, so machine load hits both alike. Prints the seconds, the padded tokens and the
largest metric difference between the two orders.

    python bench/eval_order.py [--repeats 2] [--batch_size 128] [--max_rows N] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import common
from common import markdown_table, report, resolve_encoder, setting


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=128, help="per_device_eval_batch_size (quick.yaml: 128).")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="Timed passes per order.")
    parser.add_argument("--max_rows", type=int, default=None, help="Cap the gold set (max_gold_eval_samples).")
    args = parser.parse_args(argv)

    common.quiet_libraries()
    common.apply_threads(args.threads)
    from transformers import AutoTokenizer, TrainingArguments

    import data as mtdata
    import question
    import train
    from modeling_multitask import MultiTaskModel
    from outputs import build_compute_metrics

    encoder_path = resolve_encoder(args.encoder)
    info = setting("cpu")
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    tasks = mtdata.get_tasks(["question"], {}, {"question": question.QuestionPool(question.QuestionArguments())})
    data_args = train.DataArguments(
        data_dir=args.data_dir, tasks=["question"], max_seq_length=args.max_seq_length, max_train_samples=64,
        max_gold_eval_samples=args.max_rows,
    )  # fmt: skip
    mt = mtdata.build_data(tasks, tokenizer, data_args, seed=args.seed)
    gold = {"question_gold": mt.eval_sets["question_gold"]}
    rows = len(gold["question_gold"])
    real = sum(len(ids) for ids in gold["question_gold"]["input_ids"])  # tokens without padding
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
        eval_tasks={"question_gold": "question"},
        mt_args=train.MultiTaskArguments(),
    )
    padded = {}
    original_step = trainer.prediction_step

    def counting_step(model, inputs, *rest, **kwargs):
        key = trainer.sort_eval_by_length
        padded[key] = padded.get(key, 0) + inputs["input_ids"].numel()
        return original_step(model, inputs, *rest, **kwargs)

    warm_up = gold["question_gold"].select(range(min(256, rows)))
    trainer.evaluate(eval_dataset=warm_up, metric_key_prefix="eval_question_gold")  # untimed: threads, allocator
    trainer.prediction_step = counting_step
    seconds = {False: [], True: []}
    metrics = {}
    for _ in range(args.repeats):
        for sort in (False, True):
            trainer.sort_eval_by_length = sort
            padded[sort] = 0
            started = time.perf_counter()
            metrics[sort] = trainer.evaluate()
            seconds[sort].append(time.perf_counter() - started)
    keys = [k for k in metrics[False] if k.endswith(("_loss", "_accuracy", "_f1", "_f1_pos"))]
    diff = max(abs(metrics[False][k] - metrics[True][k]) for k in keys)
    table_rows = [
        [name, rows, statistics.median(seconds[sort]), padded[sort], real / padded[sort]]
        for name, sort in (("dataset order", False), ("longest first", True))
    ]
    table = markdown_table(["order", "rows", "seconds (median)", "padded tokens", "real / padded"], table_rows)
    speedup = statistics.median(seconds[False]) / statistics.median(seconds[True])
    result = {
        "setting": info,
        "rows": rows,
        "seconds": {"unsorted": seconds[False], "sorted": seconds[True]},
        "padded_tokens": {"unsorted": padded[False], "sorted": padded[True]},
        "speedup": speedup,
        "max_metric_difference": diff,
        "metrics_sorted": {k: metrics[True][k] for k in keys},
    }
    notes = [f"speed-up (unsorted / sorted median): {speedup:.2f}x; largest metric difference {diff:.2e}"]
    report("Gold-set evaluation: dataset order vs longest first", table, result, args.out, notes)
    return result


if __name__ == "__main__":
    main()
