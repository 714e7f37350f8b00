"""Any AutoModel encoder: seven families (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2, MPNet, ModernBERT), each
a tiny random config built here with the tiny word-level tokenizer of conftest.py (only the vocab size must match).

Each family trains 2 steps through `train.main`, saves, reloads with `trust_remote_code` (here and, for all of them,
in a clean process that cannot import the repository), predicts, and loads in sentence-transformers. The
preflight picks the attention implementation each class supports and refuses one it does not, before data loads.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

import train
from helpers import run_main, tiny_argv
from modeling_multitask import MultiTaskModel, encoder_attn_implementation, encoder_build_kwargs, encoder_class

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
# Each family's tiny config; pad_token_id is the tokenizer's ([PAD] = 0), positions leave room for RoBERTa-style
# offsets (padding_idx + 1).
FAMILIES = {
    "bert": dict(SIZES, max_position_embeddings=128),
    "roberta": dict(SIZES, max_position_embeddings=130),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=128),
    "electra": dict(SIZES, embedding_size=16, max_position_embeddings=128),
    "deberta-v2": dict(SIZES, max_position_embeddings=128),
    "mpnet": dict(SIZES, max_position_embeddings=130),
    "modernbert": dict(
        SIZES, max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=16,
        bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
    ),
}  # fmt: skip
# What each class is built with: (attention implementation under `auto`, takes token_type_ids, has a pooler arg).
EXPECTED = {
    "bert": ("sdpa", True, True),
    "roberta": ("sdpa", True, True),
    "distilbert": ("sdpa", False, False),
    "electra": ("sdpa", True, False),
    "deberta-v2": ("eager", True, False),
    "mpnet": ("eager", False, True),
    "modernbert": ("sdpa", False, False),
}
TEXTS = ["is it any good ?", "a gorgeous , witty , seductive movie .", "bad"]


def family_config(family: str, vocab_size: int):
    return AutoConfig.for_model(family, vocab_size=vocab_size, pad_token_id=0, **FAMILIES[family])


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory, tiny_tokenizer):
    """family -> a folder holding that family's tiny random encoder and the tiny tokenizer (built on first use)."""
    built = {}

    def get(family: str) -> Path:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"enc-{family}")
            config = family_config(family, len(tiny_tokenizer))
            torch.manual_seed(0)
            cls = encoder_class(config)
            kwargs = {k: v for k, v in encoder_build_kwargs(cls).items() if k != "attn_implementation"}
            cls(config, **kwargs).save_pretrained(folder)
            tiny_tokenizer.save_pretrained(folder)
            built[family] = folder
        return built[family]

    return get


