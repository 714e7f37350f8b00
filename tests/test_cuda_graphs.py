"""`--cuda_graphs`: one recorded forward + backward per batch shape (cuda_graphs.py).

On a machine without CUDA the recorder runs emulated (the same bookkeeping; a replay runs the step eagerly and
copies its results into the recorded tensors), which checks everything but the CUDA graph itself: the static
inputs, the gradients re-attached after each replay, one step per batch, warm-up counts and the graph limit. The
tests marked `cuda` run the real recordings and are skipped without a GPU; they ran on an H100 (bench/RESULTS.md).
"""

from __future__ import annotations

import ast
import logging

import pytest
import torch

import cuda_graphs
import train
from test_train import tiny_run_args

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="records real CUDA graphs: needs a GPU")


def batches(device="cpu", steps=10):
    """Two batch shapes, interleaved irregularly, with both tasks in each batch."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        length = 8 if step % 3 else 16
        ids = torch.randint(5, 60, (6, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[:, length - 3 :] = 0  # some padding in every row
        out.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
                "labels": torch.randint(0, 2, (6,), generator=generator).to(device),
                "task_ids": torch.tensor([0, 1, 0, 1, 0, 0]).to(device),
            }
        )
    return out


def runner_for(model, **kwargs) -> tuple[cuda_graphs.TrainStepGraphs, list[torch.nn.Parameter]]:
    """A TrainStepGraphs over the model's forward + backward, and the trainable parameters it fills."""
    params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward(batch):
        outputs = model(**batch)
        outputs.loss.backward()
        return outputs

    return cuda_graphs.TrainStepGraphs(forward_backward, params, **kwargs), params


def train_steps(model, data, graphs: bool, emulate: bool = True, **kwargs):
    """Forward, backward, clip, AdamW, zero_grad per batch, as the Trainer steps; returns the losses and the runner."""
    model.train()
    runner, params = runner_for(model, emulate=emulate, **kwargs)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for batch in data:
        # No output is kept across steps, as in the Trainer (a kept one holds the autograd graph alive).
        losses.append((runner(batch) if graphs else runner.step(batch)).loss.item())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, runner if graphs else None


def test_recorded_steps_train_exactly_like_eager_ones(make_model):
    data = batches()
    eager_model, graph_model = make_model(), make_model()
    torch.manual_seed(3)  # dropout is on: both runs must draw the same masks
    eager, _ = train_steps(eager_model, data, graphs=False)
    torch.manual_seed(3)
    recorded, runner = train_steps(graph_model, data, graphs=True)

    # 10 steps, two shapes: 2 eager warm-up steps each, then one recording each, and every later step replays.
    assert runner.summary() == {"graphs": 2, "replays": 6, "eager_steps": 4}
    assert recorded == pytest.approx(eager, rel=1e-5)
    assert len(set(recorded)) == len(recorded)  # the replays return each step's own loss, not a stale one
    for (name, a), (_, b) in zip(eager_model.named_parameters(), graph_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_gradients_reach_the_optimizer_after_every_replay(make_model):
    """A replay writes the recorded gradient tensors; without re-attaching them the optimizer would see None."""
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed_per_step = []
    data = [batches()[1]] * 5  # one shape: 2 eager steps, a recording, 2 more replays
    runner, params = runner_for(model, emulate=True)
    optimizer = torch.optim.SGD(params, lr=0.1)
    for batch in data:
        runner(batch)
        assert all(p.grad is not None for p in params)
        previous = [p.detach().clone() for p in params]
        optimizer.step()
        changed_per_step.append(sum(not torch.equal(a, p) for a, p in zip(previous, params)))
        optimizer.zero_grad(set_to_none=True)
    assert runner.summary()["replays"] == 3
    assert min(changed_per_step) > len(params) // 2
    assert not torch.equal(before["heads.sentiment.weight"], model.heads.sentiment.weight)


def test_graph_limit_and_warmup(make_model):
    data = batches(steps=9)
    _, runner = train_steps(make_model(), data, graphs=True, warmup=1, max_graphs=1)
    # Shape 8 (steps 1, 2, 4, 5, 7, 8) is the first seen twice: recorded at step 2, replayed from then on.
    # Shape 16 (steps 0, 3, 6) finds the one graph taken and stays eager.
    assert runner.summary() == {"graphs": 1, "replays": 5, "eager_steps": 4}
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        cuda_graphs.TrainStepGraphs(lambda b: None, [], warmup=0, emulate=True)


def test_recording_refuses_leftover_gradients(make_model):
    model = make_model()
    runner, _ = runner_for(model, warmup=1, emulate=True)
    batch = batches()[1]
    runner(batch)  # eager warm-up; its gradients are not cleared before the next step
    with pytest.raises(RuntimeError, match=r"parameters still hold a gradient .* zero_grad\(set_to_none=True\)"):
        runner(batch)


def test_trainer_with_cuda_graphs_logs_the_same_run(tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch):
    """train.py end to end: --cuda_graphs changes how steps execute, not the losses, metrics or weights."""
    monkeypatch.setattr(train.MultiTaskTrainer, "emulate_cuda_graphs", True)
    recorded = []
    original = cuda_graphs.TrainStepGraphs.__call__
    monkeypatch.setattr(
        cuda_graphs.TrainStepGraphs, "__call__", lambda self, inputs: recorded.append(self) or original(self, inputs)
    )
    common = ["--pad_to_buckets", "16", "32", "--num_train_epochs", "1", "--gold_eval", "false"]
    plain = train.main(tiny_run_args(tiny_encoder_dir, tiny_data_dir, tmp_path / "plain", *common))
    graphs = train.main(tiny_run_args(tiny_encoder_dir, tiny_data_dir, tmp_path / "graphs", *common,
                                      "--cuda_graphs", "true"))  # fmt: skip
    runner = recorded[-1]
    assert runner.summary()["replays"] > 0 and runner.summary()["graphs"] >= 2
    assert flatten(graphs["epochs"]).keys() == flatten(plain["epochs"]).keys()
    numbers = {**flatten(plain["epochs"], "epochs"), **flatten(plain["final"], "final")}
    assert len(numbers) > 20
    got = {**flatten(graphs["epochs"], "epochs"), **flatten(graphs["final"], "final")}
    for key, value in numbers.items():  # per-task training loss and accuracy per epoch, final eval metrics
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def flatten(tree, prefix="") -> dict[str, float]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}.{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in flatten(value, f"{prefix}[{i}]").items()}
    return {prefix: float(tree)} if isinstance(tree, (int, float)) else {}


