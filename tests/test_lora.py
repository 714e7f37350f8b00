"""LoRA on the shared encoder (lora.py): what trains, the target modules, the refused combinations, the merged and
adapter-only folders, and resuming a LoRA run from its checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

import lora
import train
from freezing import apply_freezing
from helpers import run_main, tiny_argv

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["what a wonderful film", "is this any good ?", "the plot is a mess", "where do you live"]
# The tiny BERT of conftest: 2 layers, hidden 32, intermediate 37; with r = 4 each adapted Linear(in, out) adds
# r * (in + out): query, key, value, attention output 4 * 64 each, intermediate 4 * 69, output 4 * 69.
TINY_LORA_PARAMETERS = 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 37))
TINY_HEAD_PARAMETERS = 2 * (32 * 2 + 2)


def lora_args(**overrides) -> train.ModelArguments:
    return train.ModelArguments(**{"lora_r": 4, **overrides})


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _logits(model, tokenizer) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


# ---------------------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------------------


def test_lora_trains_adapters_and_heads_only(make_model):
    full = make_model()
    full_trainable, total = apply_freezing(full, [], [])
    assert full_trainable == total  # full fine-tuning: everything

    model = make_model()
    settings = lora.apply_lora(model, lora_args())
    assert settings == {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["query", "key", "value", "dense"],
                        "save": "merged"}  # fmt: skip
    trainable, with_adapters = apply_freezing(model, [], [])
    assert trainable == TINY_LORA_PARAMETERS + TINY_HEAD_PARAMETERS
    assert with_adapters == total + TINY_LORA_PARAMETERS
    for name, p in model.named_parameters():
        in_encoder = name.startswith("encoder.")
        assert p.requires_grad == (lora.is_adapter_parameter(name) or not in_encoder), name
    assert all(p.requires_grad for p in model.heads.parameters())


def test_lora_off_by_default_and_its_flags_need_a_rank(make_model):
    assert lora.apply_lora(make_model(), train.ModelArguments()) is None
    with pytest.raises(ValueError, match=r"lora_alpha, lora_target_modules set without LoRA: pass --lora_r"):
        train.ModelArguments(lora_alpha=16, lora_target_modules=["query"])
    with pytest.raises(ValueError, match=r"lora_save set without LoRA"):
        train.ModelArguments(lora_save="adapter")
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\), got 1.0"):
        lora_args(lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"lora_r must be 0 \(no LoRA\) or a positive rank"):
        train.ModelArguments(lora_r=-1)


# ---------------------------------------------------------------------------------------------------------
# Target modules
# ---------------------------------------------------------------------------------------------------------


def test_target_modules_default_by_encoder_family(make_model):
    assert lora.resolve_targets(make_model().encoder) == ["query", "key", "value", "dense"]
    distil = DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, hidden_dim=37))
    assert lora.resolve_targets(distil) == ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]
    # A dotted suffix picks one kind of layer: only the attention output's dense, not the feed-forward ones.
    model = make_model()
    lora.apply_lora(model, lora_args(lora_target_modules=["query", "attention.output.dense"]))
    adapted = {n.rsplit(".lora_A.", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    wanted = {f"encoder.encoder.layer.{i}.attention.{m}" for i in (0, 1) for m in ("self.query", "output.dense")}
    assert adapted == wanted


def test_target_modules_that_match_nothing_are_refused(make_model):
    message = r"--lora_target_modules \[.q_proj.\] match no linear layer of the encoder \(BertModel, model type .bert.\)"
    with pytest.raises(ValueError, match=message + r"; its linear layers are named \["):
        lora.apply_lora(make_model(), lora_args(lora_target_modules=["query", "q_proj"]))


# ---------------------------------------------------------------------------------------------------------
# LoRA with the freezing options
# ---------------------------------------------------------------------------------------------------------


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_combines_with_layer_and_head_freezing(make_model):
    model = make_model()
    lora.apply_lora(model, lora_args())
    apply_freezing(model, ["layers:0", "head:question"], [])
    trainable = _trainable(model)
    assert trainable and all(".layer.1." in n or n.startswith("heads.sentiment") for n in trainable), trainable
    assert any(".layer.1." in n and ".lora_B." in n for n in trainable)

    # freeze all, unfreeze encoder: the adapters train, the encoder's own weights stay frozen, heads frozen.
    model = make_model()
    lora.apply_lora(model, lora_args())
    apply_freezing(model, ["all"], ["encoder"])
    assert _trainable(model) == {n for n, _ in model.named_parameters() if lora.is_adapter_parameter(n)}


@pytest.mark.parametrize(
    "freeze, unfreeze, message",
    [
        (["encoder"], [], r"leaves no LoRA adapter to train: with --lora_r the encoder learns only through its"),
        (["all"], ["heads"], r"leaves no LoRA adapter to train"),
        (["embeddings"], [], r"freeze 'embeddings' has no effect with LoRA \(--lora_r\): it holds only encoder"),
        (["heads"], ["embeddings"], r"unfreeze 'embeddings' has no effect with LoRA"),
    ],
)
def test_freezing_that_does_not_combine_with_lora_is_refused(make_model, freeze, unfreeze, message):
    model = make_model()
    lora.apply_lora(model, lora_args())
    with pytest.raises(ValueError, match=message):
        apply_freezing(model, freeze, unfreeze)


def test_refused_before_anything_is_written(tiny_encoder_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"freeze 'embeddings' has no effect with LoRA"):
        train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--lora_r", "4", "--freeze", "embeddings"))
    with pytest.raises(ValueError, match=r"--lora_save adapter writes the adapter alone, but "
                                         r"--export_sentence_transformers inline"):  # fmt: skip
        train.main(tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--lora_r", "4", "--lora_save", "adapter"))
    with pytest.raises(ValueError, match=r"LoRA \(--lora_r\) is not supported with FSDP or DeepSpeed"):
        lora.check_training_setup(lora_args(), SimpleNamespace(fsdp="full_shard", deepspeed=None), "none")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# Saved folders
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monkeymodule():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def merged_run(monkeymodule, tiny_encoder_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-merged") / "run"
    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--lora_r", "4", "--max_steps", "2")
    trainer, metrics = run_main(monkeymodule, argv)
    return SimpleNamespace(out=out, trainer=trainer, metrics=metrics)


LOAD_ELSEWHERE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder, texts, result_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    result = {"module": type(model).__module__, "peft_imported": "peft" in sys.modules,
              "logits": {task: v.tolist() for task, v in logits.items()}}
    json.dump(result, open(result_file, "w"))
    """
)


