"""onnx_export.py: the whole model (encoder, pooling, every head) as one ONNX graph, equal to torch, used by
`predict.py --backend onnx` and `load_onnx_model`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "a good film .",
    "why is the film so bad ? it is not good , and the cast is bad too .",
    "what",
    "is this any good",
    "how can a film this bad be so good ? what a film !",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_encoder_dir):
    from transformers import AutoTokenizer

    from modeling_multitask import MultiTaskModel

    torch.manual_seed(0)
    tasks = [
        {"name": "sentiment", "num_labels": 2, "id2label": {0: "negative", 1: "positive"}},
        {"name": "question", "num_labels": 3, "id2label": {0: "statement", 1: "question", 2: "exclamation"}},
    ]
    model = MultiTaskModel.from_encoder(str(tiny_encoder_dir), tasks=tasks)
    for head in model.heads.values():  # heads far from zero, so that labels differ between texts
        torch.nn.init.normal_(head.weight, std=2.0)
    folder = tmp_path_factory.mktemp("onnx-model")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(model_dir):
    import onnx_export

    return onnx_export.export(model_dir)


def test_one_graph_with_dynamic_batch_and_length_equals_torch(model_dir, exported):
    import onnxruntime as ort

    import onnx_export
    from modeling_multitask import MultiTaskModel
    from predict import load_tokenizer

    assert exported == model_dir / "onnx" / "model.onnx"
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embeddings", "logits.sentiment", "logits.question"]
    for node in session.get_inputs():
        assert [isinstance(d, str) for d in node.shape] == [True, True], node  # batch and sequence both symbolic

    model = MultiTaskModel.from_pretrained(model_dir).eval()
    onnx_model = onnx_export.OnnxMultiTaskModel(exported)
    tokenizer = load_tokenizer(model_dir)
    # Other batch sizes and lengths than the export's sample.
    for texts in (TEXTS, TEXTS[2:4], [TEXTS[1]] * 7, [TEXTS[0]]):
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        assert len(set(texts)) == 1 or len({int(n) for n in batch["attention_mask"].sum(1)}) > 1  # really padded
        diffs = onnx_export.parity(model, onnx_model, batch)
        assert set(diffs) == {"embeddings", "logits.sentiment", "logits.question"}
        assert max(diffs.values()) <= 1e-4, diffs


def test_onnx_predict_equals_torch_predict(model_dir, exported):
    import onnx_export
    from predict import load

    model, tokenizer = load(model_dir, device="cpu")
    onnx_model, _ = load(model_dir, backend="onnx")
    assert isinstance(onnx_model, onnx_export.OnnxMultiTaskModel)
    want = model.predict(TEXTS, tokenizer, batch_size=2, return_embeddings=True)
    got = onnx_model.predict(TEXTS, tokenizer, batch_size=2, return_embeddings=True)
    assert len({r["question"]["label"] for r in want}) > 1  # the labels differ between texts
    for a, b in zip(want, got):
        for task in ("sentiment", "question"):
            assert a[task]["label"] == b[task]["label"]
            assert math.isclose(a[task]["score"], b[task]["score"], abs_tol=1e-5)
        assert np.abs(np.array(a["embedding"]) - np.array(b["embedding"])).max() <= 1e-4


def test_cli_backend_onnx_exports_on_first_use_and_gives_torchs_labels(model_dir, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("onnx"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def cli(*flags):
        done = subprocess.run(
            [sys.executable, str(ROOT / "predict.py"), str(folder), *TEXTS, *flags], capture_output=True, text=True,
            env=env, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in done.stdout.splitlines()], done.stderr

    torch_lines, _ = cli()
    onnx_lines, stderr = cli("--backend", "onnx")
    assert "Exporting" in stderr and (folder / "onnx" / "model.onnx").is_file()
    assert [line["text"] for line in onnx_lines] == TEXTS
    for a, b in zip(torch_lines, onnx_lines):
        assert a["sentiment"]["label"] == b["sentiment"]["label"] and a["question"]["label"] == b["question"]["label"]
    _, stderr = cli("--backend", "onnx")
    assert "Exporting" not in stderr  # the export is reused


def test_changed_weights_are_exported_again(model_dir, tmp_path):
    import onnx_export
    from modeling_multitask import MultiTaskModel

    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder)
    onnx_export.load_onnx_model(folder)
    model = MultiTaskModel.from_pretrained(folder)
    with torch.no_grad():
        model.heads["sentiment"].bias += 5.0
    model.save_pretrained(folder)
    reloaded = onnx_export.load_onnx_model(folder)
    ids = np.array([[2, 10, 11, 3]])
    got = reloaded(ids, np.ones_like(ids))["logits"]["sentiment"]
    with torch.no_grad():
        want = model.eval()(input_ids=torch.tensor(ids)).logits["sentiment"].numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_a_failed_check_leaves_no_file(model_dir, tmp_path, monkeypatch):
    import onnx_export

    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("onnx"))
    monkeypatch.setattr(onnx_export, "parity", lambda model, onnx_model, batch=None: {"embeddings": 0.5})
    with pytest.raises(ValueError, match=r"the ONNX graph differs from torch by up to 5.00e-01"):
        onnx_export.export(folder)
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == []


def test_int8_export_runs_and_stays_close(model_dir, tmp_path, caplog):
    import logging

    import onnx

    import onnx_export

    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder)
    caplog.set_level(logging.INFO)
    onnx_export.export(folder, int8=True)
    # The quantizer's line per tensor (root logger) is dropped; our own summary line stays.
    assert not [r for r in caplog.records if "quantization" in r.pathname], caplog.records[:3]
    assert any("weights per channel" in r.getMessage() for r in caplog.records)
    full = onnx_export.OnnxMultiTaskModel(folder / "onnx" / "model.onnx")
    int8 = onnx_export.OnnxMultiTaskModel(folder / "onnx" / "model_int8.onnx")
    assert int8.tasks == full.tasks
    assert int8.metadata["multitask_int8_scheme"] == onnx_export.INT8_SCHEMES[False]
    ops = {n.op_type for n in onnx.load(str(folder / "onnx" / "model_int8.onnx")).graph.node}
    assert "MatMul" not in ops and "DynamicQuantizeLinear" in ops  # every MatMul quantized
    ids = np.array([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    a, b = full(ids, mask)["embeddings"], int8(ids, mask)["embeddings"]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert 0.9 < cosine.min() and not np.array_equal(a, b)  # quantized, and still the same embedding


def test_int8_can_keep_the_feed_forward_outputs_float(model_dir, tmp_path):
    import onnx

    import onnx_export

    full = onnx_export.export(shutil.copytree(model_dir, tmp_path / "run"))
    graph = onnx.load(str(full)).graph
    kept = onnx_export.ffn_output_matmuls(graph)
    gelu = {o for n in graph.node if n.op_type in onnx_export.GELU_OPS for o in n.output}
    assert gelu and len(kept) == json.loads((model_dir / "config.json").read_text())["encoder"]["num_hidden_layers"]
    assert all(n.input[0] in gelu for n in graph.node if n.name in kept)
    target = onnx_export.quantize(full, full.with_name("kept.onnx"), keep_ffn_output=True)
    quantized = onnx.load(str(target)).graph.node
    assert sorted(n.name for n in quantized if n.op_type == "MatMul") == sorted(kept)  # only these stay float
    assert onnx_export.read_metadata(target)["multitask_int8_scheme"] == onnx_export.INT8_SCHEMES[True]


def test_backend_onnx_int8_quantizes_on_first_use_and_again_for_a_file_without_a_recipe(model_dir, tmp_path):
    import onnx_export
    from predict import load

    folder = tmp_path / "run"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("onnx"))
    model, tokenizer = load(folder, backend="onnx-int8")
    assert model.path == folder / "onnx" / "model_int8.onnx"
    results = model.predict(TEXTS, tokenizer, return_embeddings=True)
    assert [sorted(r) for r in results] == [["embedding", "question", "sentiment"]] * len(TEXTS)
    # A file quantized by an earlier version (no recipe in its metadata) is made again.
    path = folder / "onnx" / "model_int8.onnx"
    metadata = onnx_export.read_metadata(path)
    del metadata["multitask_int8_scheme"]
    onnx_export._write_metadata(path, metadata)
    assert "multitask_int8_scheme" not in onnx_export.read_metadata(path)
    again, _ = load(folder, backend="onnx-int8")
    assert again.metadata["multitask_int8_scheme"] == onnx_export.INT8_SCHEMES[False]
    with pytest.raises(ValueError, match="--backend onnx-int8 runs on onnxruntime.s CPU provider, not --device cuda"):
        load(folder, backend="onnx-int8", device="cuda")


def test_cli_refuses_what_is_not_a_model_folder(tmp_path, capsys, model_dir):
    import onnx_export

    assert onnx_export.main([str(model_dir), "--int8_keep_ffn_output"]) == 1
    assert "--int8_keep_ffn_output changes the int8 graph: add --int8." in capsys.readouterr().err

    assert onnx_export.main([str(tmp_path / "missing")]) == 1
    assert "is not a local folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert onnx_export.main([str(tmp_path / "empty")]) == 1
    assert "holds no config.json" in capsys.readouterr().err
