"""checks.py: bad input fails early with one clear ValueError (what was expected, what was found, where, how to fix).

The table below pins each message; the end-to-end tests check that the checks run before the output folder
is created or touched. Also the non-finite watch (a NaN or an exploding loss stops the run naming task and
step), the advice to compiled runs without fixed shapes, and the thread settings of a lone CPU process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import available_cores

import checks
import data as mtdata
import freezing
import question
import train

GOOD_TEXTS = ["a good film", "a bad film", "what a film", "is it good ?"]
GOOD_LABELS = [1, 0, 1, 0]


def definition(**overrides) -> dict:
    """A custom task read from <data_dir>/topic/train.<ext>, as a user would declare it in the YAML."""
    return {
        "name": "topic",
        "dataset": "someone/topic",
        "mirror": "topic",
        "train_split": "train",
        "text_column": "text",
        "label_column": "label",
        "label_names": ["neg", "pos"],
        **overrides,
    }


def write_parquet(folder: Path, columns: dict, split: str = "train") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def load_task(data_dir: Path, tokenizer, definitions: list[dict], **data_kwargs) -> mtdata.MultiTaskData:
    """The path train.main takes: parse the definitions, pick the tasks, load and check the data."""
    specs = mtdata.parse_task_definitions(json.dumps(definitions))
    tasks = mtdata.get_tasks([d["name"] for d in definitions], specs)
    args = train.DataArguments(
        data_dir=str(data_dir) if data_dir is not None else None,
        max_seq_length=data_kwargs.pop("max_seq_length", 32),
        gold_eval=False,
        **data_kwargs,
    )
    return mtdata.build_data(tasks, tokenizer, args, seed=0)


def rows(texts=None, labels=None) -> dict:
    return {"text": GOOD_TEXTS if texts is None else texts, "label": GOOD_LABELS if labels is None else labels}


# ---------------------------------------------------------------------------------------------------------
# The table: (what is wrong, how to provoke it, the message it must give)
# ---------------------------------------------------------------------------------------------------------


def _data_case(columns, **definition_overrides):
    def run(ctx):
        write_parquet(ctx.tmp_path / "mirror" / "topic", columns)
        load_task(ctx.tmp_path / "mirror", ctx.tokenizer, [definition(**definition_overrides)])

    return run


def _file_case(name: str, content: bytes, **definition_overrides):
    def run(ctx):
        folder = ctx.tmp_path / "mirror" / "topic"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(content)
        load_task(ctx.tmp_path / "mirror", ctx.tokenizer, [definition(**definition_overrides)])

    return run


def _unknown_config_key(ctx):
    path = ctx.tmp_path / "config.yaml"
    path.write_text("tasks: [sentiment]\nlearning_rat: 0.001\n", encoding="utf-8")
    train.load_config(str(path))


def _unknown_definition_key(ctx):
    mtdata.parse_task_definitions([{**definition(), "label_col": "label"}])


def _duplicate_cli_tasks(ctx):
    mtdata.get_tasks(["sentiment", "question", "sentiment"])


def _duplicate_definitions(ctx):
    mtdata.parse_task_definitions([definition(), definition(dataset="other/topic")])


def _unknown_task(ctx):
    mtdata.get_tasks(["sentiment", "topic"])


def _label_names_wrong_length(ctx):
    mtdata.parse_task_definitions([definition(num_labels=3)])


def _num_labels_vs_classlabel(ctx):
    # A label column saved as ClassLabel(negative, positive), as in the SST-2 mirror: a 3-class task disagrees.
    import datasets

    label = datasets.ClassLabel(names=["negative", "positive"])
    features = datasets.Features({"text": datasets.Value("string"), "label": label})
    folder = ctx.tmp_path / "mirror" / "topic"
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict(rows(), features=features).to_parquet(str(folder / "train.parquet"))
    load_task(ctx.tmp_path / "mirror", ctx.tokenizer, [definition(label_names=["a", "b", "c"])])


def _missing_dataset_folder(ctx):
    (ctx.tmp_path / "mirror").mkdir()
    load_task(ctx.tmp_path / "mirror", ctx.tokenizer, [definition()])


def _missing_split_file(ctx):
    write_parquet(ctx.tmp_path / "mirror" / "topic", rows(), split="test")
    load_task(ctx.tmp_path / "mirror", ctx.tokenizer, [definition()])


def _hub_while_offline(ctx):
    mtdata.load_source(mtdata.SST2_TRAIN, data_dir=None)


def _freeze_missing_layer(ctx):
    freezing.apply_freezing(ctx.make_model(), ["layers:0-5"])


def _freeze_missing_task(ctx):
    freezing.apply_freezing(ctx.make_model(), ["encoder"], ["head:topic"])


def _forward_unknown_task(ctx):
    ctx.make_model()(input_ids=torch.tensor([[2, 10, 3]]), task="topic")


def _forward_unknown_task_id(ctx):
    ctx.make_model()(input_ids=torch.tensor([[2, 10, 3]]), task_ids=torch.tensor([5]), labels=torch.tensor([0]))


def _output_dir_other_run(ctx):
    out = ctx.tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}", encoding="utf-8")
    checks.check_output_dir(
        train.TrainingArguments(output_dir=str(out), report_to="none"), train.MultiTaskArguments()
    )


def _resume_incomplete_checkpoint(ctx):
    checkpoint = ctx.tmp_path / "run" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"")
    checks.check_output_dir(
        train.TrainingArguments(
            output_dir=str(checkpoint.parent), resume_from_checkpoint=str(checkpoint), report_to="none"
        ),
        train.MultiTaskArguments(),
    )


def _model_setup(encoder, max_seq_length=128, **mt_kwargs):
    """check_model_setup on a sentiment-only model: the encoder, data and multi-task settings under test."""
    checks.check_model_setup(
        str(encoder),
        [mtdata.TASKS["sentiment"].to_config()],
        {},
        train.ModelArguments(encoder=str(encoder)),
        train.DataArguments(max_seq_length=max_seq_length),
        train.MultiTaskArguments(**mt_kwargs),
    )


def _max_seq_length_over_positions(ctx):
    _model_setup(ctx.tiny_encoder_dir, max_seq_length=256)


def _roberta_encoder(folder, max_position_embeddings=514):
    from transformers import RobertaConfig

    RobertaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=max_position_embeddings, pad_token_id=1,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def _max_seq_length_over_roberta_positions(ctx, max_seq_length=513):
    _model_setup(_roberta_encoder(ctx.tmp_path / "roberta"), max_seq_length=max_seq_length)


def _pad_buckets_over_max_seq_length(ctx):
    _model_setup(ctx.tiny_encoder_dir, max_seq_length=64, pad_to_buckets=[16, 32, 64, 128])


def _cuda_graphs(ctx, cuda=True, buckets=(16, 32), **training):
    """check_cuda_graphs with --cuda_graphs true; `cuda`: whether the run has a CUDA device."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(ctx.tmp_path / "run"), report_to="none", **training)
    mt_args = train.MultiTaskArguments(cuda_graphs=True, pad_to_buckets=list(buckets))
    checks.check_cuda_graphs(args, mt_args, cuda=cuda)


