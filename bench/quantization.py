"""What int8 costs a trained model, and what it buys: the float32 ONNX graph against its dynamically int8-quantized
copies, on every evaluation set of the model's tasks (SST-2 validation; DailyDialog and Switchboard validation, as
written and without `?`) and on the inference texts of bench/inference.py (SST-2 validation + TREC test).

Graphs (`--graphs`):
  float32    onnx_export.py's graph (`--backend onnx`).
  int8       onnx_export.quantize as shipped (`--backend onnx-int8`): every MatMul and attention projection
             int8 (weights per channel, activations per batch).
  int8_keep_ffn_output  the same with the feed-forward down-projections (the MatMuls that read a GELU) left
             float32 (`onnx_export.py --int8 --int8_keep_ffn_output`).

Per graph: each set's headline metric (accuracy for sentiment, question-class F1 for question), the cosine of each
text's embedding to the float32 graph's (mean and worst), the share of texts whose labels all stay the same, and
the seconds per pass over the inference texts (batch `--batch_size`, the graphs taking turns, median of
`--repeats`).

    python bench/quantization.py runs/quick --data_dir ../shared/data --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
from common import markdown_table, now, report, setting
from inference import load_texts

GRAPHS = ("float32", "int8", "int8_keep_ffn_output")


def build_graphs(model_dir: Path, work: Path, names: list[str]) -> dict:
    """name -> OnnxMultiTaskModel, every graph exported from a copy of `model_dir` (the folder is left as it is)."""
    import onnx_export

    folder = work / "model"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns(onnx_export.ONNX_DIR, "checkpoint-*"))
    full = onnx_export.export(folder)
    paths = {"float32": full}
    if "int8" in names:
        paths["int8"] = onnx_export.quantize(full, full.with_name("int8.onnx"))
    if "int8_keep_ffn_output" in names:
        kept = full.with_name("int8_keep_ffn_output.onnx")
        paths["int8_keep_ffn_output"] = onnx_export.quantize(full, kept, keep_ffn_output=True)
    return {name: onnx_export.OnnxMultiTaskModel(paths[name]) for name in ["float32", *names] if name in paths}


def eval_sets(task_names: list[str], data_dir: str) -> list[tuple[str, str, list[str], list[int]]]:
    """(set name, task, texts, gold labels) for every evaluation source of the model's built-in tasks."""
    import data as mtdata

    sets = []
    for name in task_names:
        task = mtdata.TASKS.get(name)
        for eval_source in task.eval if task else ():
            texts, labels = mtdata.read_source(eval_source.source, task, data_dir)
            sets.append((eval_source.name, name, texts, labels))
    return sets


def headline(task: str, gold: list[int], predicted: list[int], num_labels: int) -> tuple[str, float]:
    """The task's headline metric (f1_pos for question, accuracy otherwise), from the metric module training uses."""
    import data as mtdata
    from outputs import classification_metric

    metric = mtdata.TASKS[task].headline_metric
    scores = classification_metric().compute(predictions=predicted, references=gold, num_labels=num_labels)
    return metric, float(scores[metric])


def label_ids(spec: dict, results: list[dict]) -> list[int]:
    """Class ids of a task's predicted labels (`spec`: the task's entry in the graph's metadata)."""
    ids = {label: i for i, label in spec["id2label"].items()}
    return [ids[r[spec["name"]]["label"]] for r in results]


def score(graphs: dict, sets: list, tokenizer, batch_size: int) -> dict:
    """graph -> set -> {"metric", "value"}: each evaluation set's headline metric under each graph."""
    scores = {name: {} for name in graphs}
    for set_name, task, texts, gold in sets:
        for name, graph in graphs.items():
            (spec,) = [t for t in graph.tasks if t["name"] == task]
            predicted = label_ids(spec, graph.predict(texts, tokenizer, batch_size))
            metric, value = headline(task, gold, predicted, len(spec["id2label"]))
            scores[name][set_name] = {"metric": metric, "value": value}
    return scores


