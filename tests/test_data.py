"""data.py: built-in and custom tasks, loading the mirror, building the tokenized sets, the collator."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import data as mtdata
import question
from data import MultiTaskCollator
from question import QuestionArguments, is_question_heuristic
import math
import numpy as np


def test_get_tasks_rejects_unknown_and_duplicates():
    assert [t.name for t in mtdata.get_tasks(["sentiment", "question"])] == ["sentiment", "question"]
    with pytest.raises(ValueError, match=r"Unknown task\(s\) \['topic'\]; known tasks: \['question', 'sentiment'\]"):
        mtdata.get_tasks(["sentiment", "topic"])
    with pytest.raises(ValueError, match=r"Duplicate task names \['sentiment'\]"):
        mtdata.get_tasks(["sentiment", "sentiment"])


# ---- loading ----


@pytest.mark.parametrize("ext", ["parquet", "csv", "tsv", "jsonl"])
def test_load_source_reads_every_mirror_format(tmp_path, ext):
    frame = pd.DataFrame({"sentence": ["good", "bad"], "label": [1, 0]})
    folder = tmp_path / "sst2"
    folder.mkdir()
    path = folder / f"validation.{ext}"
    if ext == "parquet":
        frame.to_parquet(path)
    elif ext == "csv":
        frame.to_csv(path, index=False)
    elif ext == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    else:
        frame.to_json(path, orient="records", lines=True)
    ds = mtdata.load_source(mtdata.SST2_VALIDATION, str(tmp_path))
    assert ds["sentence"] == ["good", "bad"]
    assert ds["label"] == [1, 0]


def test_load_source_names_the_file_it_looked_for(tmp_path):
    with pytest.raises(ValueError, match=r"no file for dataset 'stanfordnlp/sst2' split 'validation'.*sst2/validation\.parquet"):
        mtdata.load_source(mtdata.SST2_VALIDATION, str(tmp_path))


# ---- building the data ----


def data_args(data_dir, **overrides):
    values = dict(data_dir=str(data_dir), max_seq_length=32, max_train_samples=None, max_eval_samples=None, gold_eval=True)
    values.update(overrides)
    return SimpleNamespace(**values)


def get_tasks(names):
    """The tasks with the question pool of these tests: 100 rows per source, a fifth held out."""
    options = QuestionArguments(question_pool_per_source=100, question_holdout_fraction=0.2)
    return mtdata.get_tasks(names, pools={"question": question.QuestionPool(options)})


def test_build_data_layout(tiny_data_dir, tiny_tokenizer):
    tasks = get_tasks(["sentiment", "question"])
    mt = mtdata.build_data(tasks, tiny_tokenizer, data_args(tiny_data_dir, max_train_samples=150))
    assert mt.task_sizes == [150, 150]  # 200 pool rows (100 SST-2 + 100 TREC) - 40 held out, capped at 150
    assert len(mt.train) == 300
    assert mt.train["task_ids"][:150] == [0] * 150 and mt.train["task_ids"][150:] == [1] * 150
    assert set(mt.eval_sets) == {
        "sentiment", "question", "question_gold", "question_gold_noqm", "question_swda", "question_swda_noqm"
    }
    assert mt.eval_tasks == {
        "sentiment": "sentiment",
        "question": "question",
        "question_gold": "question",
        "question_gold_noqm": "question",
        "question_swda": "question",
        "question_swda_noqm": "question",
    }
    assert len(mt.eval_sets["question"]) == 40
    assert len(mt.eval_sets["question_gold"]) == 150  # gold sets are never capped
    assert all(length <= 32 for length in mt.train["length"])
    assert not any("?" in t for t in mt.eval_texts["question_gold_noqm"] + mt.eval_texts["question_swda_noqm"])


def test_question_labels_come_from_the_heuristic_and_holdout_is_disjoint(tiny_data_dir, tiny_tokenizer):
    tasks = get_tasks(["question"])
    mt = mtdata.build_data(tasks, tiny_tokenizer, data_args(tiny_data_dir, gold_eval=False))
    held = mt.eval_texts["question"]
    assert mt.eval_sets["question"]["labels"] == [int(is_question_heuristic(t)) for t in held]
    train_ids = {tuple(ids) for ids in mt.train["input_ids"]}
    held_ids = {tuple(ids) for ids in mt.eval_sets["question"]["input_ids"]}
    assert not train_ids & held_ids
    assert set(mt.train["labels"]) == {0, 1}
    assert "question_gold" not in mt.eval_sets


def test_gold_text_never_reaches_training(tiny_data_dir, tiny_tokenizer):
    tasks = get_tasks(["sentiment", "question"])
    mt = mtdata.build_data(tasks, tiny_tokenizer, data_args(tiny_data_dir))
    gold = {tuple(ids) for ids in mt.eval_sets["question_gold"]["input_ids"]}
    train = {tuple(ids) for ids in mt.train["input_ids"]}
    assert not gold & train


@pytest.mark.parametrize("teacher", ["heuristic", "dialog", "switchboard"])
def test_no_gold_text_or_label_reaches_training_with_any_teacher(tiny_data_dir, tiny_tokenizer, teacher):
    """Both gold dialogue sets, both views, stay evaluation-only whatever the teacher and pool options: no gold
    utterance is a training row, and the pool's hold-out is labelled by the chosen teacher."""
    options = QuestionArguments(
        question_pool_per_source=100, question_holdout_fraction=0.2, question_teacher=teacher,
        question_trap_rows=20, question_rephrase_rows=20, question_declarative_rows=20,
    )  # fmt: skip
    tasks = mtdata.get_tasks(["question"], pools={"question": question.QuestionPool(options)})
    mt = mtdata.build_data(tasks, tiny_tokenizer, data_args(tiny_data_dir))
    train = {tuple(ids) for ids in mt.train["input_ids"]}
    gold_sets = ("question_gold", "question_gold_noqm", "question_swda", "question_swda_noqm")
    assert set(gold_sets) <= set(mt.eval_sets)
    for name in gold_sets:
        assert not {tuple(ids) for ids in mt.eval_sets[name]["input_ids"]} & train, name
    held = mt.eval_texts["question"]  # the pool's hold-out carries the chosen teacher's labels
    assert mt.eval_sets["question"]["labels"] == [question.question_label_fn(teacher)(t) for t in held]


