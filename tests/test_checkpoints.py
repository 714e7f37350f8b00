"""checkpoints.py: optimizer/scheduler/RNG state round-trip through safetensors, and picking a checkpoint."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil

import numpy as np
import pytest
import torch

import checkpoints


def _trained_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def _assert_equal(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_optimizer_and_scheduler_state_round_trip_exactly(tmp_path):
    _, optimizer, scheduler = _trained_optimizer()
    checkpoints.save_state(optimizer.state_dict(), tmp_path / "optimizer.safetensors")
    checkpoints.save_state(scheduler.state_dict(), tmp_path / "scheduler.safetensors")
    loaded = checkpoints.load_state(tmp_path / "optimizer.safetensors")
    _assert_equal(optimizer.state_dict(), loaded)  # int keys, tuples (betas), 0-d step tensors
    _assert_equal(scheduler.state_dict(), checkpoints.load_state(tmp_path / "scheduler.safetensors"))

    # Loaded into a fresh optimizer, the next step is bitwise the one the original takes.
    model2, optimizer2, scheduler2 = _trained_optimizer()
    optimizer2.load_state_dict(loaded)
    model, optimizer, _ = _trained_optimizer()
    for m, opt in ((model, optimizer), (model2, optimizer2)):
        torch.manual_seed(1)
        m(torch.randn(5, 4)).sum().backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_rng_states_round_trip(tmp_path):
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    checkpoints.save_state(state, tmp_path / "rng_state.safetensors")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = checkpoints.load_state(tmp_path / "rng_state.safetensors")
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    torch.random.set_rng_state(loaded["cpu"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_objects_that_need_pickle_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"state\['fn'\]: cannot store a function in a checkpoint without pickle"):
        checkpoints.save_state({"fn": lambda: 0}, tmp_path / "x.safetensors")


def _complete(folder, world_size=1, manifest=True):
    """A checkpoint folder whose files are well-formed (tiny safetensors and JSON), with its manifest."""
    folder.mkdir(parents=True)
    for name in checkpoints.REQUIRED_FILES + tuple(checkpoints.rng_file_name(r, world_size) for r in range(world_size)):
        if name.endswith(".safetensors"):
            checkpoints.save_state({"w": torch.arange(64, dtype=torch.float32), "step": 3}, folder / name)
        else:
            (folder / name).write_text(json.dumps({"global_step": 3}), encoding="utf-8")
    if manifest:
        checkpoints.write_manifest(folder)
    return folder


def test_latest_checkpoint_skips_incomplete_and_staging_folders(tmp_path, caplog):
    _complete(tmp_path / "checkpoint-4")
    _complete(tmp_path / "checkpoint-8")
    partial = tmp_path / "checkpoint-12"  # e.g. written by a tool without atomic saves, killed mid-write
    partial.mkdir()
    (partial / "model.safetensors").write_text("x")
    _complete(tmp_path / ".checkpoint-16.partial")  # our own staging folder, never a candidate
    with caplog.at_level(logging.WARNING, logger="checkpoints"):
        assert checkpoints.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    assert "Skipping incomplete checkpoint" in caplog.text and "checkpoint-12" in caplog.text


def test_latest_checkpoint_orders_by_step_not_by_name(tmp_path):
    _complete(tmp_path / "checkpoint-9")
    _complete(tmp_path / "checkpoint-10")
    assert checkpoints.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert checkpoints.latest_checkpoint(tmp_path / "missing") is None


def test_every_process_needs_its_rng_file(tmp_path):
    folder = _complete(tmp_path / "checkpoint-2", world_size=2)
    assert checkpoints.missing_files(folder, world_size=2) == []
    (folder / "rng_state_1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"lacks \['rng_state_1\.safetensors'\]\. It is incomplete"):
        checkpoints.check_checkpoint(folder, world_size=2)


def test_stock_pickle_checkpoint_is_named_as_such(tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", "training_args.bin"):  # fmt: skip
        (folder / name).write_text("x")
    with pytest.raises(ValueError, match=r"holds pickle files \['optimizer\.pt', 'rng_state\.pth', 'scheduler\.pt', "
                       r"'training_args\.bin'\]: it was written by the stock Trainer"):  # fmt: skip
        checkpoints.check_checkpoint(folder)


# Damage a checkpoint's files in the ways a full disk, a killed copy or an editor do.
DAMAGE = {
    "empty model": ("model.safetensors", lambda path: path.write_bytes(b"")),
    "truncated optimizer": ("optimizer.safetensors", lambda path: path.write_bytes(path.read_bytes()[:-40])),
    "invalid trainer_state JSON": ("trainer_state.json", lambda path: path.write_text("{not json", encoding="utf-8")),
    "flipped byte, same size": (
        "scheduler.safetensors",
        lambda path: path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1])),
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_auto_skips_a_damaged_checkpoint_naming_it_and_the_one_used(tmp_path, caplog, kind):
    name, corrupt = DAMAGE[kind]
    _complete(tmp_path / "checkpoint-4")
    newest = _complete(tmp_path / "checkpoint-8")
    corrupt(newest / name)
    with caplog.at_level(logging.WARNING, logger="checkpoints"):
        assert checkpoints.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert re.search(
        rf"Skipping damaged checkpoint .*checkpoint-8 \({re.escape(name)} .*\); resuming from .*checkpoint-4 instead",
        caplog.text,
    ), caplog.text
    with pytest.raises(ValueError, match=rf"Checkpoint .*checkpoint-8 is damaged: {re.escape(name)} .*Resume from an "
                       r"earlier checkpoint, or pass --resume_from_checkpoint auto"):  # fmt: skip
        checkpoints.check_checkpoint(newest)
    checkpoints.check_checkpoint(tmp_path / "checkpoint-4")  # the intact one passes


def test_damage_messages_say_what_is_wrong(tmp_path):
    folder = _complete(tmp_path / "checkpoint-2")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "optimizer.safetensors").write_bytes((folder / "optimizer.safetensors").read_bytes()[:100])
    (folder / "trainer_state.json").write_text('{"global_step": 4}', encoding="utf-8")  # same size, other bytes
    sizes = checkpoints.read_manifest(folder)
    assert checkpoints.damage(folder) == [
        f"model.safetensors is 0 bytes, manifest.json says {sizes['model.safetensors']['size']}",
        f"optimizer.safetensors is 100 bytes, manifest.json says {sizes['optimizer.safetensors']['size']}",
        "trainer_state.json does not match its sha256 in manifest.json",
    ]


def test_without_a_manifest_files_are_checked_for_structure(tmp_path, caplog):
    folder = _complete(tmp_path / "checkpoint-2", manifest=False)
    with caplog.at_level(logging.WARNING, logger="checkpoints"):
        assert checkpoints.damage(folder) == []
    assert "has no manifest.json: its files are checked for structure only" in caplog.text
    (folder / "model.safetensors").write_bytes(b"")
    optimizer = folder / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:-40])
    (folder / "trainer_state.json").write_text("{not json", encoding="utf-8")
    problems = checkpoints.damage(folder)
    assert problems[0] == "model.safetensors is 0 bytes, too short for a safetensors file"
    assert re.fullmatch(r"optimizer\.safetensors is \d+ bytes, its header describes \d+ \(truncated\)", problems[1])
    assert problems[2].startswith("trainer_state.json is not valid JSON (")
    (folder / "manifest.json").write_text("[]", encoding="utf-8")
    assert checkpoints.damage(folder)[0].startswith("manifest.json is damaged (")


def test_manifest_lists_regular_files_only(tmp_path):
    folder = _complete(tmp_path / "checkpoint-2", manifest=False)
    (folder / "sub").mkdir()
    (folder / "sub" / "a.txt").write_text("a")
    (folder / "link.txt").symlink_to(folder / "sub" / "a.txt")
    (folder / "linked_dir").symlink_to(folder / "sub", target_is_directory=True)
    manifest = checkpoints.write_manifest(folder)
    assert "sub/a.txt" in manifest["files"] and "manifest.json" not in manifest["files"]
    assert not [rel for rel in manifest["files"] if rel.startswith(("link", "linked_dir"))]
    assert checkpoints.read_manifest(folder) == manifest["files"]


# ---------------------------------------------------------------------------------------------------------
# Fault test: the newest checkpoint damaged, `--resume_from_checkpoint auto` falls back (runs in processes)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_encoder_dir, tiny_data_dir):
    """test_e2e's 10-step run with checkpoints at steps 4 and 8, uninterrupted: (config, output folder)."""
    from test_e2e import CONFIG, argv, run

    folder = tmp_path_factory.mktemp("uninterrupted")
    config = folder / "faults.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    run(argv(config, tiny_encoder_dir, tiny_data_dir, folder / "out"))
    return config, folder / "out"


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["empty model", "truncated optimizer", "invalid trainer_state JSON"])
def test_auto_resume_past_a_damaged_newest_checkpoint_ends_bit_identical(
    uninterrupted, tiny_encoder_dir, tiny_data_dir, tmp_path, kind
):
    from safetensors.torch import load_file
    from test_e2e import MAX_STEPS, argv, run

    config, reference = uninterrupted
    out = tmp_path / "out"
    for step in (4, 8):  # the folder as a run killed after checkpoint-8 leaves it
        shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{step}")
    name, corrupt = DAMAGE[kind]
    corrupt(out / "checkpoint-8" / name)

    result = run(argv(config, tiny_encoder_dir, tiny_data_dir, out, "--resume_from_checkpoint", "auto"))
    log = result.stdout + result.stderr
    assert re.search(
        rf"Skipping damaged checkpoint \S*checkpoint-8 \({re.escape(name)} [^\n]*\); "
        r"resuming from \S*checkpoint-4 instead",
        log,
    ), log[-3000:]
    assert json.loads((out / "metrics.json").read_text())["train"]["global_steps"] == MAX_STEPS
    expected, got = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []  # bit-identical, every tensor
    assert checkpoints.damage(out / "checkpoint-8") == []  # step 8 was written again, intact
