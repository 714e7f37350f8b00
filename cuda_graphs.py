"""One CUDA graph per batch shape for the training step's forward and backward (`--cuda_graphs true`).

At batch size 32 a small encoder keeps an H100 busy for 2-5 ms per step, while the host spends 20-30 ms
launching its few hundred kernels one by one (bench/RESULTS.md). With this, MiniLM steps in 4.8 ms on an H100:
4.2-4.5x the stock Trainer (measured in bench/RESULTS.md). A CUDA graph records those launches once and
replays them with one call. `torch.compile(mode="reduce-overhead")` records the forward and the backward as
separate graphs and keeps the Trainer's Python around them; this records forward + backward as one graph and
leaves the rest of the step (clipping, the optimizer, logging) to the Trainer as usual.

How a step runs, per batch shape (the padded lengths of `--pad_to_buckets` make a few shapes):
  - the first `warmup` steps of that shape run eagerly, on a side stream (lazy initialisation must not happen
    during a recording);
  - the next one records: the batch is copied into static input tensors, the forward and backward are captured
    (nothing runs), and the recording is replayed once, so that step trains like any other;
  - every later step copies its batch into the static inputs and replays. A replay writes the outputs and the
    gradients into the same memory each time; the gradients are attached to the parameters again after each
    replay (the Trainer's `zero_grad` detaches them), and the outputs are valid until the next replay.

Every batch is trained on exactly once and in order: recording changes how a step is executed, not which steps
run. Graphs of all shapes share one memory pool; at most `max_graphs` shapes are recorded, later new shapes run
eagerly. `emulate=True` (for tests on machines without CUDA) keeps the same bookkeeping and replays by running
the step eagerly and copying its results into the recorded tensors.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree  # transformers registers ModelOutput with it

logger = logging.getLogger(__name__)


@dataclass
class _Recording:
    graph: object  # torch.cuda.CUDAGraph, or None when emulated
    inputs: dict[str, torch.Tensor]  # static inputs: each batch is copied in
    outputs: object  # what the step returned during the recording, rewritten by each replay
    grads: list[torch.Tensor | None]  # per parameter, rewritten by each replay
    replays: int = 0


class TrainStepGraphs:
    """Runs `step(inputs)` (forward + backward, returns the model output) eagerly or as a recorded CUDA graph.

    `params`: the trainable parameters, whose `.grad` the step fills. `warmup`: eager steps per shape before it is
    recorded. `max_graphs`: shapes recorded at most. The caller must set every `.grad` to None between steps
    (the Trainer's `zero_grad` does), as a recording must start without gradients to accumulate into.
    """

    def __init__(
        self,
        step: Callable[[dict[str, torch.Tensor]], object],
        params: list[torch.nn.Parameter],
        warmup: int = 2,
        max_graphs: int = 16,
        emulate: bool = False,
    ):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step per shape before recording, got {warmup}.")
        self.step, self.params, self.warmup, self.max_graphs, self.emulate = step, params, warmup, max_graphs, emulate
        self.recordings: dict[tuple, _Recording] = {}
        self.seen: Counter = Counter()
        self.eager_steps = 0
        self._pool = None if emulate else torch.cuda.graph_pool_handle()
        self._side_stream = None if emulate else torch.cuda.Stream()

    @staticmethod
    def shape_key(inputs: dict[str, torch.Tensor]) -> tuple:
        return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()) if torch.is_tensor(t))

    def __call__(self, inputs: dict[str, torch.Tensor]):
        key = self.shape_key(inputs)
        recording = self.recordings.get(key)
        if recording is None:
            self.seen[key] += 1
            if len(self.recordings) >= self.max_graphs:
                return self._eager(inputs, before_recording=False)
            if self.seen[key] <= self.warmup:
                return self._eager(inputs, before_recording=True)
            recording = self.recordings[key] = self._record(key, inputs)
            shapes = {name: shape for name, shape, _ in key}
            logger.info("CUDA graph %d recorded, for batch shape %s", len(self.recordings), shapes)
        for name, static in recording.inputs.items():
            static.copy_(inputs[name], non_blocking=True)
        self._replay(recording)
        for param, grad in zip(self.params, recording.grads):
            param.grad = grad
        recording.replays += 1
        return recording.outputs

    # ---- eager steps ----
    def _eager(self, inputs, before_recording: bool):
        self.eager_steps += 1
        if self.emulate or not before_recording:
            return self.step(inputs)
        # On a side stream, as torch.cuda.graphs' docs ask of warm-up iterations; then wait for it, so no memory
        # the step freed on that stream is reused while the default stream may still read it.
        self._side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side_stream):
            outputs = self.step(inputs)
        torch.cuda.synchronize()
        return outputs

    # ---- recording and replay ----
    def _record(self, key, inputs) -> _Recording:
        stale = [i for i, p in enumerate(self.params) if p.grad is not None]
        if stale:
            raise RuntimeError(
                f"cuda_graphs: {len(stale)} parameters still hold a gradient when the step for shape {key} is "
                f"recorded; the recording would accumulate into it on every replay. Call zero_grad(set_to_none=True) "
                f"between steps, and use gradient_accumulation_steps=1."
            )
        static = {name: t.clone() for name, t in inputs.items() if torch.is_tensor(t)}
        if self.emulate:
            # Recording runs nothing: run the step once for tensors of the right shapes, without using up random
            # numbers, and keep only those tensors.
            with torch.random.fork_rng(devices=[]):
                outputs = self.step(static)
            graph = None
        else:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the data loader's pinning thread may allocate while this thread records.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = self.step(static)
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        # Detached views of the same memory: the recorded autograd graph is freed (holding it would keep the
        # recording's AccumulateGrad nodes, bound to the recording stream, alive for the eager steps of other shapes).
        return _Recording(graph, static, pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, outputs), grads)

    def _replay(self, recording: _Recording) -> None:
        if not self.emulate:
            recording.graph.replay()
            return
        for p in self.params:
            p.grad = None
        fresh = self.step(recording.inputs)
        for old, new in zip(pytree.tree_leaves(recording.outputs), pytree.tree_leaves(fresh), strict=True):
            old.copy_(new.detach())
        for p, grad in zip(self.params, recording.grads):
            if grad is not None:
                grad.copy_(p.grad if p.grad is not None else torch.zeros_like(grad))
            p.grad = None  # a replay writes the recorded tensors and leaves .grad alone

    def summary(self) -> dict[str, int]:
        return {
            "graphs": len(self.recordings),
            "replays": sum(r.replays for r in self.recordings.values()),
            "eager_steps": self.eager_steps,
        }
