"""LoRA against full fine-tuning on the same SST-2 slice, epochs and seed: trainable parameters, peak memory,
wall time and SST-2 validation accuracy.

Each row is one `train.py` run in its own process (configs/quick.yaml, the sentiment task alone), so the peak
RSS of one run cannot include another's; the peak is sampled every 25 ms from outside the process.

    # both rows: 4,000 SST-2 rows (default), 1 epoch, the 872 validation rows, packaged MiniLM
    python bench/lora_vs_full.py --data_dir ../shared/data --out bench/RESULTS.md

    # one row per invocation (two can run side by side, under the same load; bench/RESULTS.md has such a pair)
    python bench/lora_vs_full.py --data_dir ../shared/data --rows 2000 --runs lora

    # a few rows and steps, to check the script end to end; extra train.py flags go after --
    python bench/lora_vs_full.py --rows 64 --work_dir /tmp/bench-lora -- --max_steps 2 --max_eval_samples 32

LoRA usually wants a larger learning rate than full fine-tuning (each update B A starts at zero): each row has its
own `--learning_rate`, printed in the table; `lora_same_lr` repeats LoRA at the full fine-tuning rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"), help="Local data mirror.")
    parser.add_argument("--encoder", default="sentence-transformers/all-MiniLM-L6-v2", help="As train.py --encoder.")
    parser.add_argument("--rows", type=int, default=4000, help="SST-2 training rows (max_train_samples).")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--full_lr", type=float, default=1e-4, help="Learning rate of full fine-tuning (quick.yaml's).")
    parser.add_argument("--lora_lr", type=float, default=5e-4, help="Learning rate of the LoRA row.")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument(
        "--runs", nargs="+", default=["full", "lora"], choices=["full", "lora", "lora_same_lr"], help="Rows to run."
    )
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "bench_lora"), help="One output folder per run.")
    parser.add_argument("--out", help="Append the markdown report (with hardware and command) to this file.")
    parser.add_argument("--note", default="", help="Written beside the results (e.g. 'loaded machine').")
    return parser.parse_args(argv), extra


def run_flags(args: argparse.Namespace, name: str, output_dir: Path, extra: list[str]) -> list[str]:
    flags = [
        "configs/quick.yaml",
        "--encoder", args.encoder,
        "--data_dir", args.data_dir,
        "--output_dir", str(output_dir),
        "--overwrite_output_dir", "true",
        "--tasks", "sentiment",
        "--max_train_samples", str(args.rows),
        "--num_train_epochs", str(args.epochs),
        "--seed", str(args.seed),
        "--eval_before_training", "false",
        "--eval_strategy", "no",  # one evaluation, after training: the same cost in every row
        "--save_strategy", "no",
        "--export_sentence_transformers", "none",
        "--gold_eval", "false",
        "--learning_rate", str(args.lora_lr if name == "lora" else args.full_lr),
    ]  # fmt: skip
    if name != "full":
        flags += ["--lora_r", str(args.lora_r)]
    return flags + extra


def run_one(args, name: str, extra: list[str]) -> dict:
    """One train.py process; returns its metrics.json figures plus wall time and peak RSS."""
    import psutil

    output_dir = Path(args.work_dir) / name
    command = [sys.executable, "train.py", *run_flags(args, name, output_dir, extra)]
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    log = output_dir.parent / f"{name}.log"
    print(f"[{name}] {shlex.join(command)}  (log: {log})", flush=True)
    started = time.perf_counter()
    peak = 0
    with log.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.025)
    wall = time.perf_counter() - started
    metrics_file = output_dir / "metrics.json"
    if process.returncode != 0 or not metrics_file.is_file():
        tail = log.read_text(encoding="utf-8")[-3000:]
        raise SystemExit(f"[{name}] train.py failed (exit {process.returncode}); end of {log}:\n{tail}")
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    train = metrics["train"]
    print(f"[{name}] done in {wall:.0f} s", flush=True)
    return {
        "run": name,
        "lora": metrics["recipe"].get("lora"),
        "learning_rate": metrics["recipe"]["learning_rate"],
        "trainable_parameters": train["trainable_parameters"],
        "total_parameters": train["total_parameters"],
        "sst2_accuracy": metrics["final"]["sentiment"]["accuracy"],
        "steps": train["global_steps"],
        "train_seconds": train["wall_seconds"],
        "samples_per_second": train["samples_per_second"],
        "process_seconds": round(wall, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "saved_weights_mb": round((output_dir / "model.safetensors").stat().st_size / 2**20, 1),
        "rows": train["rows_per_task"]["sentiment"],
        "eval_rows": metrics["eval_sets"]["sentiment"]["rows"],
        "hardware": metrics["recipe"]["hardware"],
    }


def markdown(rows: list[dict]) -> str:
    header = ["run", "lr", "trainable params", "SST-2 val acc", "peak RSS (MB)", "train time (s)", "samples/s",
              "process wall (s)", "saved model.safetensors (MB)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lora = r["lora"]
        name = "full fine-tuning" if lora is None else f"LoRA r={lora['r']}, alpha {lora['alpha']:g} on " + "/".join(
            lora["target_modules"]
        )
        share = 100 * r["trainable_parameters"] / r["total_parameters"]
        cells = [
            name,
            f"{r['learning_rate']:g}",
            f"{r['trainable_parameters']:,} ({share:.2f}%)",
            f"{r['sst2_accuracy']:.4f}",
            f"{r['peak_rss_mb']:,.0f}",
            f"{r['train_seconds']:.0f}",
            f"{r['samples_per_second']:.1f}",
            f"{r['process_seconds']:.0f}",
            f"{r['saved_weights_mb']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args, rows: list[dict], command: str) -> str:
    first = rows[0]
    load = f"load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    note = f" {args.note}." if args.note else ""
    return "\n".join(
        [
            "## LoRA against full fine-tuning, CPU",
            "",
            f"- Command: `{command}`",
            f"- Hardware: {first['hardware']} ({platform.node()}); {load}.{note}",
            f"- Data: SST-2 only (`--tasks sentiment`), {first['rows']:,} training rows, {args.epochs:g} epoch(s) "
            f"({first['steps']} steps of configs/quick.yaml's batch 32), validation {first['eval_rows']} rows; "
            f"seed {args.seed}; encoder `{args.encoder}`.",
            "",
            markdown(rows),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args, extra = parse_args(argv)
    command = shlex.join(["python", "bench/lora_vs_full.py", *(sys.argv[1:] if argv is None else argv)])
    rows = [run_one(args, name, extra) for name in args.runs]
    text = report(args, rows, command)
    print(text)
    print("BENCH_JSON " + json.dumps(rows), flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    return rows


if __name__ == "__main__":
    main()
