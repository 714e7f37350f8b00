"""Inference: sentence embeddings per second against sentence-transformers (torch and ONNX), our model under torch
and under onnxruntime, and both task heads in one pass against one single-task classifier, on the same texts
(SST-2 validation + TREC test), encoder and batch size.

Runs (`--runs`):
  st_encode     SentenceTransformer(encoder).encode(texts, batch_size): its own length sorting, mean pooling,
                normalisation, numpy output.
  st_onnx       the same encode() with the encoder run by onnxruntime, as SentenceTransformer(..., backend="onnx")
                runs it: the encoder alone exported to ONNX (last_hidden_state), onnxruntime's default session,
                pooling and normalisation in sentence-transformers. A stand-in: that backend needs optimum-onnx,
                whose only release requires transformers < 4.58 (this repository is on transformers 5).
  st_onnx_backend  SentenceTransformer(encoder, backend="onnx") itself, in the second environment given by
                `--st_onnx_python` (`make st-onnx-venv` builds it: optimum-onnx with transformers 4.57), served by
                bench/st_onnx_worker.py; it takes its turn in the rounds like the others (its timing includes one
                request line to the worker). Its memory column is the worker's own peak RSS.
  st_onnx_backend_int8  the same on sentence-transformers' own int8 copy of that graph
                (export_dynamic_quantized_onnx_model(model, "avx512_vnni", ...), as its efficiency docs show), in a
                worker of its own: the int8 counterpart of ours_onnx_int8.
  ours_embed    MultiTaskModel.predict(texts, tokenizer, batch_size, return_embeddings=True): embeddings plus both
                tasks' labels, per-text dicts (the product path; it does more than st_encode).
  ours_onnx     the same through onnx_export.OnnxMultiTaskModel.predict: one ONNX graph (encoder, pooling, both
                heads) exported by onnx_export.py, fused by onnxruntime's transformer optimizer.
  ours_onnx_int8  ours_onnx on the dynamically int8-quantized graph (`--backend onnx-int8`); its cost here is the
                agreement of its labels and embeddings with the float32 graph's (untrained heads; a trained model's
                accuracy on every evaluation set: bench/quantization.py).
  single_task   AutoModelForSequenceClassification on the same encoder, the same length-sorted batches and per-text
                {"label", "score"} output: what one classifier per task costs.
  ours_both     MultiTaskModel.predict(texts, tokenizer, batch_size): both tasks' labels from one encoder pass.

Every run first handles one batch untimed, then the runs take turns (`--repeats` rounds) so that a change in
machine load hits all of them alike; the table gives the median pass. Heads are untrained: speed is the same.
onnxruntime uses one intra-op thread per visible core; torch keeps its default (also one per core). The float32
bound printed with the table is the encoder's linear-layer FLOPs per pass (length-sorted batches, padded as ours are)
over torch's float32 matmul speed at the feed-forward shape on this CPU (CPU runs only): no float32 run can go much
faster.

    python bench/inference.py --repeats 3 --out bench/RESULTS.md
    python bench/inference.py --runs st_encode st_onnx ours_embed ours_onnx ours_onnx_int8 --repeats 3
    make st-onnx-venv && python bench/inference.py --runs st_encode st_onnx_backend ours_embed ours_onnx \
        --st_onnx_python .venv-st-onnx/bin/python --repeats 3

`--stream_lines N` measures `predict.py` itself instead: N lines (the texts above, cycled) written to its stdin by
a separate thread, the time to its first output line, its throughput and its peak RSS, for each `--backends`.

    python bench/inference.py --stream_lines 100000 --backends torch onnx
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch
from common import PeakMemory, free_memory, markdown_table, now, report, resolve_device, resolve_encoder, setting

logger = logging.getLogger("bench")
RUNS = ("st_encode", "st_onnx", "ours_embed", "ours_onnx", "ours_onnx_int8", "single_task", "ours_both")
EXTRA_RUNS = ("st_onnx_backend", "st_onnx_backend_int8")  # need --st_onnx_python
ONNX_RUNS = {"ours_onnx", "ours_onnx_int8"}


def load_texts(data_dir: str, limit: int | None) -> list[str]:
    import data as mtdata

    sources = [mtdata.SST2_VALIDATION, mtdata.Source("CogComp/trec", "trec", "test", "text")]
    texts = [t for s in sources for t in mtdata.load_source(s, data_dir)[s.text_column]]
    return texts[:limit] if limit else texts


@torch.inference_mode()
def predict_single(model, tokenizer, texts: list[str], batch_size: int) -> list[dict]:
    """One classifier, batched exactly as MultiTaskModel.predict batches: longest first, padded per batch."""
    max_length = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, verbose=False)["input_ids"]
    lengths = torch.tensor([len(x) for x in ids])
    order = torch.argsort(lengths, descending=True, stable=True)
    probs = torch.empty(len(ids), model.config.num_labels)
    for start in range(0, len(ids), batch_size):
        index = order[start : start + batch_size]
        rows = [torch.tensor(ids[i]) for i in index.tolist()]
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[index, None]).long()
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        probs[index] = logits.float().softmax(-1).cpu()
    scores, labels = probs.max(-1)
    return [{"label": model.config.id2label[k], "score": s} for k, s in zip(labels.tolist(), scores.tolist())]


class OrtEncoder(torch.nn.Module):
    """An ONNX encoder in the place of sentence-transformers' `auto_model`, as optimum's ORTModelForFeatureExtraction
    sits there under backend="onnx": numpy in, onnxruntime's default session, `last_hidden_state` back as torch."""

    def __init__(self, path: str, config):
        import onnxruntime as ort

        super().__init__()
        self.config = config
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, input_ids, attention_mask, token_type_ids=None, **_):
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = (torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids).numpy()
        (hidden,) = self.session.run(["last_hidden_state"], feed)
        return {"last_hidden_state": torch.from_numpy(hidden)}


