"""Weight averaging within one training run: exponential moving averages (EMA) of the weights at a few decays, and
uniform averages over the last part of training (tail averages, as stochastic weight averaging takes them), each
against the run's own final weights, on every evaluation set.

One `train.py` run gives every row, so the rows differ only in how its weights are averaged: a paired comparison,
free of the seed-to-seed spread that separate runs would add. The averages are
`torch.optim.swa_utils.AveragedModel` copies of the model, updated after every optimizer step; each in turn is
copied into the model and scored by the trainer's own evaluation. The run's output folder holds the final weights,
as train.py writes them; the averages are not saved.

    python bench/weight_averaging.py configs/quick.yaml --data_dir ../shared/data --output_dir runs/averaging --seed 42

Everything except this script's own flags (`--decays 0.99,0.995`, `--tails 0.5`, `--out`, `--note`) goes to
train.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import headlines, markdown_table, replaced, report, setting
from transformers import TrainerCallback

logger = logging.getLogger("bench.weight_averaging")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decays", default="0.99,0.995,0.998", help="EMA decays, comma-separated, each in (0, 1).")
    parser.add_argument(
        "--tails",
        default="0.5,0.25",
        help="Uniform averages of the last share of the steps, comma-separated, each in (0, 1]: 0.5 averages the "
        "second half.",
    )
    parser.add_argument("--out", help="Append the markdown report to this file (bench/RESULTS.md).")
    parser.add_argument("--note", default="", help="Written beside the results (e.g. 'loaded machine').")
    args, train_argv = parser.parse_known_args(argv)
    args.decays = numbers(parser, "--decays", args.decays, lambda x: 0 < x < 1, "(0, 1), e.g. 0.995")
    args.tails = numbers(parser, "--tails", args.tails, lambda x: 0 < x <= 1, "(0, 1], e.g. 0.5 for the second half")
    if not args.decays and not args.tails:
        parser.error("nothing to compare: give --decays or --tails.")
    return args, train_argv


def numbers(parser, flag: str, text: str, valid, where: str) -> list[float]:
    values = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            value = None
        if value is None or not valid(value):
            parser.error(f"{flag} {text}: {item!r} must be a number in {where}.")
        values.append(value)
    return values


class Averages(TrainerCallback):
    """name -> AveragedModel, updated after every optimizer step: an EMA from the first step on, a tail average
    from the step that opens its last share of `state.max_steps`."""

    def __init__(self, model: torch.nn.Module, decays: list[float], tails: list[float]):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.model = model
        self.first_share = {}
        self.averages = {}
        for decay in decays:
            self.averages[f"EMA, decay {decay:g}"] = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
            self.first_share[f"EMA, decay {decay:g}"] = 0.0
        for tail in tails:
            name = f"uniform, last {tail:.0%} of steps"
            self.averages[name] = AveragedModel(model)
            self.first_share[name] = 1.0 - tail

    def on_step_end(self, args, state, control, **kwargs):
        for name, average in self.averages.items():
            if state.global_step > self.first_share[name] * state.max_steps:
                average.update_parameters(self.model)

    @torch.no_grad()
    def load_into_model(self, name: str) -> None:
        for target, source in zip(self.model.parameters(), self.averages[name].module.parameters()):
            target.copy_(source)


def main(argv: list[str] | None = None) -> dict:
    args, train_argv = parse_args(argv)
    import train
    from outputs import split_eval_metrics

    info = setting("cuda" if torch.cuda.is_available() else "cpu")  # the load average before the run

    built = {}
    build_trainer = train.build_trainer

    def build_trainer_with_averages(model, *rest, **kwargs):
        trainer = build_trainer(model, *rest, **kwargs)
        built["averages"] = Averages(model, args.decays, args.tails)
        trainer.add_callback(built["averages"])
        built["trainer"] = trainer
        return trainer

    with replaced(train, build_trainer=build_trainer_with_averages):
        metrics = train.main(train_argv)
    trainer, averages = built["trainer"], built["averages"]
    eval_names = list(metrics["final"])
    rows = {"final weights (as saved)": headlines(metrics["final"], trainer.eval_tasks)}
    for name in averages.averages:
        logger.info("evaluating %s", name)
        averages.load_into_model(name)
        rows[name] = headlines(split_eval_metrics(trainer.evaluate(), eval_names), trainer.eval_tasks)
    table = markdown_table(
        ["weights", *eval_names], [[name, *(f"{scores[s]:.4f}" for s in eval_names)] for name, scores in rows.items()]
    )
    result = {"setting": info, "rows": rows}
    notes = [f"steps: {trainer.state.global_step}", args.note]
    report("Weight averaging within one run", table, result, args.out, notes)
    return result


if __name__ == "__main__":
    from run_folder import run_cli

    sys.exit(run_cli(main))
