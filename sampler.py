"""The multi-task batch samplers: which task each training batch comes from, one small class per strategy.

`make_batch_sampler(task_sizes, batch_size, strategy, ...)` maps `--task_sampling` to `RoundRobinBatchSampler`,
`ProportionalBatchSampler` or `TemperatureBatchSampler`. Each yields single-task batches of indices into the
concatenated train set (rows grouped by task, see data.build_data) and reseeds with `seed + epoch`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"task_sampling_temperature must be > 0, got {temperature}.")


class MultiTaskBatchSampler(Sampler[list[int]]):
    """Yields single-task batches of indices into the concatenated train set, interleaving tasks.

    One epoch is `sum_t ceil(n_t / batch_size)` batches whatever the strategy (every example once, on
    average); the strategy, one subclass each, only decides which task each batch comes from:
    - `round_robin`: tasks take turns; a task that runs out restarts on a fresh permutation, so small tasks
      are revisited and large ones are partly seen within one epoch.
    - `proportional`: each task's batches exactly once, in a shuffled order (p_t proportional to n_t).
    - `temperature`: each batch's task drawn with p_t proportional to n_t ** (1 / T); T = 1 is proportional,
      large T approaches uniform.
    Within a task, `group_by_length` batches rows of similar length (shuffled mega-batches of 50 batches,
    sorted by length, split, then the batches shuffled), which cuts padding.

    Randomness comes from a generator seeded with `seed + epoch`: every process builds the same global list,
    and accelerate's `BatchSamplerShard` deals its batches to the ranks; resuming at a step replays it exactly.

    `batch_size` is deliberately `None` (the size is `rows_per_batch`): `BatchSamplerShard` reads
    `.batch_size` and, when it is set, expects every batch but the very last to be full. Each task's last
    batch is short, so it would silently drop the pair of batches around every short one and give the ranks
    different step counts (a DDP hang). With `None` it deals every batch in turn, then pads the ranks to equal
    counts by repeating the first batches of the epoch.
    """

    batch_size = None
    strategy = ""

    def __init__(
        self,
        task_sizes: Sequence[int],
        batch_size: int,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        drop_last: bool = False,
    ):
        if any(n <= 0 for n in task_sizes):
            raise ValueError(f"Every task needs training rows; sizes per task are {list(task_sizes)}.")
        if drop_last and min(task_sizes) < batch_size:
            raise ValueError(
                f"drop_last with batch size {batch_size} would drop every batch of a task with fewer rows "
                f"(rows per task: {list(task_sizes)}); lower the batch size or set dataloader_drop_last false."
            )
        self.task_sizes = list(task_sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.task_sizes)[:-1]]).astype(int).tolist()
        self.rows_per_batch = batch_size
        self.seed = seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches_per_task(self) -> list[int]:
        if self.drop_last:
            return [n // self.rows_per_batch for n in self.task_sizes]
        return [math.ceil(n / self.rows_per_batch) for n in self.task_sizes]

    def __len__(self) -> int:
        return sum(self.batches_per_task())

    def task_probabilities(self) -> np.ndarray:
        """The share of the epoch's batches each task is expected to get."""
        raise NotImplementedError

    def task_schedule(self, generator: torch.Generator) -> list[int]:
        """The task of each batch of the epoch, in order."""
        raise NotImplementedError

    def _task_batches(self, task: int, generator: torch.Generator) -> list[list[int]]:
        n, offset, bs = self.task_sizes[task], self.offsets[task], self.rows_per_batch
        perm = torch.randperm(n, generator=generator).numpy() + offset
        if self.lengths is not None:
            mega = bs * 50
            chunks = [perm[i : i + mega] for i in range(0, n, mega)]
            perm = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [perm[i : i + bs].tolist() for i in range(0, n, bs)]
        if self.drop_last and len(batches[-1]) < bs:
            batches.pop()
        if self.lengths is not None:
            order = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in order]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        logger.info(
            "Task sampler: %s, epoch %d (seed %d), %d batches",
            self.strategy,
            self.epoch,
            self.seed + self.epoch,
            len(self),
        )
        streams: list[list[list[int]]] = [[] for _ in self.task_sizes]
        for task in self.task_schedule(generator):
            if not streams[task]:
                streams[task] = self._task_batches(task, generator)[::-1]  # pop() from the end = in order
            yield streams[task].pop()


class RoundRobinBatchSampler(MultiTaskBatchSampler):
    """Tasks take turns, one batch each."""

    strategy = "round_robin"

    def task_probabilities(self) -> np.ndarray:
        return np.full(len(self.task_sizes), 1.0 / len(self.task_sizes))

    def task_schedule(self, generator: torch.Generator) -> list[int]:
        counts = self.batches_per_task()
        return [step % len(counts) for step in range(sum(counts))]


class ProportionalBatchSampler(MultiTaskBatchSampler):
    """Each task's batches exactly once per epoch, in a shuffled order."""

    strategy = "proportional"

    def task_probabilities(self) -> np.ndarray:
        sizes = np.asarray(self.task_sizes, dtype=float)
        return sizes / sizes.sum()

    def task_schedule(self, generator: torch.Generator) -> list[int]:
        counts = self.batches_per_task()
        schedule = torch.tensor([t for t, c in enumerate(counts) for _ in range(c)])
        return schedule[torch.randperm(sum(counts), generator=generator)].tolist()


class TemperatureBatchSampler(MultiTaskBatchSampler):
    """Each batch's task drawn with p_t proportional to n_t ** (1 / T)."""

    strategy = "temperature"

    def __init__(self, task_sizes: Sequence[int], batch_size: int, temperature: float = 2.0, **kwargs):
        check_temperature(temperature)
        super().__init__(task_sizes, batch_size, **kwargs)
        self.temperature = temperature

    def task_probabilities(self) -> np.ndarray:
        weights = np.asarray(self.task_sizes, dtype=float) ** (1.0 / self.temperature)
        return weights / weights.sum()

    def task_schedule(self, generator: torch.Generator) -> list[int]:
        probs = torch.as_tensor(self.task_probabilities(), dtype=torch.float64)
        return torch.multinomial(probs, len(self), replacement=True, generator=generator).tolist()


BATCH_SAMPLERS: dict[str, type[MultiTaskBatchSampler]] = {
    cls.strategy: cls for cls in (RoundRobinBatchSampler, ProportionalBatchSampler, TemperatureBatchSampler)
}


def make_batch_sampler(
    task_sizes: Sequence[int],
    batch_size: int,
    strategy: str = "round_robin",
    temperature: float = 2.0,
    **kwargs,
) -> MultiTaskBatchSampler:
    """The sampler class named by `--task_sampling`; `temperature` is read by the temperature strategy only."""
    if strategy not in BATCH_SAMPLERS:
        raise ValueError(f"Unknown task sampling strategy {strategy!r}; choose from {list(BATCH_SAMPLERS)}.")
    if strategy == "temperature":
        kwargs["temperature"] = temperature
    return BATCH_SAMPLERS[strategy](task_sizes, batch_size, **kwargs)
