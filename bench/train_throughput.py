"""Training throughput: the stock single-task Trainer against our MultiTaskTrainer, measured in one run.

Runs (`--runs`, in the order given; the first `stock` run is the reference of the ratio column):
  stock     AutoModelForSequenceClassification + transformers.Trainer + DataCollatorWithPadding: random batches
            padded to their longest row, as run_glue.py does it.
  ours      MultiTaskTrainer on the sentiment task alone: length-grouped batches, our collator, no per-step
            device->host sync.
  two_task  MultiTaskTrainer on sentiment + question (round robin), the recipe of configs/quick.yaml.
  bare      our model, sampler and collator in a plain PyTorch loop (forward, backward, clip, fused AdamW, linear
            schedule): no Trainer. `ours` minus `bare` is what the Trainer loop costs per step.
A run can carry modifiers joined by '+': bf16, tf32, compile (torch.compile, mode --compile_mode), nogroup (no
length grouping), pad<N> (pad lengths to a multiple of N), buckets (pad each batch to the smallest of
--pad_buckets that holds it; our collator only), workers<N> (dataloader workers), graphs (--cuda_graphs:
forward + backward recorded as one CUDA graph per batch shape; with compile, torch.compile runs in mode default;
emulated on a CPU, for dry runs). --bf16, --tf32 and
--torch_compile apply to every run, the stock one included.

The "shapes" column counts the distinct batch shapes a run met, and in brackets how many of them it met first
during the timed steps: with CUDA graphs each new shape is a recording (tens of milliseconds or more) that lands
in the timed window, so a fair compiled figure has 0 there (raise --warmup_steps, or use fewer shapes).

Everything else is equal: encoder, batch size, the SST-2 rows (their token ids are checked to be identical),
optimiser (fused AdamW), learning rate, `--warmup_steps` untimed steps then `--steps` timed optimiser steps.
The clock runs from the end of the last warm-up step to the end of the last step (data loading included), with
the device synchronised at both ends.

    python bench/train_throughput.py --steps 30 --warmup_steps 5 --out bench/RESULTS.md
    python bench/train_throughput.py --device cuda --runs stock ours ours+bf16+compile two_task --steps 300

`--overhead_probe` swaps the encoder for a random one of the same structure (same layers, same operators per
step) but 8 wide with one attention head: the arithmetic all but vanishes and each step costs its host work,
Python and operator dispatch. That is the regime of a GPU at batch size 32 (launch-bound), measurable on a CPU.
Its accuracy means nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import PeakMemory, free_memory, markdown_table, now, report, resolve_device, resolve_encoder, setting
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

logger = logging.getLogger("bench")
BASES = ("stock", "ours", "two_task", "bare")


@dataclass
class RunSpec:
    name: str
    base: str
    bf16: bool = False
    tf32: bool = False
    compile: bool = False
    group: bool = True
    pad_to_multiple_of: int | None = None
    pad_to_buckets: tuple[int, ...] | None = None
    workers: int = 0
    optcompile: bool = False
    cuda_graphs: bool = False


def parse_run(name: str, args) -> RunSpec:
    base, *mods = name.split("+")
    if base not in BASES:
        raise ValueError(f"--runs: {name!r} starts with {base!r}; runs are {list(BASES)} plus '+modifiers'.")
    spec = RunSpec(name, base, bf16=args.bf16, tf32=args.tf32, compile=args.torch_compile, group=base != "stock")
    spec.pad_to_multiple_of = args.pad_to_multiple_of
    spec.workers = args.dataloader_num_workers
    for mod in mods:
        if mod in ("bf16", "tf32", "compile"):
            setattr(spec, mod, True)
        elif mod == "nogroup":
            spec.group = False
        elif mod == "graphs":
            if base not in ("ours", "two_task"):
                raise ValueError(f"--runs: {name!r}: graphs (--cuda_graphs) is an option of our Trainer.")
            spec.cuda_graphs = True
        elif mod == "optcompile":
            if base != "bare":
                raise ValueError(f"--runs: {name!r}: optcompile is an experiment of the bare loop only.")
            spec.optcompile = True
        elif mod == "buckets":
            if base == "stock":
                raise ValueError(f"--runs: {name!r}: DataCollatorWithPadding has no length buckets; use pad<N>.")
            spec.pad_to_buckets = tuple(sorted(set(args.pad_buckets)))
        elif re.fullmatch(r"pad\d+", mod):
            spec.pad_to_multiple_of = int(mod[3:])
        elif re.fullmatch(r"workers\d+", mod):
            spec.workers = int(mod[7:])
        else:
            raise ValueError(
                f"--runs: unknown modifier {mod!r} in {name!r}; use bf16, tf32, compile, nogroup, pad<N>, buckets, "
                f"workers<N>, graphs (ours, two_task), optcompile (bare only)."
            )
    return spec


class StepClock(TrainerCallback):
    """Times optimiser steps warmup+1 .. warmup+steps, synchronising the device at both ends.

    A Trainer callback; the plain loop of `bare` calls `start()` and `step_end(step)` itself.
    """

    def __init__(self, warmup: int, steps: int, device: str):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.started = self.begin = self.end = None

    def start(self) -> None:
        self.started = now()

    def step_end(self, step: int) -> None:
        if step in (self.warmup, self.warmup + self.steps):
            if self.device == "cuda":
                torch.cuda.synchronize()
            if step == self.warmup:
                self.begin = now()
            else:
                self.end = now()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end(state.global_step)

    @property
    def seconds(self) -> float:
        return self.end - self.begin

    @property
    def warmup_seconds(self) -> float:
        return self.begin - self.started


class CountingCollator:
    """Wraps a collator to count real and padded token positions, and the batch shapes in the order met
    (main-process loading only: batch i is the one optimiser step i + 1 trains on)."""

    def __init__(self, inner):
        self.inner = inner
        self.real = self.total = 0
        self.first_seen: dict[tuple[int, ...], int] = {}  # shape -> index of the first batch of that shape
        self.batches = 0

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.real += int(mask.sum())
        self.total += mask.numel()
        self.first_seen.setdefault(tuple(mask.shape), self.batches)
        self.batches += 1
        return batch

    def shapes(self, warmup: int, steps: int) -> tuple[int, int]:
        """Distinct shapes over warm-up and timed steps, and how many of them appeared first in the timed ones."""
        seen = [index for index in self.first_seen.values() if index < warmup + steps]
        return len(seen), sum(index >= warmup for index in seen)


# ---------------------------------------------------------------------------------------------------------
# Data: the same SST-2 rows for every run, tokenized once per kind of run
# ---------------------------------------------------------------------------------------------------------


def data_arguments(args, tasks: list[str], max_eval_samples: int | None):
    from train import DataArguments

    return DataArguments(
        data_dir=args.data_dir,
        tasks=tasks,
        max_seq_length=args.max_seq_length,
        max_train_samples=args.max_train_samples,
        max_eval_samples=max_eval_samples,
        gold_eval=False,
    )


def ours_data(args, tokenizer, tasks: list[str], max_eval_samples: int | None = 64):
    """Our tokenized data; the eval sets are small by default because throughput runs never evaluate."""
    import data as mtdata

    data_args = data_arguments(args, tasks, max_eval_samples)
    return mtdata.build_data(mtdata.get_tasks(tasks), tokenizer, data_args, seed=args.seed)


def stock_data(args, tokenizer):
    """SST-2 train as a run_glue.py user has it: `sentence`/`label`, tokenized by `datasets.map`, no padding."""
    import datasets

    import data as mtdata

    source = mtdata.SST2_TRAIN
    ds = mtdata.load_source(source, args.data_dir)
    # The rows build_data keeps for --max_train_samples (same helper, same seed): identical rows for every run.
    texts, labels = list(ds[source.text_column]), list(ds[source.label_column])
    texts, labels = mtdata._subsample(texts, labels, args.max_train_samples, args.seed)
    ds = datasets.Dataset.from_dict({"sentence": texts, "label": labels})

    def tokenize(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=args.max_seq_length)

    return ds.map(tokenize, batched=True, remove_columns=["sentence"])


def overhead_probe_encoder(encoder_path: str, folder: str) -> str:
    """The encoder's config and tokenizer, 8 wide with one attention head (intermediate 4x), random weights.

    The operator count per step does not depend on the widths or the head count, so what is left is host work.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(encoder_path)
    config.num_attention_heads, config.hidden_size = 1, 8
    config.intermediate_size = 4 * config.hidden_size
    set_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(encoder_path).save_pretrained(folder)
    return folder


