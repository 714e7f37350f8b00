"""Inference: sentence embeddings per second against sentence-transformers, and both task heads in one pass
against one single-task classifier, on the same texts (SST-2 validation + TREC test), encoder and batch size.

Runs (`--runs`):
  st_encode     SentenceTransformer(encoder).encode(texts, batch_size): its own length sorting, mean pooling,
                normalisation, numpy output.
  ours_embed    MultiTaskModel.predict(texts, tokenizer, batch_size, return_embeddings=True): embeddings plus both
                tasks' labels, per-text dicts (the product path; it does more than st_encode).
  single_task   AutoModelForSequenceClassification on the same encoder, the same length-sorted batches and per-text
                {"label", "score"} output: what one classifier per task costs.
  ours_both     MultiTaskModel.predict(texts, tokenizer, batch_size): both tasks' labels from one encoder pass.

Every run first handles one batch untimed, then the runs take turns (`--repeats` rounds) so that a change in
machine load hits all of them alike; the table gives the median pass. Heads are untrained: speed is the same.

    python bench/inference.py --repeats 3 --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import logging
import statistics

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
import torch
from common import PeakMemory, free_memory, markdown_table, now, report, resolve_device, resolve_encoder, setting

logger = logging.getLogger("bench")
RUNS = ("st_encode", "ours_embed", "single_task", "ours_both")


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


def build_runs(names: list[str], encoder_path: str, device: str, tokenizer, batch_size: int, attn: str) -> dict:
    """name -> a function of the texts; each model loaded once, in eval mode, on the device.

    Weights are float32 whatever dtype the checkpoint was saved in (transformers v5 otherwise keeps the saved
    dtype, e.g. a float16 copy made to travel light).
    """
    from transformers import AutoModelForSequenceClassification

    import data as mtdata
    from modeling_multitask import MultiTaskModel

    runs = {}
    if {"ours_embed", "ours_both"} & set(names):
        tasks = [t.to_config() for t in mtdata.get_tasks(["sentiment", "question"])]
        ours = MultiTaskModel.from_encoder(encoder_path, tasks=tasks, attn_implementation=attn, dtype=torch.float32)
        ours = ours.to(device).eval()
        runs["ours_embed"] = lambda texts: ours.predict(texts, tokenizer, batch_size, return_embeddings=True)
        runs["ours_both"] = lambda texts: ours.predict(texts, tokenizer, batch_size)
    if "st_encode" in names:
        from sentence_transformers import SentenceTransformer

        model_kwargs = {"attn_implementation": attn, "dtype": torch.float32}
        st = SentenceTransformer(encoder_path, device=device, model_kwargs=model_kwargs)
        runs["st_encode"] = lambda texts: st.encode(texts, batch_size=batch_size, show_progress_bar=False)
    if "single_task" in names:
        single = AutoModelForSequenceClassification.from_pretrained(
            encoder_path, num_labels=2, attn_implementation=attn, dtype=torch.float32
        )
        single = single.to(device).eval()
        runs["single_task"] = lambda texts: predict_single(single, tokenizer, texts, batch_size)
    return {name: runs[name] for name in names}


def embedding_agreement(runs: dict, texts: list[str]) -> float | None:
    """Largest difference between our (normalised) embeddings and sentence-transformers': same encoder, same maths."""
    if "st_encode" not in runs or "ours_embed" not in runs:
        return None
    sample = texts[:256]
    # Normalised both sides: a model folder may or may not hold sentence-transformers' Normalize module.
    theirs = torch.nn.functional.normalize(torch.as_tensor(np.asarray(runs["st_encode"](sample))).float(), dim=-1)
    ours = torch.nn.functional.normalize(torch.tensor([r["embedding"] for r in runs["ours_embed"](sample)]), dim=-1)
    return float((ours - theirs).abs().max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes over all texts per run.")
    parser.add_argument("--max_texts", type=int, default=None, help="Use only the first N texts.")
    parser.add_argument("--attn_implementation", default="sdpa")
    args = parser.parse_args(argv)

    common.quiet_libraries()
    common.apply_threads(args.threads)
    device = resolve_device(args.device)
    encoder_path = resolve_encoder(args.encoder)
    info = setting(device)
    texts = load_texts(args.data_dir, args.max_texts)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    torch.manual_seed(args.seed)
    runs = build_runs(args.runs, encoder_path, device, tokenizer, args.batch_size, args.attn_implementation)
    agreement = embedding_agreement(runs, texts)
    longest = sorted(texts, key=len, reverse=True)[: args.batch_size]
    for fn in runs.values():
        fn(longest)  # untimed: threads, allocator and kernels warm up

    seconds = {name: [] for name in runs}
    peaks = {name: (0.0, 0.0) for name in runs}  # (peak, growth during the pass)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            free_memory(device)
            with PeakMemory(device) as memory:
                started = now()
                fn(texts)
                common.synchronize(device)
                seconds[name].append(now() - started)
            peaks[name] = max(peaks[name], (memory.peak_mb, memory.growth_mb))

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
    ratios = {}
    if {"ours_embed", "st_encode"} <= set(by_name):
        ratios["embeddings_per_second_ours_vs_st"] = (
            by_name["ours_embed"]["texts_per_second"] / by_name["st_encode"]["texts_per_second"]
        )
    if {"ours_both", "single_task"} <= set(by_name):
        ratios["time_both_tasks_vs_single_task"] = (
            by_name["ours_both"]["seconds_median"] / by_name["single_task"]["seconds_median"]
        )
    relative = {
        "ours_embed": "st_encode",
        "st_encode": "st_encode",
        "ours_both": "single_task",
        "single_task": "single_task",
    }
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
    mem = "peak GPU MiB" if device == "cuda" else "peak RSS MiB"
    table = markdown_table(["run", "texts/s", "s per pass (median)", "speed vs", mem, "growth in pass MiB"], rows)
    result = {"benchmark": "inference", "device": device, "setting": info, "results": results, "ratios": ratios}
    result["embedding_max_abs_diff_vs_st"] = agreement
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "note")}
    notes = [
        f"{len(texts)} texts (SST-2 validation + TREC test), batch size {args.batch_size}, median of {args.repeats} "
        f"passes, encoder {args.encoder}, attention {args.attn_implementation}",
        "ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()),
        None
        if agreement is None
        else f"our normalised embeddings vs sentence-transformers': max |diff| {agreement:.1e}",
        "memory: every model stays loaded in one process, so each peak counts them all; growth is the pass's own",
        args.note,
    ]
    report(f"Inference ({device})", table, result, args.out, notes)
    return result


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    main()
