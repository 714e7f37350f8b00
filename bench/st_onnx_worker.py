"""`SentenceTransformer(encoder, backend="onnx")` for bench/inference.py's `st_onnx_backend` run (with `--int8 DIR`,
its int8 copy made by sentence-transformers' `export_dynamic_quantized_onnx_model`: `st_onnx_backend_int8`), in a
second interpreter: that backend needs optimum-onnx, whose release requires transformers < 4.58, so it cannot share this
repository's environment (transformers 5). Build that environment with `make st-onnx-venv`.

Protocol (one JSON object per line): it loads the model (optimum exports the encoder to ONNX, untimed), encodes the
warm-up texts, prints {"ready": ...}; then for each stdin line {"op": "encode"} it encodes all texts and prints
{"seconds": ...}; {"op": "embed", "n": N, "path": P} saves the first N texts' embeddings to P (.npy) and prints
{"saved": P}; {"op": "quit"} or end of input stops it. Imports sentence-transformers and numpy only.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("encoder", help="A sentence-transformers model folder or Hub id.")
    parser.add_argument("texts", help="A JSON file holding the list of texts.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=64, help="Longest texts encoded once, untimed.")
    parser.add_argument(
        "--int8", metavar="DIR", default=None,
        help="Quantize with export_dynamic_quantized_onnx_model(model, 'avx512_vnni', DIR) and encode with that file.",
    )  # fmt: skip
    args = parser.parse_args()

    import numpy as np
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    with open(args.texts, encoding="utf-8") as f:
        texts = json.load(f)
    model = SentenceTransformer(args.encoder, backend="onnx", device="cpu")
    if args.int8:
        from sentence_transformers import export_dynamic_quantized_onnx_model

        model.save_pretrained(args.int8)
        export_dynamic_quantized_onnx_model(model, "avx512_vnni", args.int8)
        file_name = "onnx/model_qint8_avx512_vnni.onnx"
        model = SentenceTransformer(args.int8, backend="onnx", device="cpu", model_kwargs={"file_name": file_name})
    model.encode(sorted(texts, key=len, reverse=True)[: args.warmup], batch_size=args.batch_size)

    def versions() -> dict:
        import onnxruntime
        import optimum.version
        import transformers

        return {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "optimum": optimum.version.__version__,
            "onnxruntime": onnxruntime.__version__,
        }

    reply({"ready": True, "model_class": type(model[0].auto_model).__name__, "versions": versions()})
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "encode":
            started = time.perf_counter()
            model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
            seconds = time.perf_counter() - started
            reply({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        elif request["op"] == "embed":
            np.save(request["path"], model.encode(texts[: request["n"]], batch_size=args.batch_size))
            reply({"saved": request["path"]})
        else:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
