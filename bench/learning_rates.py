"""A train.py run with learning rates per parameter group: layer-wise decay over the encoder and a rate of the heads'
own, the two learning-rate knobs that train.py does not offer (on the quick config neither moved SST-2 beyond seed
noise: bench/RESULTS.md, "The quick config's optimisation knobs").

Layer-wise decay `d`: the top encoder layer trains at `--learning_rate`, layer i of n at `lr * d**(n - 1 - i)`,
every other encoder weight (the embeddings) at `lr * d**n`. `--head_learning_rate` sets the heads' rate. Each of
the Trainer's parameter groups (with and without weight decay) is split by rate, so the schedule scales every
rate alike. The run's output folder is train.py's; its metrics.json recipe and card name both settings, and the
script prints the headline figure of every eval set.

    python bench/learning_rates.py configs/quick.yaml --data_dir ../shared/data --output_dir runs/llrd \
        --layerwise_lr_decay 0.8

Everything except this script's own flags (`--layerwise_lr_decay`, `--head_learning_rate`) goes to train.py.
"""

from __future__ import annotations

import argparse
import math
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import headlines, markdown_table, replaced, report, setting


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--layerwise_lr_decay", type=float, default=1.0, help="Factor per encoder layer down from the top, in (0, 1]."
    )
    parser.add_argument("--head_learning_rate", type=float, help="Learning rate of the task heads.")
    args, train_argv = parser.parse_known_args(argv)
    if not (math.isfinite(args.layerwise_lr_decay) and 0 < args.layerwise_lr_decay <= 1):
        parser.error(f"--layerwise_lr_decay {args.layerwise_lr_decay} must be in (0, 1] (1: no decay).")
    if args.head_learning_rate is not None and not (
        math.isfinite(args.head_learning_rate) and args.head_learning_rate > 0
    ):
        parser.error(f"--head_learning_rate {args.head_learning_rate} must be a positive number.")
    if args.layerwise_lr_decay == 1.0 and args.head_learning_rate is None:
        parser.error("nothing to change: give --layerwise_lr_decay below 1 or --head_learning_rate.")
    return args, train_argv


def learning_rate_scales(model, layerwise_decay: float, head_lr: float | None, lr: float) -> dict[int, float]:
    """id(parameter) -> factor on the learning rate, for the parameters that do not train at `lr`."""
    from freezing import encoder_layers

    scales: dict[int, float] = {}
    if layerwise_decay != 1.0:
        layers = encoder_layers(model)
        depth = len(layers)
        for p in model.encoder.parameters():
            scales[id(p)] = layerwise_decay**depth
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                scales[id(p)] = layerwise_decay ** (depth - 1 - i)
    if head_lr is not None:
        for p in model.heads.parameters():
            scales[id(p)] = head_lr / lr
    return {k: v for k, v in scales.items() if v != 1.0}


def split_param_groups(optimizer: torch.optim.Optimizer, scales: dict[int, float]) -> None:
    """Split each parameter group of a fresh optimizer into one group per factor in `scales` (parameters not in it
    keep the group's rate); every other setting of the group (weight decay) is kept. The groups at the base rate
    come first: the Trainer logs the first group's rate."""
    groups = optimizer.param_groups
    optimizer.param_groups = []
    for group in groups:
        by_scale: dict[float, list] = {}
        for p in group["params"]:
            by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
        for scale, params in sorted(by_scale.items(), key=lambda item: (item[0] != 1.0, -item[0])):
            optimizer.add_param_group({**group, "params": params, "lr": group["lr"] * scale})


def main(argv: list[str] | None = None) -> dict:
    args, train_argv = parse_args(argv)
    import train

    info = setting("cuda" if torch.cuda.is_available() else "cpu")  # the load average before the run
    built = {}
    build_trainer, run_metrics = train.build_trainer, train.run_metrics

    def build_trainer_with_rates(model, *rest, **kwargs):
        trainer = build_trainer(model, *rest, **kwargs)
        create_optimizer = trainer.create_optimizer

        def create_optimizer_with_rates(*call_args, **call_kwargs):
            fresh = trainer.optimizer is None
            optimizer = create_optimizer(*call_args, **call_kwargs)
            if fresh:
                opt_model = (call_args[0] if call_args else call_kwargs.get("model")) or trainer.model
                lr = trainer.args.learning_rate
                split_param_groups(
                    optimizer, learning_rate_scales(opt_model, args.layerwise_lr_decay, args.head_learning_rate, lr)
                )
            return optimizer

        trainer.create_optimizer = create_optimizer_with_rates
        built["trainer"] = trainer
        return trainer

    def run_metrics_with_rates(*metric_args, **kwargs):
        metrics = run_metrics(*metric_args, **kwargs)
        metrics["recipe"]["layerwise_lr_decay"] = args.layerwise_lr_decay
        metrics["recipe"]["head_learning_rate"] = args.head_learning_rate
        return metrics

    with replaced(train, build_trainer=build_trainer_with_rates, run_metrics=run_metrics_with_rates):
        metrics = train.main(train_argv)
    trainer = built["trainer"]
    scores = headlines(metrics["final"], trainer.eval_tasks)
    rates = f"layer-wise decay {args.layerwise_lr_decay:g}, head rate {args.head_learning_rate or 'as the encoder'}"
    table = markdown_table(["learning rates", *scores], [[rates, *(f"{v:.4f}" for v in scores.values())]])
    result = {"setting": info, "scores": scores, "recipe": metrics["recipe"]}
    report("Learning rates per parameter group", table, result, None, [f"steps: {trainer.state.global_step}"])
    return {**result, "trainer": trainer}


if __name__ == "__main__":
    from run_folder import run_cli

    sys.exit(run_cli(main))
