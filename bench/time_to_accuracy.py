"""Training time until SST-2 validation accuracy first reaches a target (0.88): stock Trainer vs ours, one run.

Same runs and settings as train_throughput.py (`--runs stock ours`, '+' modifiers), the same SST-2 rows, the
same learning-rate schedule over `--max_steps` (linear decay after a warm-up ratio). Every `--eval_steps` steps
both evaluate on SST-2 validation; the clock counts training only (evaluation time is taken out) and a run stops
at the target (`--until target`), after `--max_minutes` of training, or at `--max_steps`. `--until end` trains on
to `--max_steps` and also reports the final accuracy: the fast path's accuracy at equal steps against the stock
one's (a run's accuracy moves by about 0.5 point between seeds on 872 validation rows).

    python bench/time_to_accuracy.py --runs ours stock --max_minutes 4 --out bench/RESULTS.md
    python bench/time_to_accuracy.py --device cuda --runs stock ours --until end

When the stock run stops (time limit) before the target and ours reached it, "x stock" reads "> r": the stock
run's training time so far over ours, a lower bound of the ratio.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

import common  # noqa: F401  (puts the repository root on sys.path)
import train_throughput as tt
from common import PeakMemory, free_memory, markdown_table, now, report, resolve_encoder, setting
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

logger = logging.getLogger("bench")


class TrainingClock(TrainerCallback):
    """Training seconds (evaluation excluded) at each evaluation; stops at the target or the time limit."""

    def __init__(self, metric: str, target: float, max_seconds: float, stop_at_target: bool):
        self.metric, self.target, self.max_seconds, self.stop_at_target = metric, target, max_seconds, stop_at_target
        self.started = self.last_step_end = None
        self.eval_seconds = 0.0
        self.history: list[dict] = []  # {"step", "train_seconds", "accuracy"}
        self.reached: dict | None = None
        self.timed_out = False

    def training_seconds(self, at: float) -> float:
        return at - self.started - self.eval_seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = now()

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = now()
        if self.training_seconds(self.last_step_end) > self.max_seconds:
            self.timed_out = True
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.metric not in (metrics or {}) or self.last_step_end is None:
            return
        self.eval_seconds += now() - self.last_step_end
        point = {
            "step": state.global_step,
            "train_seconds": self.training_seconds(self.last_step_end),
            "accuracy": metrics[self.metric],
        }
        self.history.append(point)
        logger.warning(
            "step %d: accuracy %.4f after %.0f s of training", point["step"], point["accuracy"], point["train_seconds"]
        )
        if self.reached is None and point["accuracy"] >= self.target:
            self.reached = point
            if self.stop_at_target:
                control.should_training_stop = True


def stock_eval_data(args, tokenizer):
    import datasets

    import data as mtdata

    source = mtdata.SST2_VALIDATION
    ds = mtdata.load_source(source, args.data_dir)
    texts, labels = list(ds[source.text_column]), list(ds[source.label_column])
    texts, labels = mtdata._subsample(texts, labels, args.max_eval_samples, args.seed)  # as build_data does
    ds = datasets.Dataset.from_dict({"sentence": texts, "label": labels})
    return ds.map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_seq_length),
        batched=True,
        remove_columns=["sentence"],
    )


def stock_accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def run_one(args, spec: tt.RunSpec, device: str, tokenizer, encoder_path, prepared: dict) -> dict:
    import outputs

    free_memory(device)
    with tempfile.TemporaryDirectory() as output_dir, PeakMemory(device) as memory:
        training_args = tt.training_arguments(
            args,
            spec,
            device,
            output_dir,
            max_steps=args.max_steps,
            eval_strategy="steps",
            eval_steps=args.eval_steps,
            per_device_eval_batch_size=args.eval_batch_size,
            lr_scheduler_type="linear",
            warmup_steps=args.warmup_ratio,  # a float < 1 is a ratio of max_steps
            dataloader_drop_last=False,  # it applies to evaluation too: it would drop validation rows
        )
        if spec.base == "stock":
            trainer, _ = tt.build_stock(
                args,
                spec,
                device,
                tokenizer,
                encoder_path,
                prepared["stock"],
                output_dir,
                training_args=training_args,
                eval_dataset=prepared["stock_eval"],
                compute_metrics=stock_accuracy,
            )
            metric = "eval_accuracy"
        else:
            mt = prepared[spec.base]
            trainer, _ = tt.build_ours(
                args,
                spec,
                device,
                tokenizer,
                encoder_path,
                mt,
                output_dir,
                training_args=training_args,
                eval_dataset={"sentiment": mt.eval_sets["sentiment"]},
                compute_metrics=outputs.build_compute_metrics(),
            )
            metric = "eval_sentiment_accuracy"
        eval_rows = len(prepared["stock_eval"] if spec.base == "stock" else prepared[spec.base].eval_sets["sentiment"])
        trainer.remove_callback(PrinterCallback)
        clock = TrainingClock(metric, args.target, 60 * args.max_minutes, stop_at_target=args.until == "target")
        trainer.add_callback(clock)
        trainer.train()
        steps_done = trainer.state.global_step
        train_seconds = clock.training_seconds(clock.last_step_end)
    del trainer
    last = clock.history[-1] if clock.history else None
    return {
        "run": spec.name,
        "reached": clock.reached,
        "timed_out": clock.timed_out,
        "steps_done": steps_done,
        "train_seconds": train_seconds,
        "eval_rows": eval_rows,
        "best_accuracy": max((p["accuracy"] for p in clock.history), default=None),
        "final_accuracy": last["accuracy"] if last and last["step"] == steps_done else None,
        "history": clock.history,
        "eval_seconds": clock.eval_seconds,
        "peak_memory_mb": memory.peak_mb,
        "settings": {k: v for k, v in vars(spec).items() if k != "name"},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser)
    parser.add_argument("--runs", nargs="+", default=["stock", "ours"])
    parser.add_argument("--target", type=float, default=0.88, help="SST-2 validation accuracy to reach.")
    parser.add_argument("--until", choices=["target", "end"], default="target")
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--max_minutes", type=float, default=10.0, help="Training time limit per run.")
    parser.add_argument("--max_steps", type=int, default=None, help="Schedule length (default: one epoch).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_batch_size", type=int, default=128)
    parser.add_argument("--max_train_samples", type=int, default=None, help="SST-2 rows (default: all 67,349).")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Validation rows (default: all 872).")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--warmup_ratio", type=float, default=0.06)
    parser.add_argument("--optim", default="adamw_torch_fused")
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--torch_compile", action="store_true")
    parser.add_argument("--compile_mode", default=None)
    parser.add_argument("--pad_to_multiple_of", type=int, default=None)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    return parser.parse_args(argv)


def results_table(results: list[dict], args: argparse.Namespace, device: str) -> str:
    """One row per run: when it reached the target, its speed-up over the stock run, best/final accuracy, memory."""

    def when(r) -> str:
        if r["reached"]:
            return f"{r['reached']['train_seconds']:.0f} s (step {r['reached']['step']})"
        why = f"{args.max_minutes:g} min" if r["timed_out"] else f"{r['steps_done']} steps"
        return f"not reached in {why}"

    reference = next((r for r in results if r["run"].split("+")[0] == "stock" and "error" not in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([f"`{r['run']}`", f"failed: {r['error']}"] + [None] * 5)
            continue
        speedup = None
        if reference and reference["reached"] and r["reached"]:
            speedup = reference["reached"]["train_seconds"] / r["reached"]["train_seconds"]
        elif reference and r["reached"] and r is not reference:
            # The stock run stopped before the target: its training time is a lower bound of its time to it.
            speedup = f"> {reference['train_seconds'] / r['reached']['train_seconds']:.2f}"
        rows.append(
            [
                f"`{r['run']}`",
                when(r),
                speedup,
                r["best_accuracy"],
                r["final_accuracy"],
                r["steps_done"],
                r["peak_memory_mb"],
            ]
        )
    memory = common.memory_column(device)
    columns = ["run", f"time to {args.target}", "x stock", "best acc", "final acc", "steps", memory]
    return markdown_table(columns, rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, specs = tt.setup_runs(args)
    encoder_path = resolve_encoder(args.encoder)
    info = setting(device)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    prepared = {"ours": tt.ours_data(args, tokenizer, ["sentiment"], args.max_eval_samples)}
    bases = {s.base for s in specs}
    if "stock" in bases:
        prepared["stock"] = tt.stock_data(args, tokenizer)
        prepared["stock_eval"] = stock_eval_data(args, tokenizer)
        tt.check_same_rows(prepared["stock"], prepared["ours"].train)
        tt.check_same_rows(prepared["stock_eval"], prepared["ours"].eval_sets["sentiment"], "SST-2 validation")
    if "two_task" in bases:
        prepared["two_task"] = tt.ours_data(args, tokenizer, ["sentiment", "question"], args.max_eval_samples)
    if args.max_steps is None:
        args.max_steps = prepared["ours"].task_sizes[0] // args.batch_size

    results = []
    for spec in specs:
        logger.warning("run %s ...", spec.name)
        results.append(
            common.guarded(spec.name, lambda: run_one(args, spec, device, tokenizer, encoder_path, prepared), device)
        )
        logger.warning("run %s: reached %s", spec.name, results[-1].get("reached", results[-1].get("error")))

    table = results_table(results, args, device)
    result = {"benchmark": "time_to_accuracy", "device": device, "setting": info, "results": results}
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "note")}
    notes = [
        f"target SST-2 validation accuracy {args.target}, evaluated every {args.eval_steps} steps (evaluation time "
        f"not counted), batch size {args.batch_size}, lr {args.learning_rate} linear over {args.max_steps} steps "
        f"(warm-up {args.warmup_ratio}), SST-2 rows: {args.max_train_samples or 'all'}, limit {args.max_minutes:g} "
        f"min of training per run",
        "final acc: at the last step, when it fell on an evaluation",
        args.note,
    ]
    report(f"Time to accuracy ({device})", table, result, args.out, notes)
    return result


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    sys.exit(1 if any("error" in r for r in main()["results"]) else 0)
