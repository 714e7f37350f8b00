"""Label texts with a trained multi-task model: one JSON line per text, every task's label and probability.

    python predict.py runs/quick "is this any good" "a gorgeous film ."
    python predict.py runs/quick --file texts.txt --embeddings > predictions.jsonl
    cat texts.txt | python predict.py me/multitask-minilm          # a Hub repo id works too

Output, in input order: {"text": ..., "<task>": {"label": ..., "score": ...}, ..., "embedding": [...]}
(`embedding` only with --embeddings). Texts are read from the arguments, else from --file, else from stdin, one per
line; blank lines are skipped. One encoder pass per batch serves all tasks (`MultiTaskModel.predict`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("predict")
PROGRESS_MIN_TEXTS = 256  # below this a progress bar is noise


def read_texts(texts: list[str], file: str | None) -> list[str]:
    if texts and file:
        raise ValueError("Give texts as arguments or with --file, not both.")
    if texts:
        lines = texts
    elif file is not None:
        if not Path(file).is_file():
            raise ValueError(f"--file {file!r} does not exist.")
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    else:
        if sys.stdin.isatty():
            logger.warning("Reading texts from stdin, one per line (Ctrl-D to end).")
        lines = sys.stdin.read().splitlines()
    kept = [line for line in lines if line.strip()]
    if len(kept) < len(lines):
        logger.warning("Skipped %d blank line(s).", len(lines) - len(kept))
    return kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="A train.py output folder or a Hub repo id.")
    parser.add_argument("texts", nargs="*", help="Texts to label (default: --file, else stdin).")
    parser.add_argument("--file", help="A UTF-8 file with one text per line.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=None, help="Truncate to this many tokens.")
    parser.add_argument("--embeddings", action="store_true", help="Add each text's sentence embedding.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s - %(name)s - %(message)s", stream=sys.stderr)

    texts = read_texts(args.texts, args.file)
    if not texts:
        raise ValueError("No texts to label: pass them as arguments, with --file, or on stdin.")

    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_logging.disable_progress_bar()  # the weight-loading bar; the texts' bar below is the one that matters
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).to(device)
    # trust_remote_code here too: AutoTokenizer reads config.json, whose class is the model's own code.
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    hf_logging.enable_progress_bar()
    results = model.predict(
        texts,
        tokenizer,
        batch_size=args.batch_size,
        max_length=args.max_length,
        return_embeddings=args.embeddings,
        show_progress_bar=len(texts) >= PROGRESS_MIN_TEXTS,
    )
    out = sys.stdout
    for text, result in zip(texts, results):
        out.write(json.dumps({"text": text, **result}, ensure_ascii=False) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