CASES = [
    ("unknown config key", _unknown_config_key, r"unknown key 'learning_rat'\. Did you mean 'learning_rate'\?"),
    ("unknown task definition key", _unknown_definition_key,
     r"\('topic'\): unknown key 'label_col'\. Did you mean 'label_column'\?"),
    ("missing text column", _data_case({"sentence": GOOD_TEXTS, "label": GOOD_LABELS}),
     r"topic/train\.parquet: missing column\(s\) \['text'\]; found \['sentence', 'label'\]\. Rename"),
    ("missing label column", _data_case({"text": GOOD_TEXTS, "class": GOOD_LABELS}),
     r"train\.parquet: missing column\(s\) \['label'\]; found \['text', 'class'\]"),
    ("label out of range", _data_case(rows(labels=[1, 0, 2, 0])),
     r"train\.parquet: column 'label' row 2 has value 2, expected 0\.\.1 \(num_labels=2\); the column holds the "
     r"values \[0, 1, 2\]\. Fix the label, or make the task's label_names/num_labels match the data"),
    ("label negative", _data_case(rows(labels=[1, -1, 1, 0])), r"column 'label' row 1 has value -1, expected 0\.\.1"),
    ("label float", _data_case(rows(labels=[1.0, 0.5, 1.0, 0.0])),
     r"column 'label' row 1 is 0\.5, expected an integer class id 0\.\.1; fix or drop the row"),
    ("label NaN", _data_case(rows(labels=[1.0, 0.0, float("nan"), 0.0])),
     r"column 'label' row 2 is nan, expected an integer"),
    ("label None", _data_case(rows(labels=pa.array([1, None, 1, 0], type=pa.int64()))),
     r"column 'label' row 1 is None, expected an integer class id 0\.\.1; fill or drop the row"),
    ("label text not a class", _data_case(rows(labels=["pos", "neutral", "pos", "neg"])),
     r"train\.parquet: column 'label' row 1 is 'neutral', a class name outside task 'topic''s label_names "
     r"\['neg', 'pos'\]\. Fix the row, or list the class in label_names"),
    ("empty text", _data_case(rows(texts=["a good film", "", "what a film", "is it ?"])),
     r"column 'text' row 1 is empty or whitespace only; remove the row or fill it"),
    ("whitespace-only text", _data_case(rows(texts=["a good film", "bad", " \t ", "is it ?"])),
     r"column 'text' row 2 is empty or whitespace only"),
    ("text None", _data_case(rows(texts=pa.array(["a", None, "b", "c"], type=pa.string()))),
     r"column 'text' row 1 is None, expected a string"),
    ("split with zero rows", _data_case({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}),
     r"train\.parquet: the split has zero rows; task 'topic' needs data there"),
    ("duplicate task names in --tasks", _duplicate_cli_tasks,
     r"Duplicate task names \['sentiment'\] in --tasks; list each task once"),
    ("duplicate task definitions", _duplicate_definitions,
     r"task_definitions\[1\] \('topic'\): duplicate task name 'topic'; each definition needs a unique name"),
    ("task name with a dot", lambda ctx: mtdata.parse_task_definitions([definition(name="topic.v2")]),
     r"task name 'topic\.v2' must be letters, digits and underscores"),
    ("task name of a built-in eval set", lambda ctx: mtdata.parse_task_definitions([definition(name="question_gold")]),
     r"task name 'question_gold' is taken by a built-in task or eval set"),
    ("unknown task", _unknown_task,
     r"Unknown task\(s\) \['topic'\]; known tasks: \['question', 'sentiment'\]\. Declare"),
    ("one class only", _data_case(rows(labels=[1, 1, 1, 1])),
     r"task 'topic': the training data has only class\(es\) \[1\] of \['neg', 'pos'\]; a classifier needs"),
    ("num_labels disagrees with the data", _num_labels_vs_classlabel,
     r"topic/train\.parquet: column 'label' is a ClassLabel with 2 classes \['negative', 'positive'\], but task "
     r"'topic' has num_labels=3 \['a', 'b', 'c'\]"),
    ("label name list of the wrong length", _label_names_wrong_length,
     r"num_labels=3 but label_names has 2 entries \['neg', 'pos'\]; list exactly one name per class"),
    ("data file missing", _missing_split_file,
     r"has no file for dataset 'someone/topic' split 'train': looked for .*topic/train\.parquet \(or "
     r"\.csv/\.tsv/\.jsonl/\.json\); .*topic holds \['test\.parquet'\]"),
    ("--data_dir lacks the dataset", _missing_dataset_folder,
     r"has no file for dataset 'someone/topic' split 'train': it has no folder 'topic' \(looked for "
     r".*topic/train\.parquet"),
    ("not parquet", _file_case("train.parquet", b"text,label\nnot parquet,1\n"),
     r"train\.parquet: could not be read as parquet \(.*Parquet magic bytes not found"),
    ("not csv", _file_case("train.csv", b'text,label\n"an unclosed quote,1\nb,0\n'),
     r"train\.csv: could not be read as csv \(.*EOF inside string"),
    ("not jsonl", _file_case("train.jsonl", b'{"text": "a", "label": 1}\n{"text": broken\n'),
     r"train\.jsonl: could not be read as jsonl \(.*JSON parse error"),
    ("not UTF-8", _file_case("train.csv", "text,label\ncaf\xe9 good,1\nbad,0\n".encode("latin-1")),
     r"train\.csv: is not UTF-8 encoded \(byte b'\\xe9' .*Re-save the file as UTF-8"),
    ("Hub id while offline", _hub_while_offline,
     r"Could not load 'stanfordnlp/sst2' split 'train' from the Hub: offline mode is on .*Pass --data_dir with a "
     r"local mirror holding sst2/train\.parquet .*or connect to the Hub"),
    ("freeze a layer that does not exist", _freeze_missing_layer,
     r"freeze 'layers:0-5': layer range 0-5 does not fit a 2-layer encoder \(valid 0\.\.1\)"),
    ("freeze a task that does not exist", _freeze_missing_task,
     r"freeze 'head:topic': no task 'topic'; this model's tasks are \['sentiment', 'question'\]"),
    ("forward with an unknown task", _forward_unknown_task,
     r"Unknown task 'topic'; this model's tasks are \['sentiment', 'question'\]"),
    ("forward with an unknown task id", _forward_unknown_task_id,
     r"forward\(\) got task_ids \[5\]; this model's task ids are 0\.\.1"),
    ("output folder holds another run", _output_dir_other_run,
     r"Output folder .*run already holds files of another run \(\['metrics\.json'\]\)\. "
     r"Pass --overwrite_output_dir true"),
    ("resume from an incomplete checkpoint", _resume_incomplete_checkpoint,
     r"checkpoint-4 lacks \['config\.json', 'trainer_state\.json', 'optimizer\.safetensors', .*It is incomplete"),
    ("max_seq_length beyond the encoder", _max_seq_length_over_positions,
     r"max_seq_length=256 exceeds the 128 tokens the encoder can place \(max_position_embeddings=128; .*set "
     r"--max_seq_length 128 or less"),
    ("max_seq_length beyond a RoBERTa encoder", _max_seq_length_over_roberta_positions,
     r"max_seq_length=513 exceeds the 512 tokens the encoder can place \(max_position_embeddings=514 minus 2 "
     r"positions its model type skips; .*set --max_seq_length 512 or less"),
    ("pad bucket above max_seq_length", _pad_buckets_over_max_seq_length,
     r"pad_to_buckets \[16, 32, 64, 128\] has lengths above max_seq_length=64: .*Drop them or raise "
     r"--max_seq_length"),
    ("pad bucket of length 0", lambda ctx: train.MultiTaskArguments(pad_to_buckets=[0, 16]),
     r"pad_to_buckets must hold positive lengths, got \[0, 16\]"),
    ("pad_to_multiple_of 0", lambda ctx: train.MultiTaskArguments(pad_to_multiple_of=0),
     r"pad_to_multiple_of must be a positive length or unset, got 0"),
    ("cuda_graphs without a GPU", lambda ctx: _cuda_graphs(ctx, cuda=False),
     r"--cuda_graphs true: it needs a CUDA GPU \(this run has none\); drop --cuda_graphs\.$"),
    ("cuda_graphs without fixed batch shapes", lambda ctx: _cuda_graphs(ctx, buckets=()),
     r"--cuda_graphs true: every batch length would be a new recording: pass --pad_to_buckets \(e\.g\. 16 32 64"),
    ("cuda_graphs with gradient accumulation", lambda ctx: _cuda_graphs(ctx, gradient_accumulation_steps=4),
     r"gradient_accumulation_steps is 4: a recorded backward cannot add to the previous micro-batch's gradients; "
     r"set it to 1"),
    ("cuda_graphs with activation checkpointing", lambda ctx: _cuda_graphs(ctx, activation_checkpointing=True),
     r"activation \(gradient\) checkpointing is not supported with it .*: drop --activation_checkpointing"),
    ("cuda_graphs inside torch.compile's own CUDA graphs",
     lambda ctx: _cuda_graphs(ctx, torch_compile=True, torch_compile_mode="reduce-overhead"),
     r"--torch_compile_mode reduce-overhead records CUDA graphs itself; use mode default"),
]