def check_same_rows(stock, ours, what: str = "SST-2 train") -> None:
    """A comparison means something only if both trainers see the same token ids and labels."""
    if "task_ids" in ours.column_names:
        ours = ours.filter(lambda t: t == 0, input_columns="task_ids")  # the sentiment rows
    same_tokens = list(stock["input_ids"]) == list(ours["input_ids"])
    if not same_tokens or list(stock["label"]) != list(ours["labels"]):
        raise RuntimeError(f"stock and ours were built from different {what} rows or tokens; the comparison is void.")


# ---------------------------------------------------------------------------------------------------------
# Trainers
# ---------------------------------------------------------------------------------------------------------


def training_arguments(args, spec: RunSpec, device: str, output_dir: str, **overrides) -> TrainingArguments:
    if "max_steps" not in overrides:
        overrides["max_steps"] = args.warmup_steps + args.steps + args.profile_steps
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=0.01,
        optim=args.optim,
        logging_steps=args.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        dataloader_drop_last=True,  # every timed step has exactly batch_size rows
        dataloader_num_workers=spec.workers,
        dataloader_pin_memory=device == "cuda",
        bf16=spec.bf16,
        # Explicit on GPU: TF32 is process-wide state, and a compiled run would otherwise leave it on for the next.
        tf32=spec.tf32 if device == "cuda" else None,
        torch_compile=spec.compile,
        # --cuda_graphs records the step itself: the compiler then only fuses kernels (mode default).
        torch_compile_mode=("default" if spec.cuda_graphs else args.compile_mode) if spec.compile else None,
        use_cpu=device == "cpu",
    )
    return TrainingArguments(**{**settings, **overrides})