def time_graphs(graphs: dict, texts: list[str], tokenizer, batch_size: int, repeats: int) -> dict:
    """Seconds per pass over `texts` for each graph, after one untimed batch, the graphs taking turns."""
    for graph in graphs.values():
        graph.predict(texts[:batch_size], tokenizer, batch_size)
    seconds = {name: [] for name in graphs}
    for _ in range(repeats):
        for name, graph in graphs.items():
            started = now()
            graph.predict(texts, tokenizer, batch_size, return_embeddings=True)
            seconds[name].append(now() - started)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="A trained train.py output folder.")
    parser.add_argument("--data_dir", required=True, help="The data mirror (sst2/, trec/, dailydialog/, swda/).")
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS[1:]), choices=GRAPHS[1:], help="Besides float32.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes over the inference texts per graph.")
    parser.add_argument("--max_texts", type=int, default=None, help="Use only the first N inference texts.")
    parser.add_argument("--out", default=None, help="Append the results to this markdown file (bench/RESULTS.md).")
    parser.add_argument("--note", default="", help="Free text written beside the results.")
    args = parser.parse_args(argv)

    from predict import load_tokenizer

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} holds no config.json: pass the output folder of a finished train.py run.")
    tokenizer = load_tokenizer(model_dir)
    texts = load_texts(args.data_dir, args.max_texts)
    with tempfile.TemporaryDirectory() as work:
        graphs = build_graphs(model_dir, Path(work), args.graphs)
        tasks = [t["name"] for t in graphs["float32"].tasks]
        scores = score(graphs, eval_sets(tasks, args.data_dir), tokenizer, args.batch_size)
        outputs = {
            name: g.predict(texts, tokenizer, args.batch_size, return_embeddings=True) for name, g in graphs.items()
        }
        seconds = time_graphs(graphs, texts, tokenizer, args.batch_size, args.repeats)

    def unit(rows):
        e = np.asarray([r["embedding"] for r in rows], dtype=np.float64)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    reference = unit(outputs["float32"])
    results = []
    for name in graphs:
        cosine = (unit(outputs[name]) * reference).sum(-1)
        same = [all(a[t]["label"] == b[t]["label"] for t in tasks) for a, b in zip(outputs[name], outputs["float32"])]
        median = statistics.median(seconds[name])
        results.append(
            {
                "graph": name,
                "scores": scores[name],
                "embedding_cosine_mean": float(cosine.mean()),
                "embedding_cosine_min": float(cosine.min()),
                "same_labels": float(np.mean(same)),
                "seconds_median": median,
                "seconds_all": seconds[name],
                "texts_per_second": len(texts) / median,
                "speed_vs_float32": statistics.median(seconds["float32"]) / median,
            }
        )
    set_names = list(scores["float32"])
    rows = [
        [f"`{r['graph']}`"]
        + [f"{r['scores'][s]['value']:.4f}" for s in set_names]
        + [f"{r[k]:.4f}" for k in ("embedding_cosine_mean", "embedding_cosine_min", "same_labels")]
        + [r["texts_per_second"], f"{r['speed_vs_float32']:.2f}x"]
        for r in results
    ]
    columns = ["graph"] + [f"{s} {scores['float32'][s]['metric']}" for s in set_names]
    columns += ["cosine mean", "cosine min", "same labels", "texts/s", "vs float32"]
    result = {"benchmark": "quantization", "device": "cpu", "setting": setting("cpu"), "results": results}
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "note")}
    notes = [
        f"model {model_dir}; cosine, same labels and speed on {len(texts)} texts (SST-2 validation + TREC test), "
        f"batch size {args.batch_size}, median of {args.repeats} passes, the graphs taking turns",
        args.note,
    ]
    report("int8 against float32 (onnxruntime, CPU)", markdown_table(columns, rows), result, args.out, notes)
    return result


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    from run_folder import run_cli

    sys.exit(run_cli(main))