class Context:
    def __init__(self, tmp_path, tokenizer, make_model, tiny_data_dir, tiny_encoder_dir):
        self.tmp_path = tmp_path
        self.tokenizer = tokenizer
        self.make_model = make_model
        self.tiny_data_dir = tiny_data_dir
        self.tiny_encoder_dir = tiny_encoder_dir


@pytest.fixture
def ctx(tmp_path, tiny_tokenizer, make_model, tiny_data_dir, tiny_encoder_dir):
    return Context(tmp_path, tiny_tokenizer, make_model, tiny_data_dir, tiny_encoder_dir)


def test_table_is_large_enough():
    assert len(CASES) >= 20
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("provoke, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_one_clear_value_error(ctx, provoke, message):
    with pytest.raises(ValueError, match=message):
        provoke(ctx)


def test_good_custom_task_loads(tmp_path, tiny_tokenizer):
    """The same helper with valid data works, so the table's failures come from the bad input alone."""
    write_parquet(tmp_path / "mirror" / "topic", rows())
    write_parquet(tmp_path / "mirror" / "topic", rows(labels=[1, 0, 0, 1]), split="test")
    mt = load_task(tmp_path / "mirror", tiny_tokenizer, [definition(eval_split="test", num_labels=2)])
    assert mt.task_sizes == [4]
    assert mt.train["labels"] == GOOD_LABELS
    assert mt.eval_tasks == {"topic": "topic"}
    assert mt.tasks[0].to_config()["id2label"] == {0: "neg", 1: "pos"}


# ---------------------------------------------------------------------------------------------------------
# Truncation is a warning, once, with a count
# ---------------------------------------------------------------------------------------------------------


def test_long_texts_are_truncated_with_one_counting_warning(tmp_path, tiny_tokenizer, caplog):
    long = "what a good film it is and what a bad film it was , is it ?"
    write_parquet(tmp_path / "mirror" / "topic", rows(texts=[long, "a bad film", long, long]))
    write_parquet(tmp_path / "mirror" / "topic", rows(texts=[long, "good", "bad", long]), split="test")
    with caplog.at_level(logging.WARNING, logger="data"):
        mt = load_task(tmp_path / "mirror", tiny_tokenizer, [definition(eval_split="test")], max_seq_length=8)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "truncated" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].getMessage().startswith("5 text(s) longer than max_seq_length=8 tokens were truncated")
    assert "topic/train: 3" in warnings[0].getMessage() and "topic/topic: 2" in warnings[0].getMessage()
    assert max(mt.train["length"]) == 8
    sep = tiny_tokenizer.sep_token_id
    assert all(ids[-1] == sep for ids in mt.train["input_ids"])  # the closing token survives the cut