def build_stock(
    args, spec, device, tokenizer, encoder_path, stock_ds, output_dir, training_args=None, **trainer_kwargs
):
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder_path, num_labels=2, attn_implementation=args.attn_implementation, dtype=torch.float32
    )
    collator = CountingCollator(DataCollatorWithPadding(tokenizer, pad_to_multiple_of=spec.pad_to_multiple_of))
    trainer = Trainer(
        model=model,
        args=training_args or training_arguments(args, spec, device, output_dir),
        train_dataset=stock_ds,
        data_collator=collator,
        processing_class=tokenizer,
        **trainer_kwargs,
    )
    return trainer, collator


def build_ours(args, spec, device, tokenizer, encoder_path, mt, output_dir, training_args=None, **trainer_kwargs):
    import data as mtdata
    from modeling_multitask import MultiTaskModel
    from train import MultiTaskArguments
    from trainer import MultiTaskTrainer

    set_seed(args.seed)
    model = MultiTaskModel.from_encoder(
        encoder_path,
        tasks=[t.to_config() for t in mt.tasks],
        attn_implementation=args.attn_implementation,
        dtype=torch.float32,  # float32 master weights whatever the checkpoint's dtype; --bf16 is autocast
    )
    mt_args = MultiTaskArguments(
        length_grouping=spec.group,
        pad_to_multiple_of=spec.pad_to_multiple_of,
        pad_to_buckets=list(spec.pad_to_buckets or []),
        cuda_graphs=spec.cuda_graphs,
    )
    collator = CountingCollator(
        mtdata.MultiTaskCollator(tokenizer.pad_token_id, spec.pad_to_multiple_of, spec.pad_to_buckets)
    )
    trainer = MultiTaskTrainer(
        model=model,
        args=training_args or training_arguments(args, spec, device, output_dir),
        train_dataset=mt.train,
        eval_dataset=trainer_kwargs.pop("eval_dataset", mt.eval_sets),
        processing_class=tokenizer,
        data_collator=collator,
        task_sizes=mt.task_sizes,
        eval_tasks=mt.eval_tasks,
        mt_args=mt_args,
        **trainer_kwargs,
    )
    return trainer, collator


