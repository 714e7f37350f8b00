"""Shared fixtures: tiny random encoders and tokenizers built in code (no downloads), paths to the real data.

- `tiny_encoder_dir`: a folder holding a 2-layer random BERT (hidden 32) and a word-level BERT tokenizer
  whose vocab covers the fixture sentences; usable anywhere an encoder path is (`--encoder DIR`).
- `make_model(tasks=...)`: a `MultiTaskModel` on that tiny encoder.
- `tiny_data_dir`: a mirror folder shaped like ../shared/data, holding a few hundred real rows of each split.
- `shared_data_dir`: ../shared/data itself (integration tests).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# Tests never touch the network: everything is built here or read from ../shared/data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

TINY_ENCODER = dict(
    vocab_size=None,  # set from the vocab
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=128,
)
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(autouse=True)
def library_logging_restored():
    """Each test starts with datasets' and transformers' progress bars and verbosity as the previous test found them:
    the benchmarks' `quiet_libraries()` turns them off process-wide, which would silence (and so hide from) the tests
    that check what a run prints."""
    import datasets
    import transformers

    hf = transformers.utils.logging
    bars, hf_bars, verbosity = datasets.is_progress_bar_enabled(), hf.is_progress_bar_enabled(), hf.get_verbosity()
    yield
    if bars != datasets.is_progress_bar_enabled():
        (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()
    if hf_bars != hf.is_progress_bar_enabled():
        (hf.enable_progress_bar if hf_bars else hf.disable_progress_bar)()
    hf.set_verbosity(verbosity)


def _vocab() -> list[str]:
    from collections import Counter

    counts = Counter()
    if SHARED_DATA.is_dir():
        import pandas as pd

        for rel, col in (("sst2/train.parquet", "sentence"), ("trec/train.parquet", "text")):
            for text in pd.read_parquet(SHARED_DATA / rel)[col].head(3000):
                counts.update(text.lower().split())
    words = [w for w, _ in counts.most_common(3000)]
    words += "what how why who where when which is are do does can a film good bad this any ? ! . ,".split()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = words + letters + [f"##{c}" for c in letters] + list("0123456789?!.,'-")
    return SPECIAL + sorted(set(pieces) - set(SPECIAL))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-encoder")
    vocab = _vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=128)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(**{**TINY_ENCODER, "vocab_size": len(vocab)}), add_pooling_layer=False).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_encoder_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_encoder_dir)


@pytest.fixture
def make_model(tiny_encoder_dir):
    from modeling_multitask import MultiTaskModel

    def make(tasks=None, **kwargs):
        import torch

        torch.manual_seed(0)
        tasks = tasks or [
            {"name": "sentiment", "num_labels": 2, "id2label": {0: "negative", 1: "positive"}},
            {"name": "question", "num_labels": 2, "id2label": {0: "not_question", 1: "question"}},
        ]
        return MultiTaskModel.from_encoder(str(tiny_encoder_dir), tasks=tasks, **kwargs)

    return make


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need the shared data mirror beside the repo.")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, shared_data_dir) -> Path:
    """A small mirror with the same layout and columns as ../shared/data (a few hundred real rows)."""
    import pandas as pd

    folder = tmp_path_factory.mktemp("mirror")
    for rel, rows in (
        ("sst2/train.parquet", 400),
        ("sst2/validation.parquet", 120),
        ("trec/train.parquet", 200),
        ("dailydialog/validation.parquet", 150),
        ("swda/validation.parquet", 150),
    ):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        pd.read_parquet(shared_data_dir / rel).head(rows).to_parquet(folder / rel)
    return folder


@pytest.fixture
def make_trainer(make_model, tiny_tokenizer, tiny_data_dir, tmp_path):
    from transformers import TrainingArguments

    import train

    def make(model=None, **overrides):
        data_args = train.DataArguments(
            data_dir=str(tiny_data_dir), max_train_samples=64, max_eval_samples=16, gold_eval=False
        )
        import data as mtdata

        mt = mtdata.build_data(mtdata.get_tasks(["sentiment", "question"]), tiny_tokenizer, data_args, seed=0)
        settings = dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=8,
            max_steps=8,
            logging_steps=4,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_pin_memory=False,
        )
        return train.MultiTaskTrainer(
            model=model or make_model(),
            args=TrainingArguments(**{**settings, **overrides}),
            train_dataset=mt.train,
            eval_dataset=mt.eval_sets,
            processing_class=tiny_tokenizer,
            data_collator=mtdata.MultiTaskCollator(tiny_tokenizer.pad_token_id),
            task_sizes=mt.task_sizes,
            eval_tasks=mt.eval_tasks,
            mt_args=train.MultiTaskArguments(),
        )

    return make