def test_no_warning_when_nothing_is_truncated(tmp_path, tiny_tokenizer, caplog):
    write_parquet(tmp_path / "mirror" / "topic", rows())
    with caplog.at_level(logging.WARNING, logger="data"):
        load_task(tmp_path / "mirror", tiny_tokenizer, [definition()])
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


# ---------------------------------------------------------------------------------------------------------
# Through train.main: nothing is written before every check passed
# ---------------------------------------------------------------------------------------------------------


def _argv(tmp_path, encoder, data_dir, out, *extra) -> list[str]:
    config = tmp_path / "config.yaml"
    config.write_text(
        "tasks: [topic]\n"
        f"task_definitions: {json.dumps([definition()])}\n"
        "max_seq_length: 32\nper_device_train_batch_size: 2\nmax_steps: 2\nreport_to: none\n"
        "save_strategy: 'no'\neval_strategy: 'no'\ndisable_tqdm: true\n",
        encoding="utf-8",
    )
    return [str(config), "--encoder", str(encoder), "--data_dir", str(data_dir), "--output_dir", str(out), *extra]


def _previous_run(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"previous": true}', encoding="utf-8")
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}", encoding="utf-8")
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_bad_data_leaves_the_output_folder_untouched_even_with_overwrite(tmp_path, tiny_encoder_dir):
    write_parquet(tmp_path / "mirror" / "topic", rows(labels=[1, 0, 7, 0]))
    out = tmp_path / "out"
    before = _previous_run(out)
    argv = _argv(tmp_path, tiny_encoder_dir, tmp_path / "mirror", out, "--overwrite_output_dir", "true")
    with pytest.raises(ValueError, match=r"row 2 has value 7, expected 0\.\.1"):
        train.main(argv)
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_bad_freeze_spec_fails_before_data_and_output(tmp_path, tiny_encoder_dir):
    out = tmp_path / "out"
    # The data folder does not exist either: the freezing error must come first, before any data is read.
    argv = _argv(tmp_path, tiny_encoder_dir, tmp_path / "no-such-mirror", out, "--freeze", "layers:3")
    with pytest.raises(ValueError, match=r"freeze 'layers:3': layer range 3-3 does not fit a 2-layer encoder"):
        train.main(argv)
    assert not out.exists()