class ProfileWindow(TrainerCallback):
    """torch.profiler over the `--profile_steps` steps after the timed ones; the top operators go to a file.

    What it answers on a GPU: how many operators (kernel launches) a step issues outside a CUDA graph, and which
    ones take the host's time. The timed steps are never profiled.
    """

    def __init__(self, args, spec: RunSpec, device: str):
        self.start, self.steps, self.device = args.warmup_steps + args.steps, args.profile_steps, device
        self.path = Path(args.profile_dir) / f"{spec.name}.txt" if args.profile_dir and self.steps else None
        self.profiler = None

    def step_end(self, step: int) -> None:
        if self.path is None:
            return
        try:
            self._step_end(step)
        except Exception as err:  # a profiler failure must not cost the run its timed figure
            logger.warning("profile of %s failed (%s: %s); no profile written", self.path.stem, type(err).__name__, err)
            self.path = None

    def _step_end(self, step: int) -> None:
        if step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        elif step == self.start + self.steps and self.profiler is not None:
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            self.write()

    def write(self) -> None:
        events = self.profiler.key_averages()
        operators = sum(e.count for e in events if e.key.startswith("aten::"))
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch"))
        lines = [
            f"steps {self.start + 1}..{self.start + self.steps} ({self.steps} steps, after the timed ones)",
            f"aten operators per step (nested ones included): {operators / self.steps:.0f}",
            f"kernel and graph launches per step: {launches / self.steps:.0f}",
            "",
            events.table(sort_by="self_cpu_time_total", row_limit=30),
        ]
        if self.device == "cuda":
            lines += ["", events.table(sort_by="self_device_time_total", row_limit=30)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end(state.global_step)


def run_bare(args, spec: RunSpec, device: str, encoder_path, mt, tokenizer) -> tuple[StepClock, CountingCollator, float]:
    """The floor under `ours`: the same model, batches and update rule, in the shortest loop that does them."""
    import data as mtdata
    from sampler import make_batch_sampler
    from modeling_multitask import MultiTaskModel
    from torch.utils.data import DataLoader

    set_seed(args.seed)
    model = MultiTaskModel.from_encoder(
        encoder_path,
        tasks=[t.to_config() for t in mt.tasks],
        attn_implementation=args.attn_implementation,
        dtype=torch.float32,
    ).to(device)
    model.train()
    sampler = make_batch_sampler(
        mt.task_sizes, batch_size=args.batch_size, strategy="round_robin", seed=args.seed,
        lengths=mt.train["length"] if spec.group else None, drop_last=True,
    )  # fmt: skip
    collator = CountingCollator(
        mtdata.MultiTaskCollator(tokenizer.pad_token_id, spec.pad_to_multiple_of, spec.pad_to_buckets)
    )
    loader = DataLoader(mt.train, batch_sampler=sampler, collate_fn=collator, num_workers=spec.workers,
                        pin_memory=device == "cuda")  # fmt: skip
    # The Trainer's split: matrices decay, biases and LayerNorm weights (the 1-D parameters) do not.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    if spec.optcompile:
        # torch.compile'd clipping and update (PyTorch's compiled-optimizer recipe): the learning rate is a tensor
        # the scheduler fills in place, so a new rate is not a new constant (a recompilation) at every step.
        # A tensor rate needs capturable (GPU: state on the device, as CUDA graphs want) or fused (CPU dry runs).
        device_kind = {"capturable": True} if device == "cuda" else {"fused": True}
        optimizer = torch.optim.AdamW(groups, lr=torch.tensor(args.learning_rate), **device_kind)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, fused="fused" in args.optim)
    total = args.warmup_steps + args.steps + args.profile_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total - step) / total))
    parameters = list(model.parameters())

    def update():
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    update = torch.compile(update) if spec.optcompile else update
    forward = torch.compile(model, mode=args.compile_mode) if spec.compile else model
    if spec.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    clock = StepClock(args.warmup_steps, args.steps, device)
    clock.start()
    window = ProfileWindow(args, spec, device)
    # A sum on the device, not a list of losses: with CUDA graphs each step's loss lives in graph memory that the
    # next replay overwrites, so it must not be kept.
    step, loss_sum = 0, torch.zeros((), device=device)
    while step < total:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=spec.bf16):
                loss = forward(**batch).loss
            loss.backward()
            update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            step += 1
            clock.step_end(step)
            window.step_end(step)
            if step == total:
                break
    if spec.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return clock, collator, float(loss_sum) / total


