"""Saved models are safe to load: the shipped modeling code does no I/O of its own and imports nothing but
torch, transformers and the standard library; a damaged config.json fails with a clear error."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoModel

import train  # noqa: F401  (registers the auto classes, so save_pretrained writes auto_map)
from modeling_multitask import MultiTaskModel

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_THIRD_PARTY = {"torch", "transformers"}
# Standard-library modules that reach files, processes or the network (or load code); none may be imported.
IO_MODULES = {
    "os", "io", "sys", "socket", "ssl", "urllib", "http", "ftplib", "smtplib", "subprocess", "multiprocessing",
    "asyncio", "selectors", "select", "pickle", "marshal", "shelve", "dbm", "sqlite3", "shutil", "pathlib",
    "tempfile", "glob", "fileinput", "zipfile", "tarfile", "gzip", "bz2", "lzma", "importlib", "ctypes",
    "webbrowser", "builtins", "code", "runpy", "pty", "signal", "mmap",
}  # fmt: skip
FORBIDDEN_CALLS = {"open", "exec", "eval", "compile", "__import__", "input", "breakpoint", "globals", "setattr"}
FORBIDDEN_ATTRIBUTES = {
    "load", "save", "read_text", "write_text", "read_bytes", "write_bytes", "urlopen", "system", "popen",
    "hub", "from_file", "to_json_file", "save_pretrained", "push_to_hub",
}  # fmt: skip


def violations(source: str) -> list[str]:
    """What in `source` imports beyond torch/transformers/stdlib, or does file, process or network I/O itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(f"line {node.lineno}: relative import")
            modules = [node.module or ""]
        for module in modules:
            top = module.split(".")[0]
            if top in IO_MODULES:
                found.append(f"line {node.lineno}: imports {module} (I/O)")
            elif top not in ALLOWED_THIRD_PARTY and top not in sys.stdlib_module_names:
                found.append(f"line {node.lineno}: imports {module} (not torch/transformers/stdlib)")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: calls {func.id}()")
            if isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_ATTRIBUTES:
                found.append(f"line {node.lineno}: calls .{func.attr}()")
        if isinstance(node, ast.Attribute) and node.attr in ("hub", "__builtins__", "__globals__", "__subclasses__"):
            found.append(f"line {node.lineno}: uses .{node.attr}")
    return found


def test_modeling_file_imports_only_torch_transformers_stdlib_and_does_no_io():
    source = (ROOT / "modeling_multitask.py").read_text(encoding="utf-8")
    assert violations(source) == []
    tree = ast.parse(source)
    imported = {
        (a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [None])
    }
    assert imported - set(sys.stdlib_module_names) <= ALLOWED_THIRD_PARTY


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("import socket", "imports socket (I/O)"),
        ("from urllib.request import urlopen", "imports urllib.request (I/O)"),
        ("import requests", "imports requests (not torch/transformers/stdlib)"),
        ("from . import data", "relative import"),
        ("x = open('w.bin').read()", "calls open()"),
        ("import torch\nstate = torch.load('x.pt')", "calls .load()"),
        ("eval('1')", "calls eval()"),
        ("import torch\ntorch.hub.list('x')", "uses .hub"),
    ],
)
def test_the_checker_catches_io(snippet, expected):
    assert any(expected in v for v in violations(snippet)), violations(snippet)


def test_the_saved_folder_ships_the_same_modeling_file(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    assert (tmp_path / "modeling_multitask.py").read_text() == (ROOT / "modeling_multitask.py").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "modeling_multitask.py"]


DOCTORED = [
    ("zero labels", lambda c: c["tasks"][0].update(num_labels=0),
     r"task 'sentiment' has num_labels=0; a classification head needs at least 2"),
    ("id2label keys do not match num_labels", lambda c: c["tasks"][1].update(id2label={"0": "no", "5": "yes"}),
     r"task 'question' has num_labels=2 but id2label keys \[0, 5\]; expected keys 0\.\.1"),
    ("negative hidden size", lambda c: c["encoder"].update(hidden_size=-32),
     r"encoder hidden_size=-32 must be a positive integer; the saved config\.json is damaged"),
    ("zero layers", lambda c: c["encoder"].update(num_hidden_layers=0),
     r"encoder num_hidden_layers=0 must be a positive"),
    ("negative vocabulary", lambda c: c["encoder"].update(vocab_size=-1), r"encoder vocab_size=-1 must be a positive"),
    ("fractional heads", lambda c: c["encoder"].update(num_attention_heads=2.5),
     r"encoder num_attention_heads=2\.5 must"),
    ("unknown pooling", lambda c: c.update(pooling="attention"),
     r"pooling='attention' is not one of \['mean', 'cls', 'max'\]"),
    ("unknown loss weighting", lambda c: c.update(loss_weighting="magic"), r"loss_weighting='magic' is not one of"),
    ("dropout out of range", lambda c: c.update(classifier_dropout=1.5),
     r"classifier_dropout=1\.5 must be in \[0, 1\)"),
    ("negative task weight", lambda c: c.update(task_weights={"sentiment": -1.0}),
     r"task_weights\['sentiment'\]=-1\.0 must be a finite number >= 0"),
    ("duplicate tasks", lambda c: c["tasks"].append(dict(c["tasks"][0])), r"duplicate task names \['sentiment'\]"),
    ("no encoder model_type", lambda c: c["encoder"].pop("model_type"), r"the encoder config has no 'model_type'"),
]


@pytest.mark.parametrize("edit, message", [d[1:] for d in DOCTORED], ids=[d[0] for d in DOCTORED])
@pytest.mark.parametrize("loader", ["MultiTaskModel", "AutoModel+trust_remote_code"])
def test_nonsensical_saved_config_fails_to_load_clearly(make_model, tmp_path, edit, message, loader):
    make_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        if loader == "MultiTaskModel":
            MultiTaskModel.from_pretrained(tmp_path)
        else:
            AutoModel.from_pretrained(tmp_path, trust_remote_code=True)


def test_undamaged_saved_config_loads_with_both_loaders(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaders = (MultiTaskModel.from_pretrained, lambda path: AutoModel.from_pretrained(path, trust_remote_code=True))
    for loaded in (load(tmp_path) for load in loaders):
        assert loaded.config.task_names == ["sentiment", "question"]
        assert all((a == b).all() for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