def test_output_folder_of_another_run_is_refused_then_replaced_with_consent(tmp_path, tiny_encoder_dir):
    write_parquet(tmp_path / "mirror" / "topic", rows())
    out = tmp_path / "out"
    _previous_run(out)
    argv = _argv(tmp_path, tiny_encoder_dir, tmp_path / "mirror", out)
    with pytest.raises(ValueError, match=r"already holds files of another run .*--overwrite_output_dir true"):
        train.main(argv)
    assert json.loads((out / "metrics.json").read_text()) == {"previous": True}
    metrics = train.main([*argv, "--overwrite_output_dir", "true", "--eval_before_training", "false"])
    assert metrics["train"]["global_steps"] == 2
    assert not (out / "checkpoint-3").exists()  # the old run is gone, not mixed with the new one
    assert json.loads((out / "metrics.json").read_text())["tasks"][0]["name"] == "topic"


def test_roberta_encoder_takes_its_full_512_tokens(ctx):
    _max_seq_length_over_roberta_positions(ctx, max_seq_length=512)  # the boundary of the case above: no error


@pytest.mark.parametrize("every_step", [True, False], ids=["cpu-every-step", "accelerator-at-log"])
def test_non_finite_loss_stops_training_naming_step_and_task(make_trainer, make_model, every_step):
    model = make_model()
    forward = model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third training step: a sentiment batch under round robin
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    trainer = make_trainer(model=model)
    trainer._check_every_step = every_step
    if every_step:  # on the CPU: stopped inside the bad step, before its update reaches the weights
        with pytest.raises(FloatingPointError, match=r"at step 3 on task\(s\) \['sentiment'\] \(per-task: [^)]*\)\. Stopping"):
            trainer.train()
        assert trainer.state.global_step == 2
    else:  # on an accelerator: no per-step host read; stopped at the first log after the bad step
        with pytest.raises(FloatingPointError, match=r"at step 3 on task\(s\) \['sentiment'\].*noticed at step 4"):
            trainer.train()
        assert trainer.state.global_step == 4