@pytest.mark.parametrize("teacher", ["dialog", "switchboard"])
def test_training_rows_do_not_depend_on_the_gold_sets(tiny_data_dir, tiny_tokenizer, teacher):
    """The training rows, texts and labels, are the same whether the gold sets are read or not: nothing of them
    (text, label, count) reaches training, whatever the pool options."""
    options = QuestionArguments(
        question_pool_per_source=100, question_holdout_fraction=0.2, question_teacher=teacher,
        question_trap_rows=20, question_rephrase_rows=20, question_declarative_rows=20, question_backchannel_rows=20,
        question_strip_qmark_prob=0.3, question_combine_prob=0.3,
    )  # fmt: skip
    tasks = mtdata.get_tasks(["sentiment", "question"], pools={"question": question.QuestionPool(options)})
    built = {}
    for gold_eval in (True, False):
        built[gold_eval] = mtdata.build_data(tasks, tiny_tokenizer, data_args(tiny_data_dir, gold_eval=gold_eval))
    assert "question_swda" in built[True].eval_sets and "question_swda" not in built[False].eval_sets
    for column in ("input_ids", "labels", "task_ids"):
        assert built[True].train[column][:] == built[False].train[column][:], column


def test_truncation_is_counted_in_one_warning(tiny_data_dir, tiny_tokenizer, caplog):
    tasks = get_tasks(["sentiment"])
    with caplog.at_level("WARNING", logger="data"):
        mt = mtdata.build_data(tasks, tiny_tokenizer, data_args(tiny_data_dir, max_seq_length=8))
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1  # one for the whole run, counting per split
    assert "sentiment/train: " in warnings[0]
    assert max(mt.train["length"]) == 8
    # The closing [SEP] is kept on truncated rows.
    assert all(ids[-1] == tiny_tokenizer.sep_token_id for ids in mt.train["input_ids"])