def test_merged_folder_is_an_ordinary_model(merged_run):
    out = merged_run.out
    assert merged_run.metrics["train"]["trainable_parameters"] == TINY_LORA_PARAMETERS + TINY_HEAD_PARAMETERS
    assert merged_run.metrics["recipe"]["lora"]["r"] == 4
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["recipe"]["lora"]["target_modules"] == ["query", "key", "value", "dense"]
    assert not (out / lora.ADAPTER_CONFIG_FILE).exists()  # transformers would try to load an adapter with peft
    keys = _keys(out / "model.safetensors")
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    plain = merged_run.trainer.model.__class__(merged_run.trainer.model.config)
    assert sorted(keys) == sorted(plain.state_dict())
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert "import peft" not in (out / "modeling_multitask.py").read_text()
    card = (out / "README.md").read_text()
    assert "| LoRA | rank 4, alpha 8, dropout 0.1 on `query`, `key`, `value`, `dense`; merged" in card


def test_merged_folder_reloads_in_a_clean_process_with_the_same_logits(merged_run, tmp_path):
    """Copied elsewhere, loaded by plain transformers (trust_remote_code) without importing peft: the logits of the
    in-memory merged model; and merging changes the trained LoRA model's logits only by rounding."""
    folder = tmp_path / "copy"
    shutil.copytree(merged_run.out, folder)
    result_file = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, str(folder), json.dumps(TEXTS), str(result_file)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(result_file.read_text())
    assert result["module"].startswith("transformers_modules.")
    assert result["peft_imported"] is False

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    trained = merged_run.trainer.model
    merged = lora.merged_copy(trained)
    assert lora.has_adapters(trained) and not lora.has_adapters(merged)
    expected, unmerged = _logits(merged, tokenizer), _logits(trained, tokenizer)
    for task, logits in expected.items():
        assert torch.tensor(result["logits"][task]).sub(logits).abs().max() <= 1e-6, task
        assert unmerged[task].sub(logits).abs().max() <= 1e-5, task
    # The adapters trained: the merged encoder is not the starting encoder.
    start = load_file(str(Path(merged.config.encoder_name_or_path) / "model.safetensors"))
    assert not torch.equal(merged.encoder.state_dict()["encoder.layer.0.attention.self.query.weight"],
                           start["encoder.layer.0.attention.self.query.weight"])  # fmt: skip


