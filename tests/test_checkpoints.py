"""checkpoints.py: optimizer/scheduler/RNG state round-trip through safetensors, and picking a checkpoint."""

from __future__ import annotations

import logging
import random

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


def _complete(folder, world_size=1):
    folder.mkdir(parents=True)
    for name in checkpoints.REQUIRED_FILES:
        (folder / name).write_text("x")
    for rank in range(world_size):
        (folder / checkpoints.rng_file_name(rank, world_size)).write_text("x")
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