# ---- collator ----


def test_collator_pads_and_stacks():
    collator = MultiTaskCollator(pad_token_id=0)
    batch = collator(
        [
            {"input_ids": [101, 7, 102], "task_ids": 1, "labels": 0, "length": 3},
            {"input_ids": [101, 102], "task_ids": 1, "labels": 1, "length": 2},
        ]
    )
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["task_ids"].tolist() == [1, 1]
    assert batch["labels"].tolist() == [0, 1]
    assert batch["input_ids"].dtype == torch.long


def test_collator_pad_to_multiple_of():
    batch = MultiTaskCollator(pad_token_id=0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3]}])
    assert batch["input_ids"].shape == (1, 8)
    assert "labels" not in batch


def test_collator_pad_to_buckets():
    collator = MultiTaskCollator(pad_token_id=9, pad_to_buckets=[32, 8, 16])  # any order
    widths = {n: collator([{"input_ids": [1] * n}, {"input_ids": [2]}])["input_ids"].shape[1] for n in (1, 8, 9, 17, 32)}
    assert widths == {1: 8, 8: 8, 9: 16, 17: 32, 32: 32}
    # Longer than every bucket: its own length, then rounded by pad_to_multiple_of when given.
    assert collator([{"input_ids": [1] * 33}])["input_ids"].shape == (1, 33)
    rounded = MultiTaskCollator(pad_token_id=9, pad_to_buckets=[8, 16], pad_to_multiple_of=8)
    assert rounded([{"input_ids": [1] * 17}])["input_ids"].shape == (1, 24)
    batch = collator([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3] + [9] * 5, [4] + [9] * 7]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1]


def test_collator_rejects_bad_padding_settings():
    with pytest.raises(ValueError, match="pad_to_buckets must hold positive lengths"):
        MultiTaskCollator(pad_to_buckets=[0, 8])
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive length"):
        MultiTaskCollator(pad_to_multiple_of=-8)


def naive_pad(rows, pad_id, multiple):
    width = max(len(r) for r in rows)
    if multiple:
        width = math.ceil(width / multiple) * multiple
    ids = [r + [pad_id] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("multiple", [None, 8])
@pytest.mark.parametrize("lengths", [(1,), (5, 5, 5), (3, 17, 1, 9, 64, 2)])
def test_collator_pads_like_the_naive_loop(lengths, multiple):
    rng = np.random.default_rng(len(lengths))
    features = [
        {"input_ids": rng.integers(1, 1000, n).tolist(), "task_ids": i % 2, "labels": i % 3, "length": n}
        for i, n in enumerate(lengths)
    ]
    got = mtdata.MultiTaskCollator(pad_token_id=7, pad_to_multiple_of=multiple)(features)
    ids, mask = naive_pad([f["input_ids"] for f in features], 7, multiple)
    assert torch.equal(got["input_ids"], ids) and got["input_ids"].dtype == torch.long
    assert torch.equal(got["attention_mask"], mask) and got["attention_mask"].dtype == torch.long
    assert got["task_ids"].tolist() == [i % 2 for i in range(len(lengths))]
    assert got["labels"].tolist() == [i % 3 for i in range(len(lengths))]


# ---- custom tasks from the task's own files ----

TREC = "trec/train.parquet"


def trec_file(shared_data_dir, path, rows: int, start: int = 0):
    """TREC's coarse classes as a user's file: text and the class *name* (ABBR, DESC, ...), a slice of the mirror."""
    import datasets

    ds = datasets.Dataset.from_parquet(str(shared_data_dir / TREC))
    names = ds.features["coarse_label"].names
    part = ds.select(range(start, start + rows))
    frame = pd.DataFrame({"question": part["text"], "coarse": [names[i] for i in part["coarse_label"]]})
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=path.suffix == ".jsonl")
    return frame


