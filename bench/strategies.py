"""Compare training strategies on the same data, seed and budget: what to freeze, and how to mix the tasks.

Each row is one `train.py` run in its own process (a fresh interpreter, so runs cannot leak state into each
other); the script reads the run's metrics.json and prints a markdown table of SST-2 validation accuracy,
question held-out accuracy, trainable parameters and training samples/s.

    # CPU slice: 2,000 SST-2 rows + 700 question rows (300 held out), one epoch of 85 steps per row
    python bench/strategies.py --data_dir ../shared/data --out bench/RESULTS.md

    # full data on a GPU (configs/default.yaml: all of SST-2, 3 epochs); extra train.py flags go after --
    python bench/strategies.py --full --data_dir ../shared/data --out bench/RESULTS-gpu.md -- --bf16 true

    # a few rows and steps, to check the script end to end
    python bench/strategies.py --data_dir ../shared/data --sentiment_rows 64 --question_pool_per_source 40 \
        --work_dir /tmp/bench-smoke -- --max_steps 3

Budget: every row trains for the same number of optimiser steps on the same rows with the same seed. One epoch
is sum_t ceil(n_t / batch) batches whatever the task sampling (see sampler.py), so the sampling
rows differ only in which task each step trains. Rows that train only the heads use --head_lr (a fresh linear
head needs a larger step than a pretrained encoder); everything else uses --lr.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Strategy:
    name: str
    description: str
    flags: list[str] = field(default_factory=list)
    heads_only: bool = False  # trained at --head_lr
    same_as: str | None = None  # identical to another row's run: reuse its result


STRATEGIES = [
    Strategy("full", "full fine-tuning (proportional sampling, as the configs ship)"),
    Strategy(
        "lower_frozen",
        "embeddings + lower half frozen (`layers:0-6/12` = layers 0-2 of 6)",
        ["--freeze", "embeddings", "layers:0-6/12"],
    ),
    Strategy("encoder_frozen", "encoder frozen, heads train (`--freeze encoder`)", ["--freeze", "encoder"], True),
    Strategy(
        "linear_probe",
        "everything frozen but the heads (`--freeze all --unfreeze heads`)",
        ["--freeze", "all", "--unfreeze", "heads"],
        True,
    ),
    Strategy("round_robin", "task sampling round_robin", ["--task_sampling", "round_robin"]),
    Strategy(
        "proportional", "task sampling proportional (= full)", ["--task_sampling", "proportional"], same_as="full"
    ),
    Strategy(
        "temperature",
        "task sampling temperature, T=2",
        ["--task_sampling", "temperature", "--task_sampling_temperature", "2"],
    ),
]
BY_NAME = {s.name: s for s in STRATEGIES}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"), help="Local data mirror.")
    parser.add_argument("--full", action="store_true", help="Full data (configs/default.yaml) instead of the slice.")
    parser.add_argument("--runs", nargs="+", default=[s.name for s in STRATEGIES], choices=list(BY_NAME))
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench"), help="One output folder per run here.")
    parser.add_argument("--out", help="Also write the markdown table (with hardware and command) to this file.")
    parser.add_argument("--reuse", action="store_true", help="Keep runs whose metrics.json already exists.")
    parser.add_argument("--dry_run", action="store_true", help="Print each run's command and stop.")
    parser.add_argument("--accelerate_config", help="Launch each run with accelerate launch --config_file PATH.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lr", type=float, help="Learning rate (default: 1e-4 slice, 5e-5 full).")
    parser.add_argument("--head_lr", type=float, default=2e-3, help="Learning rate of heads-only rows.")
    slice_ = parser.add_argument_group("the slice (ignored with --full)")
    slice_.add_argument("--sentiment_rows", type=int, default=2000, help="SST-2 training rows (max_train_samples).")
    slice_.add_argument(
        "--question_pool_per_source", type=int, default=500, help="Rows from SST-2 and TREC for the question pool."
    )
    slice_.add_argument("--question_holdout_fraction", type=float, default=0.3, help="Held-out share of that pool.")
    slice_.add_argument("--max_seq_length", type=int, default=64)
    slice_.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--gold_eval", action="store_true", help="Also evaluate on DailyDialog gold acts.")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 5e-5 if args.full else 1e-4
    return args, extra


def train_flags(args: argparse.Namespace, strategy: Strategy, output_dir: Path, extra: list[str]) -> list[str]:
    """The train.py command line of one row: a recipe YAML, the shared budget, then the strategy's flags."""
    config = "configs/default.yaml" if args.full else "configs/quick.yaml"
    flags = [
        config,
        "--data_dir", args.data_dir,
        "--output_dir", str(output_dir),
        "--overwrite_output_dir", "true",
        "--seed", str(args.seed),
        "--learning_rate", str(args.head_lr if strategy.heads_only else args.lr),
        "--gold_eval", str(args.gold_eval).lower(),
        "--eval_before_training", "false",
        "--eval_strategy", "no",  # one evaluation, after training: the same cost in every row
        "--save_strategy", "no",
    ]  # fmt: skip
    if not args.full:
        flags += [
            "--max_train_samples", str(args.sentiment_rows),
            "--question_pool_per_source", str(args.question_pool_per_source),
            "--question_holdout_fraction", str(args.question_holdout_fraction),
            "--max_seq_length", str(args.max_seq_length),
            "--num_train_epochs", str(args.epochs),
        ]  # fmt: skip
    return flags + strategy.flags + extra


