"""The whole multi-task model as one ONNX graph, run by onnxruntime.

    python onnx_export.py runs/quick            # writes runs/quick/onnx/model.onnx
    python onnx_export.py runs/quick --int8     # also runs/quick/onnx/model_int8.onnx (dynamic int8 quantization)
    python predict.py runs/quick "is this any good" --backend onnx   # exports on first use, then reuses the file
    python predict.py runs/quick "is this any good" --backend onnx-int8   # the int8 graph (made on first use)

The graph takes `input_ids`, `attention_mask` (and `token_type_ids` where the encoder has them), each
`(batch, seq)` with both axes dynamic, and returns `embeddings` `(batch, hidden)` and one `logits.<task>`
`(batch, num_labels)` per task: encoder, pooling and every head in one pass. It is exported with `torch.onnx`
(the TorchScript exporter at opset 17), then onnxruntime's transformer optimizer fuses attention, LayerNorm and
GELU. Every export is checked against the torch model on a batch of different lengths (max |diff| <= 1e-4 on
embeddings and logits) before it replaces the previous file. The file records the SHA-256 of the weights it came
from; a model folder whose weights changed is exported again on next use.

Python:

    from onnx_export import load_onnx_model
    from predict import load_tokenizer
    model = load_onnx_model("runs/quick")
    model.predict(["is this any good"], load_tokenizer("runs/quick"), return_embeddings=True)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("onnx_export")
OPSET = 17
ONNX_DIR = "onnx"
ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
# The int8 graph's recipe, recorded in its metadata; a file without one is quantized again on next use.
INT8_SCHEMES = {False: "dynamic int8, weights per channel; every MatMul", True: "dynamic int8, weights per channel; "
                "feed-forward outputs float32"}  # fmt: skip
GELU_OPS = ("Gelu", "BiasGelu", "FastGelu", "QuickGelu")
PARITY_TOLERANCE = 1e-4
WEIGHTS = "model.safetensors"


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    with open(folder / WEIGHTS, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _graph_module(model):
    """`model` as a module whose outputs are plain tensors: the embedding, then each task's logits in task order."""
    import torch

    class MultiTaskGraph(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            embeddings = self.model.embed(input_ids, attention_mask, token_type_ids)  # (batch, hidden)
            # Eval mode: dropout is the identity, so the heads read the embedding itself.
            return (embeddings, *(head(embeddings) for head in self.model.heads.values()))

    return MultiTaskGraph(model).eval()


def _sample_batch(model, seed: int = 0) -> dict:
    """A batch with three different lengths (so the graph cannot bake in one), padded as a tokenizer pads."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = [11, 5, 8]
    input_ids = torch.randint(5, model.config.encoder["vocab_size"], (len(lengths), max(lengths)), generator=generator)
    attention_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _uses_token_types(model):
        batch["token_type_ids"] = torch.zeros_like(input_ids)
    return batch


def _uses_token_types(model) -> bool:
    return int(model.config.encoder.get("type_vocab_size") or 0) > 0


def output_names(tasks: list[dict]) -> list[str]:
    return ["embeddings", *(f"logits.{task['name']}" for task in tasks)]


def export_graph(model, path: Path, optimize: bool = True) -> None:
    """Write `model` (a MultiTaskModel) to `path` as one ONNX graph with dynamic batch and sequence axes."""
    import torch

    model = model.float().eval()
    if hasattr(model, "set_attn_implementation"):
        # The eager attention exports as plain MatMul/Softmax, the pattern onnxruntime's optimizer fuses.
        model.set_attn_implementation("eager")
    batch = _sample_batch(model)
    inputs = list(batch)
    outputs = output_names(model.config.tasks)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    axes.update({name: {0: "batch"} for name in outputs})
    with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw.onnx"
        torch.onnx.export(
            _graph_module(model), tuple(batch.values()), str(raw), dynamo=False, opset_version=OPSET,
            input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
        )  # fmt: skip
        if optimize:
            _optimize(raw, path, model)
        else:
            os.replace(raw, path)


def _optimize(raw: Path, path: Path, model) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    for name in ("fusion_base", "onnx_model", "onnx_model_bert", "fusion_utils"):  # per-fusion chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    encoder = model.config.encoder
    optimized = optimize_model(
        str(raw),
        model_type="bert",
        num_heads=int(encoder["num_attention_heads"]),
        hidden_size=int(encoder["hidden_size"]),
        opt_level=1,
    )
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    logger.info("onnxruntime optimizer fused: %s", fused)
    optimized.save_model_to_file(str(path))


def _write_metadata(path: Path, values: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in values.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def read_metadata(path: Path) -> dict[str, str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def parity(model, onnx_model: "OnnxMultiTaskModel", batch: dict | None = None) -> dict[str, float]:
    """Max |torch - onnx| on the embeddings and on each task's logits, for one padded batch."""
    import torch

    batch = batch or _sample_batch(model, seed=1)
    with torch.no_grad():
        want = model(**batch)
    got = onnx_model(**{k: v.numpy() for k, v in batch.items()})
    diffs = {"embeddings": float(np.abs(got["embeddings"] - want.embeddings.numpy()).max())}
    for name, logits in want.logits.items():
        diffs[f"logits.{name}"] = float(np.abs(got["logits"][name] - logits.numpy()).max())
    return diffs


def export(
    model_dir: str | os.PathLike,
    int8: bool = False,
    trust_remote_code: bool = False,
    optimize: bool = True,
    int8_keep_ffn_output: bool = False,
) -> Path:
    """Export `model_dir` (a train.py output folder) to `model_dir/onnx/model.onnx` and check it against torch.

    The file is written beside its final name and moved there only after the parity check passed, so a failed
    export never leaves a file that looks valid.
    """
    from predict import load_model

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(
            f"{model_dir} is not a local folder: ONNX export takes a model folder (download a Hub repo first, "
            f"e.g. `hf download REPO --local-dir DIR`)."
        )
    model = load_model(folder, trust_remote_code=trust_remote_code, device="cpu")
    out_dir = folder / ONNX_DIR
    out_dir.mkdir(exist_ok=True)
    target = out_dir / ONNX_FILE
    partial = out_dir / f".{ONNX_FILE}.partial"
    metadata = {
        "multitask_tasks": json.dumps(model.config.tasks),
        "multitask_weights_sha256": weights_digest(folder),
        "multitask_opset": str(OPSET),
        "multitask_max_positions": str(model.config.encoder.get("max_position_embeddings") or 512),
    }
    try:
        export_graph(model, partial, optimize=optimize)
        _write_metadata(partial, metadata)
        diffs = parity(model, OnnxMultiTaskModel(partial))
        worst = max(diffs.values())
        if worst > PARITY_TOLERANCE:
            raise ValueError(f"{target}: the ONNX graph differs from torch by up to {worst:.2e} ({diffs}).")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("Wrote %s (max |diff| vs torch %.1e)", target, worst)
    if int8:
        quantize(target, out_dir / INT8_FILE, keep_ffn_output=int8_keep_ffn_output)
    return target


def ffn_output_matmuls(graph) -> list[str]:
    """The MatMul nodes that read a GELU's output: each layer's feed-forward down-projection. Their inputs (GELU
    activations) have the widest range in the encoder, so one int8 scale per batch rounds them worst
    (bench/quantization.py measures what keeping them float32 buys)."""
    gelu_outputs = {out for node in graph.node if node.op_type in GELU_OPS for out in node.output}
    if not gelu_outputs:  # an unfused graph: GELU is Mul(x, 0.5 * (1 + Erf(x / sqrt 2))), no single node
        return [n.name for n in graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name
                and "/attention/" not in n.name]  # fmt: skip
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[0] in gelu_outputs]


