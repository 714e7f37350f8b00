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
    assert set(mt.eval_sets) == {"sentiment", "question", "question_gold", "question_gold_noqm"}
    assert mt.eval_tasks == {
        "sentiment": "sentiment",
        "question": "question",
        "question_gold": "question",
        "question_gold_noqm": "question",
    }
    assert len(mt.eval_sets["question"]) == 40
    assert len(mt.eval_sets["question_gold"]) == 150  # gold sets are never capped
    assert all(length <= 32 for length in mt.train["length"])
    assert not any("?" in t for t in mt.eval_texts["question_gold_noqm"])


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


# ---- inputs that used to load silently: refused, naming where ----


def _topic(**overrides) -> dict:
    """A custom task read from <data_dir>/topic/<split>.<ext>."""
    return {"name": "topic", "dataset": "someone/topic", "mirror": "topic", "text_column": "text",
            "label_column": "label", "label_names": ["neg", "pos"], **overrides}  # fmt: skip


def _read(data_dir, definition=None):
    spec = mtdata.parse_task_definitions([definition or _topic()])["topic"]
    return mtdata._read_source(spec.train[0], spec, str(data_dir))


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