def run_one(args, spec: RunSpec, device: str, tokenizer, encoder_path, prepared: dict) -> dict:
    free_memory(device)
    if spec.base == "bare":
        with PeakMemory(device) as memory:
            clock, collator, train_loss = run_bare(args, spec, device, encoder_path, prepared["ours"], tokenizer)
        return result_row(args, spec, clock, collator, memory, train_loss)
    with tempfile.TemporaryDirectory() as output_dir, PeakMemory(device) as memory:
        if spec.base == "stock":
            trainer, collator = build_stock(args, spec, device, tokenizer, encoder_path, prepared["stock"], output_dir)
        else:
            trainer, collator = build_ours(args, spec, device, tokenizer, encoder_path, prepared[spec.base], output_dir)
        clock = StepClock(args.warmup_steps, args.steps, device)
        trainer.add_callback(clock)
        trainer.add_callback(ProfileWindow(args, spec, device))
        trainer.remove_callback(PrinterCallback)  # the table is the output
        result = trainer.train()
        graphs = trainer.step_graphs.summary() if getattr(trainer, "step_graphs", None) else None
    del trainer
    row = result_row(args, spec, clock, collator, memory, result.training_loss)
    if graphs:
        row["cuda_graphs"] = graphs  # recordings, replays and eager steps of --cuda_graphs
    return row