class StOnnxBackend:
    """bench/st_onnx_worker.py in another interpreter: `SentenceTransformer(encoder, backend="onnx")` encoding the
    texts on request. Calling it encodes every text once and returns the worker's reply."""

    def __init__(
        self, python: str, encoder_path: str, texts: list[str], batch_size: int, work: Path, int8: bool = False
    ):
        import json
        import subprocess

        self.json = json
        self.name = "st_onnx_backend_int8" if int8 else "st_onnx_backend"
        texts_file = work / "texts.json"
        texts_file.write_text(json.dumps(texts), encoding="utf-8")
        worker = Path(__file__).with_name("st_onnx_worker.py")
        command = [python, str(worker), encoder_path, str(texts_file), "--batch_size", str(batch_size)]
        command += ["--int8", str(work / "st_int8")] if int8 else []
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        self.work = work
        self.last: dict = {}

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"bench/st_onnx_worker.py exited (code {self.process.wait()}); its error is above. Build its "
                "environment with `make st-onnx-venv` and pass --st_onnx_python .venv-st-onnx/bin/python."
            )
        return self.json.loads(line)

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(self.json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def __call__(self, texts=None) -> dict:  # the worker holds the texts; `texts` is for the runs' common signature
        self.last = self._ask({"op": "encode"})
        return self.last

    def embeddings(self, n: int) -> np.ndarray:
        path = self.work / f"{self.name}.npy"
        self._ask({"op": "embed", "n": n, "path": str(path)})
        return np.load(path)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def export_encoder(encoder_path: str, path: Path) -> None:
    """The encoder alone to ONNX, inputs and output as optimum's feature-extraction export names them."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(encoder_path, attn_implementation="eager", dtype=torch.float32).eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.tensor([[101, 2023, 2003, 102], [101, 2023, 102, 0]])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        torch.onnx.export(
            LastHiddenState(encoder), (ids, (ids > 0).long(), torch.zeros_like(ids)), str(path), dynamo=False,
            opset_version=17, input_names=names, output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]},
        )  # fmt: skip


def build_runs(
    names: list[str], encoder_path: str, device: str, tokenizer, batch_size: int, attn: str, work: Path,
    texts: list[str] | None = None, st_onnx_python: str | None = None,
):  # fmt: skip
    """name -> a function of the texts; each model loaded once, in eval mode, on the device. Also returns the
    models the checks need (`ours`, `onnx`, `onnx_int8`, `st_onnx_backend`, `st_onnx_backend_int8`).

    Weights are float32 whatever dtype the checkpoint was saved in (transformers v5 otherwise keeps the saved
    dtype, e.g. a float16 copy made to travel light).
    """
    from transformers import AutoModelForSequenceClassification

    import data as mtdata
    from modeling_multitask import MultiTaskModel

    runs, models = {}, {}
    if ({"ours_embed", "ours_both"} | ONNX_RUNS) & set(names):
        tasks = [t.to_config() for t in mtdata.get_tasks(["sentiment", "question"])]
        ours = MultiTaskModel.from_encoder(encoder_path, tasks=tasks, attn_implementation=attn, dtype=torch.float32)
        ours = models["ours"] = ours.to(device).eval()
        runs["ours_embed"] = lambda texts: ours.predict(texts, tokenizer, batch_size, return_embeddings=True)
        runs["ours_both"] = lambda texts: ours.predict(texts, tokenizer, batch_size)
    if ONNX_RUNS & set(names):
        import onnx_export

        folder = work / "ours"
        ours.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        onnx_export.export(folder, int8="ours_onnx_int8" in names)
        onnx = models["onnx"] = onnx_export.OnnxMultiTaskModel(folder / onnx_export.ONNX_DIR / onnx_export.ONNX_FILE)
        runs["ours_onnx"] = lambda texts: onnx.predict(texts, tokenizer, batch_size, return_embeddings=True)
        if "ours_onnx_int8" in names:
            int8 = onnx_export.OnnxMultiTaskModel(folder / onnx_export.ONNX_DIR / onnx_export.INT8_FILE)
            models["onnx_int8"] = int8
            runs["ours_onnx_int8"] = lambda texts: int8.predict(texts, tokenizer, batch_size, return_embeddings=True)
    if {"st_encode", "st_onnx"} & set(names):
        from sentence_transformers import SentenceTransformer

        model_kwargs = {"attn_implementation": attn, "dtype": torch.float32}
        st = SentenceTransformer(encoder_path, device=device, model_kwargs=model_kwargs)
        runs["st_encode"] = lambda texts: st.encode(texts, batch_size=batch_size, show_progress_bar=False)
    if "st_onnx" in names:
        path = work / "st_encoder.onnx"
        export_encoder(encoder_path, path)
        st_onnx = SentenceTransformer(encoder_path, device="cpu", model_kwargs=model_kwargs)
        st_onnx[0].model = OrtEncoder(str(path), st_onnx[0].model.config)
        runs["st_onnx"] = lambda texts: st_onnx.encode(texts, batch_size=batch_size, show_progress_bar=False)
    for name in EXTRA_RUNS:
        if name not in names:
            continue
        if not st_onnx_python:
            raise ValueError(
                f"--runs {name} needs --st_onnx_python: the interpreter of an environment with "
                "sentence-transformers' ONNX backend (make st-onnx-venv; then .venv-st-onnx/bin/python)."
            )
        folder = work / name
        folder.mkdir()
        quantized = name == "st_onnx_backend_int8"
        runs[name] = models[name] = StOnnxBackend(st_onnx_python, encoder_path, texts, batch_size, folder, quantized)
    if "single_task" in names:
        single = AutoModelForSequenceClassification.from_pretrained(
            encoder_path, num_labels=2, attn_implementation=attn, dtype=torch.float32
        )
        single = single.to(device).eval()
        runs["single_task"] = lambda texts: predict_single(single, tokenizer, texts, batch_size)
    return {name: runs[name] for name in names}, models


def _normalised(rows) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(np.asarray(rows)).float(), dim=-1)


def embedding_agreement(runs: dict, texts: list[str], models: dict | None = None) -> dict[str, float]:
    """Largest difference between each run's (normalised) embeddings and sentence-transformers': same encoder,
    same maths."""
    if "st_encode" not in runs:
        return {}
    sample = texts[:256]
    # Normalised both sides: a model folder may or may not hold sentence-transformers' Normalize module.
    theirs = _normalised(runs["st_encode"](sample))
    diffs = {}
    if models and "st_onnx_backend" in models:
        diffs["st_onnx_backend"] = float((_normalised(models["st_onnx_backend"].embeddings(256)) - theirs).abs().max())
    for name in ("st_onnx", "ours_embed", "ours_onnx"):
        if name in runs:
            out = runs[name](sample)
            ours = _normalised([r["embedding"] for r in out] if isinstance(out, list) else out)
            diffs[name] = float((ours - theirs).abs().max())
    return diffs


def onnx_parity(models: dict, tokenizer, texts: list[str], batch_size: int) -> dict | None:
    """Max |torch - onnx| on embeddings and logits over padded batches of real texts (mixed lengths)."""
    import onnx_export

    if "onnx" not in models:
        return None
    worst: dict[str, float] = {}
    ours = models["ours"].cpu()
    for start in range(0, min(len(texts), 4 * batch_size), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt")
        for key, value in onnx_export.parity(ours, models["onnx"], dict(batch)).items():
            worst[key] = max(worst.get(key, 0.0), value)
    return worst


def int8_agreement(runs: dict, texts: list[str], models: dict | None = None) -> dict | None:
    """What int8 costs: the share of texts whose label it keeps, per task, and the cosine of its embeddings to the
    float32 graph's (untrained heads, whose labels flip on small changes: bench/quantization.py measures a trained
    model's accuracy; the embedding cosine is the model-independent figure). With `st_onnx_backend_int8` and
    `st_encode`, the same cosine for sentence-transformers' int8 copy against its float32 encode()."""
    agreement = {}
    if {"ours_onnx", "ours_onnx_int8"} <= set(runs):
        full, int8 = runs["ours_onnx"](texts), runs["ours_onnx_int8"](texts)
        tasks = [k for k in full[0] if k != "embedding"]
        for t in tasks:
            agreement[f"label_agreement.{t}"] = float(
                np.mean([a[t]["label"] == b[t]["label"] for a, b in zip(full, int8)])
            )
        cosine = (_normalised([r["embedding"] for r in full]) * _normalised([r["embedding"] for r in int8])).sum(-1)
        agreement.update({"embedding_cosine_mean": float(cosine.mean()), "embedding_cosine_min": float(cosine.min())})
    if models and "st_onnx_backend_int8" in models and "st_encode" in runs:
        theirs = _normalised(models["st_onnx_backend_int8"].embeddings(len(texts)))
        cosine = (_normalised(runs["st_encode"](texts)) * theirs).sum(-1)
        agreement.update(
            {"st_embedding_cosine_mean": float(cosine.mean()), "st_embedding_cosine_min": float(cosine.min())}
        )
    return agreement or None


def fp32_bound(tokenizer, texts: list[str], batch_size: int, encoder_path: str) -> dict:
    """The encoder's linear-layer FLOPs per pass over `texts` (length-sorted batches, each padded to its longest, as
    ours are), torch's float32 matmul speed on this CPU at the feed-forward shape of an average batch, and the
    texts/s those two allow: attention, LayerNorm, tokenising and the rest only lower it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(encoder_path)
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    lengths = sorted((len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]), reverse=True)
    tokens = sum(lengths[s] * len(lengths[s : s + batch_size]) for s in range(0, len(lengths), batch_size))
    flop = 2 * tokens * layers * (4 * hidden * hidden + 2 * hidden * inner)
    rows = max(1, round(tokens / max(1, -(-len(lengths) // batch_size))))
    x, w = torch.randn(rows, hidden), torch.randn(inner, hidden)
    for _ in range(5):
        torch.nn.functional.linear(x, w)
    repeats, started = 50, now()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    gflops = 2 * rows * hidden * inner * repeats / (now() - started) / 1e9
    return {
        "padded_tokens": tokens,
        "linear_gflop_per_pass": flop / 1e9,
        "matmul_gflops": gflops,
        "texts_per_second_bound": len(texts) * gflops * 1e9 / flop,
    }


def stream_cli(
    model_dir: Path, texts: list[str], lines: int, backend: str, batch_size: int, limit: float | None = None
) -> dict:
    """predict.py on `lines` stdin lines, fed by a thread: time to the first output line, total time, peak RSS.
    With `limit` (seconds), the process is stopped then and the figures cover what it wrote until then."""
    import os
    import subprocess
    import sys
    import threading

    import psutil

    feed = [texts[i % len(texts)].replace("\n", " ") for i in range(lines)]
    command = [sys.executable, str(common.ROOT / "predict.py"), str(model_dir), "--batch_size", str(batch_size)]
    command += ["--backend", backend]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    started = now()
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )

    def write() -> None:
        for start in range(0, len(feed), 1000):
            process.stdin.write("\n".join(feed[start : start + 1000]) + "\n")
        process.stdin.close()

    peak = [0]

    def sample() -> None:
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                peak[0] = max(peak[0], watched.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            threading.Event().wait(0.05)

    def write_until_stopped() -> None:
        try:
            write()
        except (BrokenPipeError, ValueError):  # stopped at the limit
            pass

    threading.Thread(target=write_until_stopped, daemon=True).start()
    stopper = threading.Timer(limit, process.kill) if limit else None
    if stopper is not None:
        stopper.start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first_line = process.stdout.readline()
    first = now() - started
    count = 1 if first_line else 0
    for _ in process.stdout:
        count += 1
    total = now() - started
    code = process.wait()
    sampler.join()
    stopped = stopper is not None and not stopper.is_alive() and count < lines
    if stopper is not None:
        stopper.cancel()
    return {
        "stopped_at_limit_seconds": limit if stopped else None,
        "backend": backend,
        "lines": lines,
        "lines_written": count,
        "exit_code": code,
        "first_line_seconds": first,
        "total_seconds": total,
        "texts_per_second": (count - 1) / max(total - first, 1e-9),
        "peak_rss_mb": peak[0] / 2**20,
    }


def stream_main(args, texts: list[str], encoder_path: str, info: dict) -> dict:
    import tempfile

    from transformers import AutoTokenizer

    import data as mtdata
    from modeling_multitask import MultiTaskModel

    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "model"
        tasks = [t.to_config() for t in mtdata.get_tasks(["sentiment", "question"])]
        MultiTaskModel.from_encoder(encoder_path, tasks=tasks).save_pretrained(folder)
        AutoTokenizer.from_pretrained(encoder_path).save_pretrained(folder)
        if "onnx" in args.backends:
            import onnx_export

            onnx_export.export(folder)  # once, before the clock: predict.py would otherwise export on first use
        results = [
            stream_cli(folder, texts, args.stream_lines, b, args.batch_size, args.stream_seconds) for b in args.backends
        ]
    rows = [
        [f"`--backend {r['backend']}`", r["lines_written"], r["first_line_seconds"], r["total_seconds"],
         r["texts_per_second"], r["peak_rss_mb"],
         f"stopped at {r['stopped_at_limit_seconds']:.0f} s" if r["stopped_at_limit_seconds"] else r["exit_code"]]
        for r in results
    ]  # fmt: skip
    columns = ["predict.py", "lines out", "first line s", "total s", "texts/s after the first line", "peak RSS MiB"]
    columns.append("exit")
    table = markdown_table(columns, rows)
    result = {"benchmark": "predict_stream", "setting": info, "results": results}
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "note")}
    notes = [
        f"{args.stream_lines} stdin lines (SST-2 validation + TREC test, cycled), batch size {args.batch_size}, "
        f"encoder {args.encoder} with untrained heads, saved by save_pretrained; the clock starts at process launch "
        "(imports and model loading included)",
        args.note,
    ]
    report("predict.py streaming stdin (cpu)", table, result, args.out, notes)
    return result


def time_runs(runs: dict, texts: list[str], repeats: int, device: str) -> tuple[dict, dict]:
    """Seconds of each pass and (peak, growth) memory per run, the runs taking turns for `repeats` rounds."""
    seconds = {name: [] for name in runs}
    peaks = {name: (0.0, 0.0) for name in runs}  # (peak, growth during the pass)
    for _ in range(repeats):
        for name, fn in runs.items():
            free_memory(device)
            with PeakMemory(device) as memory:
                started = now()
                fn(texts)
                common.synchronize(device)
                seconds[name].append(now() - started)
            peaks[name] = max(peaks[name], (memory.peak_mb, memory.growth_mb))
            if name in EXTRA_RUNS:  # another process: its own peak RSS, no growth figure
                peaks[name] = (fn.last["peak_rss_mb"], None)
    return seconds, peaks


# (numerator run, denominator run, ratio name) of texts per second.
RATIOS = (
    ("ours_embed", "st_encode", "embeddings_per_second_ours_vs_st"),
    ("ours_onnx", "st_encode", "embeddings_per_second_ours_onnx_vs_st"),
    ("ours_onnx", "st_onnx", "embeddings_per_second_ours_onnx_vs_st_onnx"),
    ("ours_onnx", "st_onnx_backend", "embeddings_per_second_ours_onnx_vs_st_onnx_backend"),
    ("st_onnx_backend", "st_encode", "embeddings_per_second_st_onnx_backend_vs_st"),
    ("ours_onnx", "ours_embed", "embeddings_per_second_ours_onnx_vs_ours_torch"),
    ("ours_onnx_int8", "ours_onnx", "embeddings_per_second_int8_vs_ours_onnx"),
    ("ours_onnx_int8", "st_encode", "embeddings_per_second_ours_onnx_int8_vs_st"),
    ("ours_onnx_int8", "st_onnx_backend_int8", "embeddings_per_second_ours_onnx_int8_vs_st_onnx_backend_int8"),
    ("st_onnx_backend_int8", "st_encode", "embeddings_per_second_st_onnx_backend_int8_vs_st"),
)


def ratios_of(by_name: dict) -> dict[str, float]:
    ratios = {
        key: by_name[ours]["texts_per_second"] / by_name[theirs]["texts_per_second"]
        for ours, theirs, key in RATIOS
        if {ours, theirs} <= set(by_name)
    }
    if {"ours_both", "single_task"} <= set(by_name):
        ratios["time_both_tasks_vs_single_task"] = (
            by_name["ours_both"]["seconds_median"] / by_name["single_task"]["seconds_median"]
        )
    return ratios


def bound_note(bound: dict, by_name: dict) -> str:
    note = (
        f"float32 bound: {bound['linear_gflop_per_pass']:.0f} GFLOP of linear layers per pass "
        f"({bound['padded_tokens']} padded tokens), torch float32 matmul {bound['matmul_gflops']:.0f} GFLOP/s at the "
        f"feed-forward shape: at most {bound['texts_per_second_bound']:.0f} texts/s"
    )
    if "st_encode" in by_name:
        note += f" ({bound['texts_per_second_bound'] / by_name['st_encode']['texts_per_second']:.2f}x st_encode)"
    return note


def notes_of(args, info: dict, texts: list[str], runs: dict, by_name: dict, ratios: dict, checks: dict) -> list:
    """The lines printed above the table: setting, ratios, agreement checks, the float32 bound, workers."""
    agreement, parity, int8, bound = (checks[k] for k in ("agreement", "parity", "int8", "bound"))
    return [
        f"{len(texts)} texts (SST-2 validation + TREC test), batch size {args.batch_size}, median of {args.repeats} "
        f"passes, encoder {args.encoder}, attention {args.attn_implementation}",
        "ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()),
        None
        if not agreement
        else "normalised embeddings vs sentence-transformers': max |diff| "
        + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()),
        None
        if parity is None
        else "ONNX graph vs torch, max |diff| on 4 padded batches: "
        + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()),
        None
        if int8 is None
        else "int8 vs float32 (untrained heads): " + ", ".join(f"{k} {v:.4f}" for k, v in int8.items()),
        None if bound is None else bound_note(bound, by_name),
        "memory: every model stays loaded in one process, so each peak counts them all; growth is the pass's own"
        + ("; the st_onnx_backend runs are other processes (their own peaks)" if set(EXTRA_RUNS) & set(runs) else ""),
        *(f"{name}: " + json.dumps(info[name]) for name in EXTRA_RUNS if name in info),
        args.note,
    ]


def summarise(args, device: str, info: dict, texts: list[str], runs: dict, seconds: dict, peaks: dict, checks: dict):
    """The results, ratios, table and notes of one run of the benchmark; printed, and appended to --out."""
    agreement, parity, int8, bound = (checks[k] for k in ("agreement", "parity", "int8", "bound"))
    results = []
    for name in runs:
        median = statistics.median(seconds[name])
        results.append(
            {
                "run": name,
                "texts": len(texts),
                "seconds_median": median,
                "seconds_min": min(seconds[name]),
                "seconds_all": seconds[name],
                "texts_per_second": len(texts) / median,
                "peak_memory_mb": peaks[name][0],
                "memory_growth_mb": peaks[name][1],
            }
        )
    by_name = {r["run"]: r for r in results}
    ratios = ratios_of(by_name)
    relative = {
        name: "st_encode" for name in ("st_encode", "st_onnx", *EXTRA_RUNS, "ours_embed", "ours_onnx", "ours_onnx_int8")
    }
    relative.update(ours_both="single_task", single_task="single_task")
    rows = []
    for r in results:
        base = by_name.get(relative[r["run"]])
        rows.append(
            [
                f"`{r['run']}`",
                r["texts_per_second"],
                r["seconds_median"],
                f"{r['texts_per_second'] / base['texts_per_second']:.2f}x `{base['run']}`" if base else None,
                r["peak_memory_mb"],
                r["memory_growth_mb"],
            ]
        )
    mem = common.memory_column(device)
    table = markdown_table(["run", "texts/s", "s per pass (median)", "speed vs", mem, "growth in pass MiB"], rows)
    result = {"benchmark": "inference", "device": device, "setting": info, "results": results, "ratios": ratios}
    result["embedding_max_abs_diff_vs_st"] = agreement
    result["onnx_max_abs_diff_vs_torch"] = parity
    result["int8_agreement"] = int8
    result["fp32_bound"] = bound
    for r in results if bound else ():
        r["linear_gflops_per_second"] = bound["linear_gflop_per_pass"] / r["seconds_median"]
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "note")}
    notes = notes_of(args, info, texts, runs, by_name, ratios, checks)
    report(f"Inference ({device})", table, result, args.out, notes)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS + EXTRA_RUNS)
    parser.add_argument(
        "--st_onnx_python",
        default=None,
        help="Python of an environment with sentence-transformers' ONNX backend (make st-onnx-venv), for "
        "--runs st_onnx_backend / st_onnx_backend_int8.",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes over all texts per run.")
    parser.add_argument("--max_texts", type=int, default=None, help="Use only the first N texts.")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--stream_lines", type=int, default=None, help="Measure predict.py on this many stdin lines.")
    parser.add_argument(
        "--stream_seconds", type=float, default=None, help="Stop each predict.py run after this many seconds."
    )
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    args = parser.parse_args(argv)

    common.quiet_libraries()
    common.apply_threads(args.threads)
    device = resolve_device(args.device)
    encoder_path = resolve_encoder(args.encoder)
    info = setting(device)
    texts = load_texts(args.data_dir, args.max_texts)
    if args.stream_lines:
        return stream_main(args, texts, encoder_path, info)
    if ONNX_RUNS & set(args.runs) and device != "cpu":
        raise ValueError("The ONNX runs are CPU runs (onnxruntime's CPU provider); pass --device cpu.")

    import tempfile

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as work:
        runs, models = build_runs(
            args.runs, encoder_path, device, tokenizer, args.batch_size, args.attn_implementation, Path(work),
            texts=texts, st_onnx_python=args.st_onnx_python,
        )  # fmt: skip
        agreement = embedding_agreement(runs, texts, models)
        parity = onnx_parity(models, tokenizer, texts, args.batch_size)
        int8 = int8_agreement(runs, texts, models)
        # A CPU figure: on a GPU the matmul would run elsewhere than the one measured here.
        bound = fp32_bound(tokenizer, texts, args.batch_size, encoder_path) if device == "cpu" else None
        longest = sorted(texts, key=len, reverse=True)[: args.batch_size]
        for fn in runs.values():
            fn(longest)  # untimed: threads, allocator and kernels warm up

        seconds, peaks = time_runs(runs, texts, args.repeats, device)
        for name in EXTRA_RUNS:
            if name in models:
                info[name] = models[name].info
                models[name].close()
    checks = {"agreement": agreement, "parity": parity, "int8": int8, "bound": bound}
    return summarise(args, device, info, texts, runs, seconds, peaks, checks)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    from run_folder import run_cli

    sys.exit(run_cli(main))
