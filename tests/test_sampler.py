"""The task sampler: target task frequencies, seeding per epoch, and sharding over ranks."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader
from helpers import run_main, tiny_argv

import train
from sampler import MultiTaskBatchSampler, make_batch_sampler

SIZES = [600, 150, 50]  # unequal on purpose: 150 + 38 + 13 = 201 batches of 4 per epoch
STRATEGIES = ["round_robin", "proportional", "temperature"]


def task_of(sampler: MultiTaskBatchSampler, batch: list[int]) -> int:
    tasks = {int(np.searchsorted(np.cumsum(sampler.task_sizes), i, side="right")) for i in batch}
    assert len(tasks) == 1, f"batch mixes tasks {tasks}"
    return tasks.pop()


def frequencies(sampler: MultiTaskBatchSampler, epochs: int) -> np.ndarray:
    counts = Counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts.update(task_of(sampler, b) for b in sampler)
    total = sum(counts.values())
    return np.array([counts[t] / total for t in range(len(sampler.task_sizes))])


# ---------------------------------------------------------------------------------------------------------
# Task frequencies
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy, temperature, target",
    [
        ("round_robin", 2.0, [1 / 3, 1 / 3, 1 / 3]),
        ("proportional", 2.0, [600 / 800, 150 / 800, 50 / 800]),
        ("temperature", 2.0, np.sqrt(SIZES) / np.sqrt(SIZES).sum()),
        ("temperature", 1.0, [600 / 800, 150 / 800, 50 / 800]),  # T = 1 is proportional
        ("temperature", 1000.0, [1 / 3, 1 / 3, 1 / 3]),  # large T approaches uniform
    ],
)
def test_task_frequencies_match_the_target(strategy, temperature, target):
    sampler = make_batch_sampler(SIZES, batch_size=4, strategy=strategy, temperature=temperature, seed=3)
    np.testing.assert_allclose(sampler.task_probabilities(), target, atol=1e-3)
    # 50 epochs = 10,050 batches: a multinomial frequency has a standard deviation below 0.005.
    np.testing.assert_allclose(frequencies(sampler, epochs=50), target, atol=0.02)


def test_temperature_one_draws_like_proportional():
    proportional = make_batch_sampler(SIZES, 4, strategy="proportional", seed=0)
    t1 = make_batch_sampler(SIZES, 4, strategy="temperature", temperature=1.0, seed=0)
    np.testing.assert_allclose(frequencies(t1, 50), frequencies(proportional, 50), atol=0.02)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("lengths", [None, "random"])
def test_one_epoch_is_sum_of_task_batches(strategy, lengths):
    lengths = None if lengths is None else np.random.default_rng(0).integers(3, 60, sum(SIZES))
    sampler = make_batch_sampler(SIZES, 4, strategy=strategy, seed=1, lengths=lengths)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sum(math.ceil(n / 4) for n in SIZES)
    assert all(1 <= len(b) <= 4 for b in batches)
    if strategy == "proportional":  # every row exactly once
        assert sorted(i for b in batches for i in b) == list(range(sum(SIZES)))
    if strategy == "round_robin":  # tasks take turns; small tasks start over, the largest is partly seen
        assert [task_of(sampler, b) for b in batches[:6]] == [0, 1, 2, 0, 1, 2]


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(0).integers(3, 60, sum(SIZES))
    grouped = make_batch_sampler(SIZES, 8, strategy="proportional", seed=1, lengths=lengths)
    plain = make_batch_sampler(SIZES, 8, strategy="proportional", seed=1)

    def padding(sampler):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in sampler)

    assert padding(grouped) < 0.5 * padding(plain)


# ---------------------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seed_and_epoch_fix_the_order(strategy):
    def order(seed, epoch):
        sampler = make_batch_sampler(SIZES, 4, strategy=strategy, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(7, 0) == order(7, 0)
    assert order(7, 1) == order(7, 1)
    assert order(7, 1) != order(7, 0)
    assert order(8, 0) != order(7, 0)
    # The generator is seeded with seed + epoch, so (seed 7, epoch 1) replays (seed 8, epoch 0).
    assert order(7, 1) == order(8, 0)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match=r"Unknown task sampling strategy 'uniform'"):
        make_batch_sampler(SIZES, 4, strategy="uniform")
    with pytest.raises(ValueError, match=r"task_sampling_temperature must be > 0"):
        make_batch_sampler(SIZES, 4, strategy="temperature", temperature=0)
    with pytest.raises(ValueError, match=r"drop_last with batch size 64 would drop every batch of a task"):
        make_batch_sampler(SIZES, 64, drop_last=True)


# ---------------------------------------------------------------------------------------------------------
# Sharding over ranks (what accelerate does to the sampler under several processes)
# ---------------------------------------------------------------------------------------------------------


def shards(sampler, num_processes: int = 2) -> list[list[list[int]]]:
    return [list(BatchSamplerShard(sampler, num_processes, rank)) for rank in range(num_processes)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sizes", [[50, 22], [600, 150, 50], [7, 3]], ids=["even", "odd", "tiny"])
def test_two_ranks_split_the_epoch(strategy, sizes):
    sampler = make_batch_sampler(sizes, 8, strategy=strategy, seed=5)
    full = list(sampler)
    rank0, rank1 = shards(sampler)
    # Same number of steps on both ranks, and as many as the loader announces (else DDP hangs).
    assert len(rank0) == len(rank1) == math.ceil(len(full) / 2)
    assert len(BatchSamplerShard(sampler, 2, 0)) == len(BatchSamplerShard(sampler, 2, 1)) == len(rank0)
    # Each global batch goes to exactly one rank, whole (short batches included), in turn.
    assert rank0 == full[0::2]
    padding = [full[0]] if len(full) % 2 else []  # an odd count: rank 1 repeats the epoch's first batch
    assert rank1 == full[1::2] + padding
    if strategy == "proportional" and len(full) % 2 == 0:
        rows0, rows1 = {i for b in rank0 for i in b}, {i for b in rank1 for i in b}
        assert not rows0 & rows1 and len(rows0 | rows1) == sum(sizes)


def test_two_ranks_drop_last():
    sampler = make_batch_sampler([40, 27], 8, strategy="proportional", seed=5, drop_last=True)
    rank0, rank1 = shards(sampler)
    assert len(rank0) == len(rank1) == len(sampler) // 2
    assert all(len(b) == 8 for b in rank0 + rank1)
    assert not {i for b in rank0 for i in b} & {i for b in rank1 for i in b}


# ---------------------------------------------------------------------------------------------------------
# Through the Trainer: set_epoch reaches the sampler behind accelerate's wrappers
# ---------------------------------------------------------------------------------------------------------


class Rank0Of2Trainer(train.MultiTaskTrainer):
    """Trains on the batches rank 0 of 2 would get: the loader is wrapped exactly as under 2 processes
    (DataLoaderShard over BatchSamplerShard over the task sampler), without a second process."""

    def get_train_dataloader(self):
        accelerator = self.accelerator

        def prepare_as_rank0(loader):
            return prepare_data_loader(loader, accelerator.device, num_processes=2, process_index=0, put_on_device=True)

        accelerator.prepare = prepare_as_rank0  # the instance attribute shadows the method for this call
        try:
            return super().get_train_dataloader()
        finally:
            del accelerator.prepare


def sampler_epochs(caplog) -> list[int]:
    return [int(m[1]) for r in caplog.records if (m := re.search(r"Task sampler: \w+, epoch (\d+)", r.getMessage()))]


def test_set_epoch_reaches_the_sharded_sampler_also_on_resume(
    monkeypatch, caplog, tmp_path, tiny_encoder_dir, tiny_data_dir
):
    caplog.set_level(logging.INFO, logger="sampler")
    # 64 rows per task, batch 8: 16 global batches per epoch, 8 per rank. Checkpoint at step 12 = mid epoch 1.
    flags = ["--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "12"]
    flags += ["--task_sampling", "proportional"]
    args = tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "a", *flags)
    first, _ = run_main(monkeypatch, args, Rank0Of2Trainer)
    assert isinstance(first.batch_sampler, MultiTaskBatchSampler)
    assert first.state.global_step == 16
    assert sampler_epochs(caplog) == [0, 1]

    caplog.clear()
    resume = ["--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-12")]
    args = tiny_argv(tiny_encoder_dir, tiny_data_dir, tmp_path / "b", *flags, *resume)
    resumed, _ = run_main(monkeypatch, args, Rank0Of2Trainer)
    # The loader is now SkipBatchSampler(BatchSamplerShard(sampler)); the epoch must still be 1, not 0.
    assert sampler_epochs(caplog) == [1]
    # ... so steps 13-16 see the same batches as the uninterrupted run and end on the same weights.
    final_first = dict(first.accelerator.unwrap_model(first.model).named_parameters())
    for name, p in resumed.accelerator.unwrap_model(resumed.model).named_parameters():
        assert torch.equal(p, final_first[name]), name


# ---------------------------------------------------------------------------------------------------------
# Small cases
# ---------------------------------------------------------------------------------------------------------


def test_sampler_epoch_covers_each_example_once_proportional():
    sampler = make_batch_sampler([10, 25], batch_size=4, strategy="proportional", seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 7
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(35))
    for batch in batches:  # every batch holds one task only
        assert all(i < 10 for i in batch) or all(i >= 10 for i in batch)


def test_round_robin_alternates_tasks():
    sampler = make_batch_sampler([8, 40], batch_size=4, strategy="round_robin", seed=0)
    tasks = [0 if b[0] < 8 else 1 for b in sampler]
    assert tasks[:6] == [0, 1, 0, 1, 0, 1]
    assert len(tasks) == 2 + 10


def test_sampler_is_seeded_by_epoch():
    sampler = make_batch_sampler([50, 50], batch_size=5, strategy="temperature", seed=3)
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_length_grouping_reduces_padding():
    lengths = [1 + (i * 37) % 60 for i in range(640)]
    plain = make_batch_sampler([640], batch_size=32, seed=0)
    grouped = make_batch_sampler([640], batch_size=32, seed=0, lengths=lengths)

    def padding(sampler):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in sampler)

    assert sorted(i for b in grouped for i in b) == list(range(640))
    assert padding(grouped) < 0.2 * padding(plain)