def topic(**overrides) -> dict:
    return {"name": "topic", "text_column": "question", "label_column": "coarse", **overrides}


@pytest.mark.parametrize("ext", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_custom_task_files_need_no_dataset_and_map_string_labels(shared_data_dir, tmp_path, ext):
    train_path, eval_path = tmp_path / f"train.{ext}", tmp_path / f"dev.{ext}"
    frame = trec_file(shared_data_dir, train_path, 60)
    trec_file(shared_data_dir, eval_path, 20, start=60)
    specs = mtdata.parse_task_definitions([topic(train_file=str(train_path), validation_file=str(eval_path))])
    (task,) = mtdata.check_custom_tasks(mtdata.get_tasks(["topic"], specs), data_dir=None)
    assert task.label_names == tuple(sorted(set(frame["coarse"])))  # names from the data, sorted
    assert [e.name for e in task.eval] == ["topic"] and task.eval[0].source.split == "validation"
    texts, labels = mtdata.read_source(task.train[0], task, None)
    assert texts == list(frame["question"])
    assert [task.label_names[i] for i in labels] == list(frame["coarse"])


def test_given_label_names_fix_the_class_ids(shared_data_dir, tmp_path):
    path = tmp_path / "train.csv"
    frame = trec_file(shared_data_dir, path, 60)
    names = ["NUM", "LOC", "HUM", "ENTY", "DESC", "ABBR"]  # not sorted: this order is the id order
    specs = mtdata.parse_task_definitions([topic(data_files={"train": str(path)}, label_names=names)])
    (task,) = mtdata.check_custom_tasks(mtdata.get_tasks(["topic"], specs), data_dir=None)
    _, labels = mtdata.read_source(task.train[0], task, None)
    assert labels == [names.index(c) for c in frame["coarse"]]


def test_a_class_name_outside_label_names_names_the_row(shared_data_dir, tmp_path):
    path = tmp_path / "train.csv"
    frame = trec_file(shared_data_dir, path, 30)
    frame.loc[7, "coarse"] = "NUMM"
    frame.to_csv(path, index=False)
    names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    specs = mtdata.parse_task_definitions([topic(train_file=str(path), label_names=names)])
    with pytest.raises(ValueError, match=r"train\.csv: column 'coarse' row 7 is 'NUMM', a class name outside task "
                       r"'topic''s label_names .* Did you mean 'NUM'\?"):  # fmt: skip
        mtdata.check_custom_tasks(mtdata.get_tasks(["topic"], specs), data_dir=None)


@pytest.mark.parametrize(
    "definition, message",
    [
        (topic(train_file="data/trian.csv"), r"train_file 'data/trian\.csv' does not exist .*Did you mean .*train\.csv"),
        (topic(train_file="train.xlsx"), r"train_file 'train\.xlsx' has extension 'xlsx'; use one of \['\.parquet'"),
        (topic(), r"give the task's data: dataset \(a Hub id.*or train_file"),
        (topic(data_files={"train": "data/train.csv"}, eval_split="test"), r"eval_split 'test' has no file"),
    ],
)
def test_custom_task_definitions_with_bad_files_are_refused(tmp_path, monkeypatch, definition, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("question,coarse\nwhat is it ?,DESC\nwho ?,HUM\n")
    monkeypatch.chdir(tmp_path)  # relative paths start at the working directory
    with pytest.raises(ValueError, match=message):
        mtdata.parse_task_definitions([definition])


def test_custom_sources_fail_before_any_builtin_task_loads(
    shared_data_dir, tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch
):
    """A typo'd file fails while parsing; a bad row of an existing file fails after reading only that file."""
    import json

    import train
    from helpers import tiny_argv

    loaded = []
    real = mtdata.load_source
    monkeypatch.setattr(mtdata, "load_source", lambda src, data_dir: loaded.append(src.dataset) or real(src, data_dir))
    out = tmp_path / "out"
    missing = json.dumps([topic(train_file=str(tmp_path / "trec_train.csv"))])
    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--tasks", "sentiment", "topic", "--task_definitions", missing)
    with pytest.raises(ValueError, match=r"train_file '.*trec_train\.csv' does not exist"):
        train.main(argv)
    assert loaded == [] and not out.exists()

    path = tmp_path / "train.csv"
    frame = trec_file(shared_data_dir, path, 30)
    frame.loc[3, "coarse"] = "PLACE"
    frame.to_csv(path, index=False)
    names = json.dumps([topic(train_file=str(path), label_names=["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])])
    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--tasks", "sentiment", "topic", "--task_definitions", names)
    with pytest.raises(ValueError, match=r"row 3 is 'PLACE'"):
        train.main(argv)
    assert loaded and set(loaded) == {"topic"}  # SST-2 (the built-in sentiment task) was never read
    assert not out.exists()


def test_custom_task_from_a_csv_records_its_label_names_in_the_model(
    shared_data_dir, tiny_encoder_dir, tiny_data_dir, tmp_path, monkeypatch
):
    import json

    from helpers import run_main, tiny_argv

    train_path, eval_path = tmp_path / "trec_train.csv", tmp_path / "trec_test.csv"
    frame = trec_file(shared_data_dir, train_path, 200)
    trec_file(shared_data_dir, eval_path, 40, start=200)
    definition = json.dumps([topic(train_file=str(train_path), validation_file=str(eval_path))])
    out = tmp_path / "out"
    argv = tiny_argv(tiny_encoder_dir, tiny_data_dir, out, "--tasks", "topic", "--task_definitions", definition,
                     "--max_steps", "2")  # fmt: skip
    trainer, metrics = run_main(monkeypatch, argv)
    names = sorted(set(frame["coarse"]))
    saved = json.loads((out / "config.json").read_text())
    id2label = {str(i): name for i, name in enumerate(names)}
    assert saved["tasks"] == [{"name": "topic", "num_labels": len(names), "id2label": id2label}]
    assert trainer.model.heads["topic"].out_features == len(names)
    final = metrics["final"]["topic"]
    assert {"accuracy", "f1", "precision_macro", "recall_macro"} <= set(final)
    assert {f"f1_{i}" for i in range(len(names))} <= set(final)
    assert "f1_pos" not in final  # class 1 alone says nothing about a multi-class task


def test_label_names_from_a_classlabel_column_or_from_integer_ids(shared_data_dir, tmp_path):
    hub_style = {"name": "topic", "dataset": "CogComp/trec", "mirror": "trec", "eval_split": "test",
                 "text_column": "text", "label_column": "coarse_label"}  # fmt: skip
    ids = tmp_path / "ids.jsonl"
    pd.DataFrame({"text": ["what ?", "who ?", "a film", "bad"], "y": [2, 0, 1, 2]}).to_json(ids, orient="records", lines=True)
    specs = mtdata.parse_task_definitions([hub_style, {"name": "ids", "train_file": str(ids), "text_column": "text",
                                                       "label_column": "y"}])  # fmt: skip
    tasks = mtdata.check_custom_tasks(mtdata.get_tasks(["topic", "ids"], specs), data_dir=str(shared_data_dir))
    assert tasks[0].label_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")  # the mirror's ClassLabel names
    assert tasks[1].label_names == ("0", "1", "2")
    assert mtdata.read_source(tasks[1].train[0], tasks[1], None)[1] == [2, 0, 1, 2]


# ---- inputs that used to load silently: refused, naming where ----


def _topic(**overrides) -> dict:
    """A custom task read from <data_dir>/topic/<split>.<ext>."""
    return {"name": "topic", "dataset": "someone/topic", "mirror": "topic", "text_column": "text",
            "label_column": "label", "label_names": ["neg", "pos"], **overrides}  # fmt: skip


def _read(data_dir, definition=None):
    spec = mtdata.parse_task_definitions([definition or _topic()])["topic"]
    return mtdata.read_source(spec.train[0], spec, str(data_dir))


def test_read_dataset_gives_the_checked_rows_and_the_other_columns(tmp_path):
    _write(tmp_path, "train.csv", b"text,label,speaker\nfine film,pos,a\ndull film,neg,b\n")
    spec = mtdata.parse_task_definitions([_topic()])["topic"]
    dataset, texts, labels = mtdata.read_dataset(spec.train[0], spec, str(tmp_path))
    assert (texts, labels) == (["fine film", "dull film"], [1, 0]) == _read(tmp_path)
    assert dataset["speaker"][:] == ["a", "b"]  # what bench/question_rules.py takes dialog_id from
    _write(tmp_path, "train.csv", b"text,label\nfine film,pos\n,neg\n")
    with pytest.raises(ValueError, match=r"train\.csv.*row 1"):  # the same checks as training, naming file and row
        mtdata.read_dataset(spec.train[0], spec, str(tmp_path))


def _write(data_dir, name: str, content: bytes):
    (data_dir / "topic").mkdir(parents=True, exist_ok=True)
    (data_dir / "topic" / name).write_bytes(content)


def test_csv_unterminated_quote_is_refused_not_merged(tmp_path):
    lines = ["text,label"] + [f"film {i},{i % 2}" for i in range(3000)]
    lines[41] = '"an unterminated quote,1'  # joins the following lines into one field until the next quote
    lines[45] = 'film "44 with a quote",0'
    _write(tmp_path, "train.csv", ("\n".join(lines) + "\n").encode())
    with pytest.raises(ValueError, match=r"topic/train\.csv: column 'text' row 40 holds a line break \('an unterminated "
                       r"quote,1\\nfilm 41,1.*usually an unterminated quote .* Close the quote, or remove line breaks"):
        _read(tmp_path)


def test_tsv_field_with_a_line_break_is_refused_and_jsonl_keeps_it(tmp_path):
    _write(tmp_path, "train.tsv", b'text\tlabel\ngood\t1\n"two\nlines"\t0\n')
    with pytest.raises(ValueError, match=r"train\.tsv: column 'text' row 1 holds a line break \('two\\nlines'"):
        _read(tmp_path)
    (tmp_path / "topic" / "train.tsv").unlink()
    _write(tmp_path, "train.jsonl", b'{"text": "good", "label": 1}\n{"text": "two\\nlines", "label": 0}\n')
    assert _read(tmp_path) == (["good", "two\nlines"], [1, 0])  # JSON says where a text ends
    (tmp_path / "topic" / "train.jsonl").unlink()
    _write(tmp_path, "train.csv", b'text,label\r\ngood,1\r\n"quoted, with a comma",0\r\n')
    assert _read(tmp_path) == (["good", "quoted, with a comma"], [1, 0])  # Windows line ends are no line breaks


@pytest.mark.parametrize(
    "text, codes",
    [("\x00\x00\x00", r"U\+0000"), ("\u200b\u200b", r"U\+200B"), ("\x01 \x7f", r"U\+0001, U\+0020, U\+007F"),
     ("\ufeff\u200d", r"U\+200D, U\+FEFF")],
    ids=["NUL bytes", "zero-width spaces", "control characters", "BOM and zero-width joiner"],
)  # fmt: skip
def test_text_without_a_visible_character_is_refused(tmp_path, text, codes):
    frame = pd.DataFrame({"text": ["a good film", "bad", text], "label": [1, 0, 1]})
    (tmp_path / "topic").mkdir()
    frame.to_parquet(tmp_path / "topic" / "train.parquet")
    with pytest.raises(ValueError, match=rf"train\.parquet: column 'text' row 2 has no visible character: it holds "
                       rf"only {codes} \(control, format or zero-width characters"):  # fmt: skip
        _read(tmp_path)


def test_texts_of_symbols_or_any_script_are_visible():
    mtdata.check_texts(["?", "🙂", "日本語", "١٢٣", "a\x00b", "\u200bok"], "f", "text")


def test_duplicate_key_in_a_task_definition_json_is_refused():
    with pytest.raises(ValueError, match=r"task_definitions: key 'label_column' appears twice in one mapping of the "
                       r"definition 'topic'; only the last value would count"):  # fmt: skip
        mtdata.parse_task_definitions(
            '[{"name": "topic", "dataset": "d/topic", "text_column": "text", "label_column": "label", '
            '"label_column": "other", "label_names": ["a", "b"]}]'
        )


@pytest.mark.parametrize(
    "overrides, message",
    [({"mirror": "/etc"}, r"mirror '/etc' must be a folder inside --data_dir: a relative path with no '\.\.'"),
     ({"mirror": "../outside"}, r"mirror '\.\./outside' must be a folder inside --data_dir"),
     ({"mirror": "topic/../../x"}, r"mirror 'topic/\.\./\.\./x' must be a folder inside --data_dir"),
     ({"mirror": None, "dataset": "someone/.."}, r"mirror '\.\.' must be a folder inside --data_dir"),
     ({"train_split": "../../etc/passwd"}, r"split '\.\./\.\./etc/passwd' must be a file name \(no '/'"),
     ({"eval_split": ".."}, r"split '\.\.' must be a file name")],
    ids=["absolute mirror", "mirror with ..", "mirror escaping through ..", "dataset id ending in ..",
         "train split with a path", "eval split .."],
)  # fmt: skip
def test_custom_task_paths_must_stay_inside_data_dir(overrides, message):
    with pytest.raises(ValueError, match=r"task_definitions\[0\] \('topic'\): " + message):
        mtdata.parse_task_definitions([_topic(**overrides)])


def test_symlinks_out_of_data_dir_are_refused(tmp_path):
    data_dir, outside = tmp_path / "data", tmp_path / "outside"
    (outside / "topic").mkdir(parents=True)
    pd.DataFrame({"text": ["a good film", "bad"], "label": [1, 0]}).to_parquet(outside / "topic" / "train.parquet")
    data_dir.mkdir()
    (data_dir / "topic").symlink_to(outside / "topic", target_is_directory=True)
    with pytest.raises(ValueError, match=rf"--data_dir '{data_dir}': {data_dir}/topic \(dataset 'someone/topic' split "
                       rf"'train'\) resolves to {outside}/topic, outside --data_dir \(through a symbolic link\)"):
        _read(data_dir)
    (data_dir / "topic").unlink()
    (data_dir / "topic").mkdir()
    (data_dir / "topic" / "train.parquet").symlink_to(outside / "topic" / "train.parquet")
    with pytest.raises(ValueError, match=r"topic/train\.parquet \(dataset 'someone/topic' split 'train'\) resolves to "
                       rf"{outside}/topic/train\.parquet, outside --data_dir"):  # fmt: skip
        _read(data_dir)
    # A link that stays inside --data_dir is fine.
    (data_dir / "topic" / "train.parquet").unlink()
    (data_dir / "real").mkdir()
    shutil.copy(outside / "topic" / "train.parquet", data_dir / "real" / "train.parquet")
    (data_dir / "topic" / "train.parquet").symlink_to(data_dir / "real" / "train.parquet")
    assert _read(data_dir) == (["a good film", "bad"], [1, 0])
