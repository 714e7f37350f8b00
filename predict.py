"""Label texts with a trained multi-task model: one JSON line per text, every task's label and probability.

    python predict.py runs/quick "is this any good" "a gorgeous film ."
    python predict.py runs/quick --file texts.txt --embeddings > predictions.jsonl
    cat texts.txt | python predict.py me/multitask-minilm          # a Hub repo id works too
    python predict.py runs/quick --file texts.txt --backend onnx   # exports runs/quick/onnx/model.onnx on first use

Output, in input order: {"text": ..., "<task>": {"label": ..., "score": ...}, ..., "embedding": [...]}
(`embedding` only with --embeddings). Texts are read from the arguments, else from --file, else from stdin, one per
line; blank lines are skipped. Input is read as it comes and labelled in windows of a few batches: each window is
sorted by length, run (one encoder pass per batch serves all tasks) and written, in input order, before the next
is read, so memory stays bounded and output starts while input still arrives.

Loading is safe by default: the model is built from this repository's `modeling_multitask.py` (a folder's own copy
of that file is never imported) and its weights are read from safetensors only; pickle weights (`*.bin`, `*.pt`)
are refused. `--trust_remote_code` runs the folder's or Hub repo's code instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger("predict")
PROGRESS_MIN_TEXTS = 256  # below this a progress bar is noise
WINDOW_BATCHES = 16  # texts sorted by length together: enough to group similar lengths, few enough to start soon
PAUSE_SECONDS = 0.05  # input that pauses this long ends the current window early (interactive or slow pipes)
MODEL_TYPE = "multitask_sentence_encoder"
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
BACKENDS = ("torch", "onnx", "onnx-int8")


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def check_weights(model_name_or_path: str | os.PathLike) -> None:
    """A local folder must hold safetensors weights; a folder holding only pickles is refused, naming them."""
    folder = Path(model_name_or_path)
    if not folder.is_dir():
        return  # a Hub repo id: `use_safetensors=True` makes transformers refuse pickle-only repos
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json: pass the output folder of a train.py run or a Hub repo id.")
    if any((folder / name).is_file() for name in SAFE_WEIGHTS):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds pickle weights ({', '.join(pickles)}) and no model.safetensors. Loading a pickle can "
            f"run arbitrary code, so only safetensors are loaded. If you trust the file, convert it once: "
            f"MultiTaskModel.from_pretrained(folder, use_safetensors=False).save_pretrained(folder)."
        )
    raise ValueError(f"{folder} holds no model.safetensors: pass the output folder of a finished train.py run.")


def check_folder(model_name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """What `load_model` checks before it reads any weights: safetensors present, and a model saved by train.py
    unless `trust_remote_code`."""
    check_weights(model_name_or_path)
    model_type = read_model_type(model_name_or_path)
    if model_type != MODEL_TYPE and not trust_remote_code:
        raise ValueError(
            f"{model_name_or_path}: config.json has model_type {model_type!r}, expected {MODEL_TYPE!r} (a model "
            f"saved by train.py). Pass --trust_remote_code to load another model class with its own code."
        )


def read_model_type(model_name_or_path: str | os.PathLike) -> str | None:
    """The model type of a saved folder: `multitask_sentence_encoder` for ours (whose config.json names the
    encoder's type, see `MultiTaskConfig.to_dict`), else what config.json says."""
    from modeling_multitask import MultiTaskConfig

    config, _ = MultiTaskConfig.get_config_dict(str(model_name_or_path))
    return config.get("model_type")


def load_model(model_name_or_path: str | os.PathLike, trust_remote_code: bool = False, device: str | None = None):
    """The multi-task model in eval mode on `device`, from safetensors weights.

    By default the class is this repository's `MultiTaskModel` and no code from the folder or repo runs;
    `trust_remote_code=True` builds the class from the folder's or repo's own `modeling_multitask.py`.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from modeling_multitask import MultiTaskModel

    check_folder(model_name_or_path, trust_remote_code)
    hf_logging.disable_progress_bar()  # the weight-loading bar; the texts' bar is the one that matters
    try:
        if trust_remote_code:
            model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=True, use_safetensors=True)
        else:
            model = MultiTaskModel.from_pretrained(model_name_or_path, use_safetensors=True)
    except SafetensorError as exc:
        raise ValueError(
            f"{model_name_or_path}: its safetensors weights cannot be read ({exc}); the file is damaged or was cut "
            f"short: copy or download the model again."
        ) from exc
    except OSError as exc:
        if "safetensors" in str(exc).lower() or "no file named" in str(exc).lower():
            raise ValueError(
                f"{model_name_or_path}: no safetensors weights found ({exc}). Only safetensors are loaded; pickle "
                f"weights (pytorch_model.bin) are refused."
            ) from exc
        raise
    finally:
        hf_logging.enable_progress_bar()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def load_tokenizer(model_name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved with the model. By default it is built from the class named in tokenizer_config.json
    when transformers ships that class, so neither config.json's auto_map nor any code file is read."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import get_tokenizer_config, tokenizer_class_from_name

    if not trust_remote_code:
        name = get_tokenizer_config(str(model_name_or_path)).get("tokenizer_class")
        tokenizer_class = tokenizer_class_from_name(name) if isinstance(name, str) else None
        if tokenizer_class is not None:
            return tokenizer_class.from_pretrained(model_name_or_path)
    return AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)


def load(
    model_name_or_path: str | os.PathLike,
    backend: str = "torch",
    trust_remote_code: bool = False,
    device: str | None = None,
):
    """(model, tokenizer) for `model.predict(texts, tokenizer, ...)`, with either backend.

    `backend="onnx"` runs `onnx/model.onnx` of a local folder with onnxruntime (exported there on first use, see
    onnx_export.py); its `predict` returns the same dicts as `MultiTaskModel.predict`. `backend="onnx-int8"` runs
    its dynamically int8-quantized copy `onnx/model_int8.onnx` instead (faster on CPUs with int8 dot products,
    close to but not equal to float32: see bench/RESULTS.md).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {list(BACKENDS)}.")
    if backend in ("onnx", "onnx-int8"):
        import onnx_export

        if device not in (None, "cpu"):
            raise ValueError(f"--backend {backend} runs on onnxruntime's CPU provider, not --device {device}.")
        model = onnx_export.load_onnx_model(
            model_name_or_path, trust_remote_code=trust_remote_code, int8=backend == "onnx-int8"
        )
    else:
        model = load_model(model_name_or_path, trust_remote_code, device)
    return model, load_tokenizer(model_name_or_path, trust_remote_code)


# ---------------------------------------------------------------------------------------------------------
# Input, read lazily
# ---------------------------------------------------------------------------------------------------------


def decode_line(raw: bytes, number: int, where: str) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{where} line {number}: not valid UTF-8 ({exc.reason}: byte {raw[exc.start:exc.start + 1]!r} at "
            f"position {exc.start}). Convert the input to UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


class Texts:
    """The non-blank input texts as (line number, text), read lazily; counts blank lines skipped."""

    def __init__(self, texts: list[str], file: str | None):
        if texts and file:
            raise ValueError("Give texts as arguments or with --file, not both.")
        if file is not None and not Path(file).is_file():
            raise ValueError(f"--file {file!r} does not exist.")
        self.texts, self.file = texts, file
        self.where = "arguments" if texts else (f"--file {file}" if file is not None else "stdin")
        self.skipped = 0

    def lines(self) -> Iterator[tuple[int, str]]:
        if self.texts:
            yield from enumerate(self.texts, 1)
        elif self.file is not None:
            with open(self.file, "rb") as stream:
                for number, raw in enumerate(stream, 1):
                    yield number, decode_line(raw, number, self.where)
        else:
            if sys.stdin.isatty():
                logger.warning("Reading texts from stdin, one per line (Ctrl-D to end).")
            for number, raw in enumerate(sys.stdin.buffer, 1):
                yield number, decode_line(raw, number, self.where)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for number, text in self.lines():
            if text.strip():
                yield number, text
            else:
                self.skipped += 1

    def count(self) -> int:
        """Checks every line and counts the texts, without keeping them (a file is read twice, stdin never)."""
        return sum(1 for _ in self)


_END = object()


def windows(texts: Iterable[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    """Windows of up to `size` texts, read by a background thread through a bounded queue (so reading and
    labelling overlap and memory stays bounded). A window closes early when input pauses for PAUSE_SECONDS,
    so a slow or interactive writer gets answers for what it sent. An error raised while reading comes out
    after the window of the lines before it."""
    slots: queue.Queue = queue.Queue(maxsize=4 * size)

    def fill() -> None:
        try:
            for item in texts:
                slots.put(item)
            slots.put(_END)
        except Exception as exc:  # handed over to the consumer, which raises it
            slots.put(exc)

    threading.Thread(target=fill, daemon=True).start()
    window: list[tuple[int, str]] = []
    while True:
        try:
            item = slots.get(timeout=PAUSE_SECONDS) if window else slots.get()
        except queue.Empty:
            yield window
            window = []
            continue
        if item is _END:
            break
        if isinstance(item, Exception):
            if window:
                yield window
            raise item
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="A train.py output folder or a Hub repo id.")
    parser.add_argument("texts", nargs="*", help="Texts to label (default: --file, else stdin).")
    parser.add_argument("--file", help="A UTF-8 file with one text per line.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=None, help="Truncate to this many tokens.")
    parser.add_argument("--embeddings", action="store_true", help="Add each text's sentence embedding.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available).")
    parser.add_argument(
        "--backend", default="torch", choices=BACKENDS,
        help="torch; onnx: onnxruntime on MODEL/onnx/model.onnx (exported there on first use; CPU); onnx-int8: its "
        "dynamically int8-quantized copy MODEL/onnx/model_int8.onnx (faster, not bit-equal).",
    )  # fmt: skip
    parser.add_argument(
        "--trust_remote_code", action="store_true",
        help="Run the model folder's or Hub repo's own code (modeling_multitask.py) instead of this repository's.",
    )  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="On an error, show the Python traceback.")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    return args


def run(args: argparse.Namespace) -> int:
    """Label the input; returns the number of texts written."""
    from transformers.utils import logging as hf_logging

    texts = Texts(args.texts, args.file)
    total = None
    if args.file is not None or args.texts:
        total = Texts(args.texts, args.file).count()  # a bad or empty file fails here, before the model loads
        if total == 0:
            raise ValueError(f"No texts to label: {texts.where} holds only blank lines.")

    model, tokenizer = load(args.model, args.backend, args.trust_remote_code, args.device)
    out = sys.stdout
    written = 0
    bar = None
    try:
        for window in windows(texts, WINDOW_BATCHES * args.batch_size):
            results = model.predict(
                [text for _, text in window],
                tokenizer,
                batch_size=args.batch_size,
                max_length=args.max_length,
                return_embeddings=args.embeddings,
            )
            pairs = zip(window, results)
            lines = (json.dumps({"text": text, **result}, ensure_ascii=False) for (_, text), result in pairs)
            out.write("".join(line + "\n" for line in lines))
            out.flush()
            written += len(window)
            if bar is None and (total or written) >= PROGRESS_MIN_TEXTS:
                bar = hf_logging.tqdm(total=total, unit="text", initial=written - len(window))
            if bar is not None:
                bar.update(len(window))
    except ValueError as exc:
        if written:
            raise ValueError(f"{exc} The {written} text(s) before it were labelled and written.") from None
        raise
    finally:
        if bar is not None:
            bar.close()
    if texts.skipped:
        logger.warning("Skipped %d blank line(s).", texts.skipped)
    if written == 0:
        found = "held only blank lines" if texts.skipped else "was empty"
        raise ValueError(
            f"No texts to label: {texts.where} {found}. Pass texts as arguments, with --file, or on stdin."
        )
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s - %(name)s - %(message)s", stream=sys.stderr)
    try:
        run(args)
    except (ValueError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # the reader went away (`| head`): not an error of ours
            sys.stdout = open(os.devnull, "w")
            return 0
        if args.debug:
            raise
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