class QuantizerChatter(logging.Filter):
    """Drops what onnxruntime's quantizer logs per tensor (and its advice to pre-process) through the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"onnxruntime{os.sep}quantization" not in record.pathname


def quantize(source: Path, target: Path, keep_ffn_output: bool = False) -> Path:
    """Dynamic int8 quantization of every MatMul and attention projection: weights int8 with one scale per output
    channel (symmetric), activations uint8 with one scale per batch, computed on the fly; the recipe of
    sentence-transformers' `export_dynamic_quantized_onnx_model(..., "avx512_vnni")`, on the fused graph.
    `keep_ffn_output` leaves the feed-forward down-projections (`ffn_output_matmuls`) float32: slower, closer to
    float32 on the worst text (bench/RESULTS.md, "int8 against float32")."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    partial = target.with_name(f".{target.name}.partial")
    keep = ffn_output_matmuls(onnx.load(str(source), load_external_data=False).graph) if keep_ffn_output else []
    root = logging.getLogger()
    chatter = QuantizerChatter()  # one line per tensor, on the root logger
    root.addFilter(chatter)
    try:
        # The fused graph's contrib ops (Attention, SkipLayerNormalization) have no ONNX shape inference: their
        # outputs are float32, which the quantizer is told instead of inferring.
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        quantize_dynamic(
            str(source), str(partial), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep,
            extra_options=extra,
        )  # fmt: skip
        _write_metadata(partial, {**read_metadata(source), "multitask_int8_scheme": INT8_SCHEMES[keep_ffn_output]})
        os.replace(partial, target)
    finally:
        root.removeFilter(chatter)
        partial.unlink(missing_ok=True)
    logger.info("Wrote %s (%s)", target, INT8_SCHEMES[keep_ffn_output])
    return target