def run_one(args, strategy: Strategy, extra: list[str]) -> dict:
    output_dir = Path(args.work_dir) / strategy.name
    metrics_file = output_dir / "metrics.json"
    if args.reuse and metrics_file.is_file():
        print(f"[{strategy.name}] reusing {metrics_file}", flush=True)
        return json.loads(metrics_file.read_text(encoding="utf-8"))
    flags = train_flags(args, strategy, output_dir, extra)
    launcher = [sys.executable]
    if args.accelerate_config:
        launcher += ["-m", "accelerate.commands.launch", "--config_file", args.accelerate_config]
    command = launcher + ["train.py", *flags]
    if args.dry_run:
        print(shlex.join(command))
        return {}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    log = output_dir.parent / f"{strategy.name}.log"
    print(f"[{strategy.name}] {shlex.join(command)}  (log: {log})", flush=True)
    started = time.time()
    with log.open("w", encoding="utf-8") as handle:
        result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not metrics_file.is_file():
        tail = log.read_text(encoding="utf-8")[-3000:]
        raise SystemExit(f"[{strategy.name}] train.py failed (exit {result.returncode}); end of {log}:\n{tail}")
    print(f"[{strategy.name}] done in {time.time() - started:.0f} s", flush=True)
    return json.loads(metrics_file.read_text(encoding="utf-8"))


def row(strategy: Strategy, metrics: dict, lr: float) -> dict:
    final, train = metrics["final"], metrics["train"]
    return {
        "name": strategy.name,
        "description": strategy.description,
        "learning_rate": lr,
        "trainable": train["trainable_parameters"],
        "total": train["total_parameters"],
        "sst2_accuracy": final.get("sentiment", {}).get("accuracy"),
        "question_accuracy": final.get("question", {}).get("accuracy"),
        "question_gold_accuracy": final.get("question_gold", {}).get("accuracy"),
        "samples_per_second": train.get("samples_per_second"),
        "steps": train["global_steps"],
        "rows_per_task": train["rows_per_task"],
        "eval_rows": {name: info["rows"] for name, info in metrics["eval_sets"].items()},
        "hardware": metrics["recipe"]["hardware"],
        "same_as": strategy.same_as,
    }


def markdown(rows: list[dict], gold: bool) -> str:
    header = ["strategy", "lr", "trainable params", "SST-2 val acc", "question held-out acc"]
    header += ["question gold acc"] if gold else []
    header += ["train samples/s", "steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for r in rows:
        share = 100 * r["trainable"] / r["total"]
        cells = [r["description"], f"{r['learning_rate']:g}", f"{r['trainable']:,} ({share:.1f}%)"]
        cells += [fmt(r["sst2_accuracy"], ".4f"), fmt(r["question_accuracy"], ".4f")]
        cells += [fmt(r["question_gold_accuracy"], ".4f")] if gold else []
        speed = fmt(r["samples_per_second"], ".1f") + (f" (run of `{r['same_as']}`)" if r["same_as"] else "")
        cells += [speed, str(r["steps"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args, rows: list[dict], command: str, seconds: float) -> str:
    first = rows[0]
    eval_rows = ", ".join(f"{k} {v}" for k, v in first["eval_rows"].items())
    mode = "full data (configs/default.yaml)" if args.full else "slice (configs/quick.yaml + overrides)"
    return "\n".join(
        [
            "## Training strategies",
            "",
            f"- Command: `{command}`",
            f"- Hardware: {first['hardware']} ({platform.node()}); all rows {seconds / 60:.1f} min in total",
            f"- Data: {mode}; training rows per task {first['rows_per_task']}; eval rows: {eval_rows}",
            f"- Seed {args.seed}; every row takes the same {first['steps']} optimiser steps on the same rows.",
            "",
            markdown(rows, args.gold_eval),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args, extra = parse_args(argv)
    command = shlex.join(["python", "bench/strategies.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.time()
    results: dict[str, dict] = {}
    rows = []
    for name in args.runs:
        strategy = BY_NAME[name]
        source = strategy.same_as if strategy.same_as in args.runs else name
        if source not in results:
            results[source] = run_one(args, BY_NAME[source], extra)
        if not args.dry_run:
            rows.append(row(strategy, results[source], args.head_lr if strategy.heads_only else args.lr))
    if args.dry_run:
        return []
    steps = {r["steps"] for r in rows}
    if len(steps) > 1:
        print(f"warning: the rows took different numbers of steps {sorted(steps)}; the budgets differ", flush=True)
    text = report(args, rows, command, time.time() - started)
    print(text)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.work_dir) / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