def test_trainer_with_cuda_graphs_freezing_learned_weights_and_resume(
    tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch, caplog
):
    """Frozen layers stay out of the recording, the learned loss weights train in it, and a run resumed from a
    checkpoint (its recordings start afresh) ends on the same weights as the uninterrupted run and the plain one."""
    from safetensors.torch import load_file

    monkeypatch.setattr(train.MultiTaskTrainer, "emulate_cuda_graphs", True)
    flags = ["--pad_to_buckets", "16", "32", "--max_steps", "12", "--eval_strategy", "no", "--gold_eval", "false",
             "--freeze", "layers:0-0", "--loss_weighting", "uncertainty", "--loss_weights_learning_rate", "1e-2",
             "--save_strategy", "steps", "--save_steps", "6"]  # fmt: skip
    runs = {
        "plain": flags,
        "graphs": [*flags, "--cuda_graphs", "true"],
        "resumed": [*flags, "--cuda_graphs", "true", "--resume_from_checkpoint", str(tmp_path / "graphs/checkpoint-6")],
    }
    weights, replays = {}, {}
    for name, extra in runs.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="train"):
            train.main(tiny_run_args(tiny_encoder_dir, tiny_data_dir, tmp_path / name, *extra))
        weights[name] = load_file(tmp_path / name / "model.safetensors")
        summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--cuda_graphs: ")]
        replays[name] = ast.literal_eval(summary[0].split(": ", 1)[1])["replays"] if summary else None
    assert replays["plain"] is None and replays["graphs"] > 0 and replays["resumed"] > 0
    start = load_file(tmp_path / "graphs" / "checkpoint-6" / "model.safetensors")
    for key, value in weights["plain"].items():
        torch.testing.assert_close(weights["graphs"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(weights["resumed"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    frozen = [k for k in start if "encoder.layer.0." in k]
    assert frozen and all(torch.equal(weights["graphs"][k], start[k]) for k in frozen)
    assert not torch.equal(weights["graphs"]["loss_log_vars"], start["loss_log_vars"])  # trained after step 6


# ---- real CUDA graphs (skipped without a GPU) ----


@cuda
def test_cuda_recorded_steps_match_eager_steps(make_model):
    # No dropout: a recording draws its random numbers differently from eager steps.
    data = batches("cuda", steps=12)
    eager_model = make_model(classifier_dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    graph_model = make_model(classifier_dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    eager, _ = train_steps(eager_model.cuda(), data, graphs=False)
    recorded, runner = train_steps(graph_model.cuda(), data, graphs=True, emulate=False)
    assert runner.summary() == {"graphs": 2, "replays": 8, "eager_steps": 4}
    assert recorded == pytest.approx(eager, rel=1e-3)
    for (name, a), (_, b) in zip(eager_model.named_parameters(), graph_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


@cuda
def test_cuda_replays_draw_new_dropout_masks(make_model):
    model = make_model(classifier_dropout=0.5).cuda()
    batch = batches("cuda")[1]
    runner, _ = runner_for(model, warmup=1, emulate=False)
    model.train()
    losses = []
    for _ in range(5):  # the weights never change (no optimizer): only dropout moves the loss
        losses.append(runner(batch).loss.item())
        model.zero_grad(set_to_none=True)
    assert runner.summary()["replays"] == 4
    assert len(set(losses[1:])) == 4