@pytest.fixture(scope="module")
def trained(encoder_dirs, tiny_data_dir, tmp_path_factory):
    """family -> (output folder, trainer) of a 2-step `train.main` run on that family's encoder (run on first use)."""
    runs = {}

    def get(family: str):
        if family not in runs:
            out = tmp_path_factory.mktemp(f"run-{family}") / "out"
            argv = tiny_argv(encoder_dirs(family), tiny_data_dir, out, "--max_steps", "2", "--logging_steps", "1")
            with pytest.MonkeyPatch.context() as monkeypatch:
                trainer, _ = run_main(monkeypatch, argv)
            runs[family] = (out, trainer)
        return runs[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encoder_class_gets_only_the_arguments_it_accepts(family, tiny_tokenizer):
    attn, _, has_pooler_arg = EXPECTED[family]
    cls = encoder_class(family_config(family, len(tiny_tokenizer)))
    kwargs = encoder_build_kwargs(cls, "auto")
    assert kwargs["attn_implementation"] == attn
    assert ("add_pooling_layer" in kwargs) == has_pooler_arg


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_saves_and_reloads(family, trained, tiny_tokenizer):
    out, trainer = trained(family)
    attn, takes_token_types, _ = EXPECTED[family]
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.encoder.config.model_type == family
    assert model.encoder.config._attn_implementation == attn
    assert model.encoder_takes_token_type_ids == takes_token_types
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert not hasattr(model.encoder, "pooler") or model.encoder.pooler is None

    saved = json.loads((out / "config.json").read_text())
    assert saved["encoder"]["model_type"] == family
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    reloaded = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert type(reloaded).__module__ != MultiTaskModel.__module__  # the folder's own copy of the code ran
    assert type(reloaded.encoder).__name__ == type(model.encoder).__name__
    assert reloaded.encoder.config._attn_implementation == attn
    model = model.eval().cpu()
    # A BERT-style tokenizer returns token_type_ids; encoders without segment embeddings must not be handed them.
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    batch.setdefault("token_type_ids", torch.zeros_like(batch["input_ids"]))
    seen = []
    reloaded.encoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    with torch.no_grad():
        expected, got = model(**batch), reloaded(**batch)
    assert ("token_type_ids" in seen[0]) == takes_token_types
    for task in ("sentiment", "question"):
        torch.testing.assert_close(got.logits[task], expected.logits[task])
    predictions = reloaded.predict(TEXTS, AutoTokenizer.from_pretrained(out))
    assert [set(p) for p in predictions] == [{"sentiment", "question"}] * len(TEXTS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_in_sentence_transformers(family, trained):
    from sentence_transformers import SentenceTransformer

    out, trainer = trained(family)
    model = trainer.accelerator.unwrap_model(trainer.model).eval().cpu()
    st = SentenceTransformer(str(out), device="cpu")
    got = st.encode(TEXTS, convert_to_tensor=True)
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).embeddings
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


CLEAN_RELOAD = """
import json, sys
import torch
from transformers import AutoModel, AutoTokenizer
out = {}
for family, folder in json.loads(sys.argv[1]).items():
    try:
        import modeling_multitask
        raise SystemExit("the repository is importable: not a clean process")
    except ImportError:
        pass
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tokenizer(json.loads(sys.argv[2]), padding=True, return_tensors="pt")
    with torch.no_grad():
        out[family] = {k: v.tolist() for k, v in model(**batch).logits.items()}
print(json.dumps(out))
"""


def test_every_family_reloads_in_a_clean_process(trained, tmp_path):
    """The saved folder's own modeling file rebuilds each encoder in a process that cannot import this repo."""
    folders = {family: str(trained(family)[0]) for family in FAMILIES}
    result = subprocess.run(
        [sys.executable, "-c", CLEAN_RELOAD, json.dumps(folders), json.dumps(TEXTS)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
             "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    logits = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(logits) == set(FAMILIES)
    for family in FAMILIES:
        out, trainer = trained(family)
        model = trainer.accelerator.unwrap_model(trainer.model).eval().cpu()
        batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = model(**batch).logits
        for task, values in logits[family].items():
            torch.testing.assert_close(torch.tensor(values), expected[task], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "family, requested, message",
    [
        ("mpnet", "sdpa", "MPNetModel does not support attn_implementation='sdpa'"),
        ("deberta-v2", "flex_attention", "DebertaV2Model does not support"),
        ("bert", "fast", "is not one of"),
    ],
)
def test_preflight_refuses_an_unsupported_attention_before_data_loads(
    family, requested, message, encoder_dirs, tiny_data_dir, tmp_path, monkeypatch
):
    import data as mtdata

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the attention implementation was checked")

    monkeypatch.setattr(mtdata, "build_data", no_data)
    monkeypatch.setattr(mtdata, "load_source", no_data)
    out = tmp_path / "out"
    argv = tiny_argv(encoder_dirs(family), tiny_data_dir, out, "--attn_implementation", requested)
    with pytest.raises(ValueError, match=message):
        train.main(argv)
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_preflight_refuses_flash_attention_without_its_package(encoder_dirs, tiny_data_dir, tmp_path, monkeypatch):
    import data as mtdata

    monkeypatch.setattr(mtdata, "build_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    argv = tiny_argv(encoder_dirs("bert"), tiny_data_dir, tmp_path / "out", "--attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match=r"--attn_implementation flash_attention_2: .*Use --attn_implementation auto"):
        train.main(argv)


def test_explicit_attention_choices_the_class_supports_pass():
    bert, mpnet = encoder_class(AutoConfig.for_model("bert")), encoder_class(AutoConfig.for_model("mpnet"))
    assert encoder_attn_implementation(bert, "eager") == "eager"
    assert encoder_attn_implementation(bert, None) == "sdpa"
    assert encoder_attn_implementation(mpnet, "auto") == "eager"
    assert encoder_attn_implementation(mpnet, "eager") == "eager"