@pytest.mark.parametrize(
    "flags, advice",
    [
        ([], None),
        (["--torch_compile", "true"], "each new batch length is a new shape"),
        (["--torch_compile", "true", "--torch_compile_mode", "reduce-overhead"], "records another CUDA graph"),
        (["--torch_compile", "true", "--pad_to_buckets", "16", "32"], None),
        (["--torch_compile", "true", "--pad_to_multiple_of", "8"], None),
    ],
)
def test_compiled_runs_without_fixed_shapes_are_told_about_buckets(tmp_path, flags, advice):
    import checks
    import train

    *_, mt_args, training_args = train.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", *flags])
    note = checks.compile_shapes_advice(training_args, mt_args)
    if advice is None:
        assert note is None
    else:
        assert advice in note and "--pad_to_buckets 16 32 64 128" in note


def _trainer(tmp_path, model, tiny_tokenizer, tiny_data_dir, **training):
    data_args = train.DataArguments(
        data_dir=str(tiny_data_dir), max_seq_length=32, max_train_samples=16, max_eval_samples=8, gold_eval=False
    )
    pool = question.QuestionPool(question.QuestionArguments(question_pool_per_source=30))
    tasks = mtdata.get_tasks(["sentiment", "question"], pools={"question": pool})
    mt = mtdata.build_data(tasks, tiny_tokenizer, data_args, seed=0)
    args = train.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to="none", save_strategy="no",
        eval_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, **training,
    )  # fmt: skip
    return train.MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=mt.train,
        eval_dataset=mt.eval_sets,
        data_collator=mtdata.MultiTaskCollator(tiny_tokenizer.pad_token_id),
        task_sizes=mt.task_sizes,
        eval_tasks=mt.eval_tasks,
        mt_args=train.MultiTaskArguments(),
    )