def load_onnx_model(
    model_dir: str | os.PathLike, trust_remote_code: bool = False, int8: bool = False, threads: int | None = None
) -> "OnnxMultiTaskModel":
    """`model_dir/onnx/model.onnx` (or `model_int8.onnx`) in an onnxruntime session; exported first when it is
    missing or was exported from other weights."""
    folder = Path(model_dir)
    path = folder / ONNX_DIR / (INT8_FILE if int8 else ONNX_FILE)
    if not folder.is_dir():
        raise ValueError(f"--backend onnx takes a local model folder; {model_dir} is not one.")
    from predict import check_weights

    check_weights(folder)
    if path.is_file():
        model = OnnxMultiTaskModel(path, threads=threads)
        current = model.metadata.get("multitask_weights_sha256") == weights_digest(folder)
        if current and (not int8 or model.metadata.get("multitask_int8_scheme") in INT8_SCHEMES.values()):
            return model
        reason = "its weights changed" if not current else "it records no quantization recipe"
        logger.info("Exporting %s to ONNX again: %s since %s was written", folder, reason, path)
    else:
        logger.info("Exporting %s to ONNX (first use)", folder)
    export(folder, int8=int8, trust_remote_code=trust_remote_code)
    return OnnxMultiTaskModel(path, threads=threads)


class OnnxMultiTaskModel:
    """An exported multi-task graph in an onnxruntime session, with `MultiTaskModel.predict`'s interface."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.tasks = [
            {**task, "id2label": {int(k): v for k, v in task["id2label"].items()}}
            for task in json.loads(metadata["multitask_tasks"])
        ]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # The graph's inputs carry no length bound: the encoder's position table, recorded at export, is the limit.
        self.max_length = int(metadata.get("multitask_max_positions") or 512)

    def __call__(self, input_ids, attention_mask, token_type_ids=None) -> dict:
        feed = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        }
        if "token_type_ids" in self.input_names:
            types = np.zeros_like(feed["input_ids"]) if token_type_ids is None else token_type_ids
            feed["token_type_ids"] = np.asarray(types, dtype=np.int64)
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        logits = {task["name"]: outputs[f"logits.{task['name']}"] for task in self.tasks}
        return {"embeddings": outputs["embeddings"], "logits": logits}

    def predict(
        self,
        texts: list[str],
        tokenizer,
        batch_size: int = 64,
        max_length: int | None = None,
        return_embeddings: bool = False,
        show_progress_bar: bool = False,
    ) -> list[dict]:
        """As `MultiTaskModel.predict`: longest texts first, each batch padded to its own longest, results in
        input order."""
        from transformers.utils import logging as hf_logging

        if isinstance(texts, str):
            raise ValueError("predict() takes a list of texts; wrap a single text in a list: predict([text], ...).")
        if batch_size < 1:
            raise ValueError(f"predict(): batch_size must be >= 1, got {batch_size}.")
        texts = list(texts)
        if not texts:
            return []
        max_length = max_length or min(int(tokenizer.model_max_length), self.max_length)
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]), reverse=True)
        results: list[dict | None] = [None] * len(texts)
        with hf_logging.tqdm(total=len(texts), unit="text", disable=not show_progress_bar) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                rows_encoded = [{k: encoded[k][i] for k in keys} for i in rows]
                batch = tokenizer.pad(rows_encoded, padding="longest", return_tensors="np")
                output = self(**batch)
                labels, scores = {}, {}
                for name, logits in output["logits"].items():
                    logits = logits.astype(np.float64)
                    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
                    probabilities /= probabilities.sum(-1, keepdims=True)
                    labels[name], scores[name] = probabilities.argmax(-1), probabilities.max(-1)
                for j, i in enumerate(rows):
                    result = {
                        task["name"]: {
                            "label": task["id2label"][int(labels[task["name"]][j])],
                            "score": float(scores[task["name"]][j]),
                        }
                        for task in self.tasks
                    }
                    if return_embeddings:
                        result["embedding"] = output["embeddings"][j].tolist()
                    results[i] = result
                bar.update(len(rows))
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="A train.py output folder.")
    parser.add_argument("--int8", action="store_true", help="Also write onnx/model_int8.onnx (dynamic int8).")
    parser.add_argument(
        "--int8_keep_ffn_output", action="store_true",
        help="With --int8: keep the feed-forward down-projections float32 (slower; closer to float32 on the "
        "worst text).",
    )  # fmt: skip
    parser.add_argument("--no_optimize", action="store_true", help="Skip onnxruntime's transformer fusions.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Build the model from the folder's code.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s - %(name)s - %(message)s", stream=sys.stderr)
    try:
        if args.int8_keep_ffn_output and not args.int8:
            raise ValueError("--int8_keep_ffn_output changes the int8 graph: add --int8.")
        path = export(
            args.model_dir, int8=args.int8, trust_remote_code=args.trust_remote_code, optimize=not args.no_optimize,
            int8_keep_ffn_output=args.int8_keep_ffn_output,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