def result_row(args, spec: RunSpec, clock, collator, memory, train_loss: float) -> dict:
    samples = args.steps * args.batch_size
    shapes, new_when_timed = collator.shapes(args.warmup_steps, args.steps) if not spec.workers else (None, None)
    return {
        "run": spec.name,
        "samples_per_second": samples / clock.seconds,
        "step_ms": 1000 * clock.seconds / args.steps,
        "warmup_seconds": clock.warmup_seconds,
        "padding_share": None if spec.workers else 1 - collator.real / collator.total,
        "shapes": shapes,
        "shapes_first_timed": new_when_timed,
        "peak_memory_mb": memory.peak_mb,
        "memory_growth_mb": memory.growth_mb,
        "memory_kind": memory.kind,
        "train_loss": train_loss,
        "settings": {k: v for k, v in vars(spec).items() if k != "name"},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser)
    parser.add_argument("--runs", nargs="+", default=["stock", "ours", "two_task"])
    parser.add_argument("--steps", type=int, default=30, help="Timed optimiser steps per run.")
    parser.add_argument("--warmup_steps", type=int, default=5, help="Untimed steps first (compilation happens here).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_train_samples", type=int, default=None, help="SST-2 rows (default: all 67,349).")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--optim", default="adamw_torch_fused")
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every run.")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls in every run (GPU only).")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the model in every run.")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs.")
    parser.add_argument("--pad_to_multiple_of", type=int, default=None, help="Pad lengths to a multiple of this.")
    parser.add_argument(
        "--pad_buckets", type=int, nargs="+", default=[16, 32, 64, 128], help="Lengths of the 'buckets' modifier."
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--profile_steps", type=int, default=0, help="Profile this many steps after the timed ones.")
    parser.add_argument("--profile_dir", default=None, help="Write each run's top operators to DIR/<run>.txt.")
    parser.add_argument(
        "--overhead_probe", action="store_true", help="Random 8-wide encoder of the same structure (see above)."
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 1:
        raise ValueError("--steps and --warmup_steps must be >= 1 (the clock starts at the end of a warm-up step).")
    return args


def results_table(results: list[dict], device: str) -> str:
    """One row per run: throughput, its ratio to the stock run, step time, padding, shapes, memory, warm-up, loss."""
    rows = []
    for r in results:
        if "error" in r:
            rows.append([f"`{r['run']}`", f"failed: {r['error']}"] + [None] * 7)
            continue
        padding = None if r["padding_share"] is None else f"{100 * r['padding_share']:.0f}%"
        shapes = None if r["shapes"] is None else f"{r['shapes']} ({r['shapes_first_timed']})"
        rows.append(
            [
                f"`{r['run']}`",
                r["samples_per_second"],
                r["ratio_vs_stock"],
                r["step_ms"],
                padding,
                shapes,
                r["peak_memory_mb"],
                r["warmup_seconds"],
                r["train_loss"],
            ]
        )
    columns = ["run", "samples/s", "x stock", "ms/step", "padding", "shapes (new when timed)",
               common.memory_column(device), "warm-up s", "train loss"]  # fmt: skip
    return markdown_table(columns, rows)


def setup_runs(args: argparse.Namespace) -> tuple[str, list]:
    """Quiet the libraries, set the threads, pick the device and parse `--runs` (TF32 refused on a CPU); shared
    with bench/time_to_accuracy.py."""
    common.quiet_libraries()
    common.apply_threads(args.threads)
    device = resolve_device(args.device)
    specs = [parse_run(name, args) for name in args.runs]
    if device == "cpu" and any(s.tf32 for s in specs):
        raise ValueError("tf32 is a GPU setting; drop it (and --tf32) on CPU.")
    return device, specs


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, specs = setup_runs(args)
    if device == "cpu" and any(s.cuda_graphs for s in specs):
        from trainer import MultiTaskTrainer

        logger.warning("graphs on a CPU: emulated (eager replays), for dry runs only; its figures mean nothing.")
        MultiTaskTrainer.emulate_cuda_graphs = True
    encoder_path = resolve_encoder(args.encoder)
    probe_dir = None
    if args.overhead_probe:
        probe_dir = tempfile.TemporaryDirectory()
        encoder_path = overhead_probe_encoder(encoder_path, probe_dir.name)
    info = setting(device)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    prepared = {}
    bases = {s.base for s in specs}
    if "stock" in bases:
        prepared["stock"] = stock_data(args, tokenizer)
    if bases & {"ours", "stock", "bare"}:
        prepared["ours"] = ours_data(args, tokenizer, ["sentiment"])
    if "two_task" in bases:
        prepared["two_task"] = ours_data(args, tokenizer, ["sentiment", "question"])
    if "stock" in prepared:
        check_same_rows(prepared["stock"], prepared["ours"].train)

    results = []
    for spec in specs:
        logger.warning("run %s ...", spec.name)
        results.append(
            common.guarded(spec.name, lambda: run_one(args, spec, device, tokenizer, encoder_path, prepared), device)
        )
        # The whole row at once, so a run cut off by a time limit still leaves the finished rows in its log.
        logger.warning("run %s: %s", spec.name, json.dumps(results[-1], default=str))
    measured = [r for r in results if "error" not in r]
    reference = next((r for r in measured if r["run"].split("+")[0] == "stock"), None)
    for r in measured:
        r["ratio_vs_stock"] = r["samples_per_second"] / reference["samples_per_second"] if reference else None

    table = results_table(results, device)
    result = {"benchmark": "train_throughput", "device": device, "setting": info, "results": results}
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "note")}
    encoder = f"{args.encoder} reshaped by --overhead_probe (random, 8 wide, 1 head)" if args.overhead_probe else args.encoder
    notes = [
        f"batch size {args.batch_size}, {args.steps} timed steps after {args.warmup_steps} warm-up steps, "
        f"SST-2 rows: {args.max_train_samples or 'all'}, encoder {encoder}, attention {args.attn_implementation}",
        args.note,
    ]
    if probe_dir is not None:
        probe_dir.cleanup()
    report(f"Training throughput ({device})", table, result, args.out, notes)
    return result


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    sys.exit(1 if any("error" in r for r in main()["results"]) else 0)