def test_nan_in_one_head_stops_the_run_naming_task_and_step(tmp_path, make_model, tiny_tokenizer, tiny_data_dir):
    model = make_model()
    with torch.no_grad():
        model.heads["question"].weight[0, 0] = float("nan")
    trainer = _trainer(tmp_path, model, tiny_tokenizer, tiny_data_dir, max_steps=4)
    # round_robin: step 1 is a sentiment batch (its loss must stay finite), step 2 the first question batch.
    message = r"Non-finite training loss \(nan\) at step 2 on task\(s\) \['question'\]"
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()
    assert trainer.state.global_step == 1
    assert torch.isfinite(model.heads["sentiment"].weight).all()
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_exploding_learning_rate_stops_the_run(tmp_path, make_model, tiny_tokenizer, tiny_data_dir):
    trainer = _trainer(tmp_path, make_model(), tiny_tokenizer, tiny_data_dir, max_steps=20, learning_rate=1e30,
                       max_grad_norm=0.0, warmup_steps=0)  # fmt: skip
    with pytest.raises(
        FloatingPointError,
        match=r"Non-finite (training loss|gradient norm) \((nan|inf)\) at step \d+ on task\(s\) "
        r"\['(sentiment|question)'\]",
    ):
        trainer.train()
    assert trainer.state.global_step < 20


def test_nan_gradient_with_finite_loss_stops_before_the_weights_change(
    tmp_path, make_model, tiny_tokenizer, tiny_data_dir
):
    model = make_model()
    embeddings = model.encoder.embeddings.word_embeddings.weight
    embeddings.register_hook(lambda grad: grad * float("nan"))  # an overflow in backward, say
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, model, tiny_tokenizer, tiny_data_dir, max_steps=4)
    message = r"Non-finite gradient norm \(nan\) at step 1 on task\(s\) \['sentiment'\]"
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the optimizer never stepped


@pytest.mark.parametrize(
    "env, changed",
    [
        ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}, True),  # accelerate launch, one process
        ({"OMP_NUM_THREADS": "1"}, False),  # python train.py: the user's OMP_NUM_THREADS stands
        ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}, False),  # shared cores
        ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "2"}, False),  # a count the user chose
    ],
    ids=["accelerate-one-process", "plain-python", "two-processes", "chosen-count"],
)
def test_lone_cpu_process_threads(monkeypatch, env, changed):
    for key in ("ACCELERATE_DYNAMO_BACKEND", "OMP_NUM_THREADS", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        note = checks.use_every_core_in_a_lone_cpu_process()
        if changed and available_cores() > 1:
            assert torch.get_num_threads() == available_cores() and "OMP_NUM_THREADS=1" in note
        else:
            assert torch.get_num_threads() == 1 and note is None
    finally:
        torch.set_num_threads(before)


def test_a_saved_multitask_model_as_encoder_is_refused(tmp_path, make_model, tiny_tokenizer):
    from outputs import save_model_files

    saved = tmp_path / "run"
    save_model_files(make_model(), tiny_tokenizer, saved)
    out = tmp_path / "out"
    argv = _argv(tmp_path, saved, tmp_path / "no-such-mirror", out)
    with pytest.raises(ValueError, match=r"is a saved multi-task model .*run/0_Transformer .*tiny-encoder"):
        train.main(argv)
    assert not out.exists()