def test_adapter_option_writes_the_adapter_alone(monkeypatch, tiny_encoder_dir, tiny_data_dir, tmp_path):
    import peft
    from transformers import AutoModel

    out = tmp_path / "run"
    argv = tiny_argv(
        tiny_encoder_dir, tiny_data_dir, out,
        "--lora_r", "4", "--max_steps", "2", "--lora_save", "adapter", "--export_sentence_transformers", "none",
    )  # fmt: skip
    trainer, _ = run_main(monkeypatch, argv)
    names = {p.name for p in out.iterdir()}
    assert {lora.ADAPTER_CONFIG_FILE, lora.ADAPTER_WEIGHTS_FILE, lora.HEADS_FILE, "config.json"} <= names
    assert not [n for n in names if n.startswith("model") and n.endswith(".safetensors")]
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    adapter_keys = _keys(out / lora.ADAPTER_WEIGHTS_FILE)
    assert adapter_keys and all(".lora_A." in k or ".lora_B." in k for k in adapter_keys)
    assert sorted(_keys(out / lora.HEADS_FILE)) == [f"heads.{t}.{w}" for t in ("question", "sentiment")
                                                    for w in ("bias", "weight")]  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    expected = _logits(lora.merged_copy(trainer.model), tokenizer)
    rebuilt = lora.load_adapter_folder(out)
    for task, logits in _logits(rebuilt, tokenizer).items():
        assert logits.sub(expected[task]).abs().max() <= 1e-6, task
    # peft's own loader reads the adapter onto the base encoder: the same encoder as the rebuilt model's.
    base = AutoModel.from_pretrained(tiny_encoder_dir, add_pooling_layer=False)
    adapted = peft.PeftModel.from_pretrained(base, out).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        difference = adapted(**batch).last_hidden_state - rebuilt.encoder(**batch).last_hidden_state
    assert difference.abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def test_lora_run_resumes_exactly_and_other_settings_are_refused(
    monkeypatch, tiny_encoder_dir, tiny_data_dir, tmp_path
):
    flags = ("--lora_r", "4", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
             "--export_sentence_transformers", "none")  # fmt: skip
    first = tmp_path / "first"
    run_main(monkeypatch, tiny_argv(tiny_encoder_dir, tiny_data_dir, first, *flags))
    checkpoint = first / "checkpoint-2"
    assert any(".lora_A." in k for k in _keys(checkpoint / "model.safetensors"))
    assert not [p for p in checkpoint.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]

    resumed = tmp_path / "resumed"
    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, resumed, *flags, "--resume_from_checkpoint", str(checkpoint))
    run_main(monkeypatch, argv)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for other, found, wanted in (
        (("--lora_r", "8"), r"LoRA adapters of rank \[4\]", r"--lora_r 8"),
        (("--lora_r", "0"), r"LoRA adapters of rank \[4\]", r"no LoRA"),
        (
            ("--lora_target_modules", "query", "value"),
            r"LoRA adapters of rank \[4\] on \['dense', 'key', 'query', 'value'\]",
            r"--lora_r 4 on \['query', 'value'\]",
        ),
    ):
        argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "refused", *flags, *other,
                         "--resume_from_checkpoint", str(checkpoint))  # fmt: skip
        with pytest.raises(ValueError, match=rf"the checkpoint holds {found}.*, this run asks for {wanted}"):
            train.main(argv)
        assert not (tmp_path / "refused").exists()


def test_bench_rows_share_the_slice_and_differ_only_in_lora_and_learning_rate(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import lora_vs_full
    finally:
        sys.path.remove(str(ROOT / "bench"))
    args, extra = lora_vs_full.parse_args(["--rows", "100", "--", "--max_steps", "3"])
    full, adapted = (lora_vs_full.run_flags(args, name, tmp_path, extra) for name in ("full", "lora"))

    def without(flags, names):
        out = list(flags)
        for name in names:
            at = out.index(name)
            del out[at : at + 2]
        return out

    assert without(full, ["--learning_rate"]) == without(adapted, ["--learning_rate", "--lora_r"])
    assert full[full.index("--learning_rate") + 1] == "0.0001" and adapted[adapted.index("--lora_r") + 1] == "8"
    assert "--lora_r" not in full and full[-2:] == ["--max_steps", "3"]
