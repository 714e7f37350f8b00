"""Tasks, data loading, the question heuristic, the multi-task batch sampler and the collator.

A task is a name, its label names and where its text comes from. Every source is a Hub dataset id with
a mirror folder name: with `--data_dir DIR` the split is read from `DIR/<mirror>/<split>.parquet` (or
.csv/.tsv/.jsonl/.json), otherwise from the Hub. The same config therefore runs online and offline.

Default tasks:
- `sentiment`: GLUE SST-2 (`stanfordnlp/sst2`), train on `train`, evaluate on `validation`.
- `question`: weak supervision. A pool of SST-2 sentences (statements) and TREC questions (`CogComp/trec`),
  labelled by `is_question_heuristic` only; a held-out part of the pool is the task's validation split.
  DailyDialog's gold dialog acts (mirror only) are an extra evaluation set, never training data.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

SAMPLING_STRATEGIES = ("round_robin", "proportional", "temperature")
DATA_EXTENSIONS = {"parquet": "parquet", "csv": "csv", "tsv": "csv", "jsonl": "json", "json": "json"}

# ---------------------------------------------------------------------------------------------------------
# The question heuristic (the teacher of the `question` task)
# ---------------------------------------------------------------------------------------------------------

WH_WORDS = frozenset("what how why who whom whose where when which".split())
AUXILIARIES = frozenset(
    "is are am was were do does did can could will would shall should may might must have has had "
    "isn't aren't wasn't weren't don't doesn't didn't can't couldn't won't wouldn't shouldn't haven't hasn't "
    "hadn't mustn't ca wo".split()  # "ca n't" / "wo n't" as SST-2 and DailyDialog tokenize them
)
# "what a film !", "how nice of you ." : wh-word + these opens an exclamation, not a question.
_EXCLAMATIVE_NEXT = frozenset("a an".split())
_TOKEN = re.compile(r"[a-z']+")


def is_question_heuristic(text: str) -> bool:
    """The weak labeller: a sentence is a question if it ends with `?`, or if it opens with a wh-word or an
    auxiliary verb and is not closed as a statement or exclamation.

    Refinements over the plain rule (each one pinned by tests/test_data.py):
    - a final `?` (ignoring closing quotes/brackets) always wins;
    - "what a ..."/"what an ..." open exclamations ("what a film !");
    - a sentence ending in `!` is an exclamation ("how nice !");
    - a wh-opening that ends in `.` is a statement ("when it ends , you sigh .", "what i liked was the cast .");
    - a wh-word followed by a comma is an interjection, not a question ("well , what , it 's fine .").
    """
    stripped = text.strip().rstrip("\"')]} ")
    if not stripped:
        return False
    if stripped.endswith("?"):
        return True
    words = _TOKEN.findall(stripped.lower())
    if not words:
        return False
    first = words[0]
    if first not in WH_WORDS and first not in AUXILIARIES:
        return False
    if stripped.endswith("!"):
        return False
    if first in WH_WORDS:
        if len(words) > 1 and words[1] in _EXCLAMATIVE_NEXT:
            return False
        if stripped.endswith("."):
            return False
    return True


def reference_rule_wh_or_qmark(text: str) -> bool:
    """The simplest rule quoted in the data README: ends with `?` or starts with what/how.

    Read as a raw string prefix ("however" counts), which reproduces the README's reference F1 (0.854 as
    written, 0.350 with `?` removed, on DailyDialog validation).
    """
    stripped = text.strip()
    return stripped.endswith("?") or stripped.lower().startswith(("what", "how"))


# The dialog teacher (`question_teacher: dialog`): DailyDialog-style dialog acts, where a question asks for
# information and a request or suggestion phrased as a question ("can you help me ?") is a directive.
_LEAD_WORDS = frozenset(
    "well oh so ok okay yes yeah no nope and but or then now hi hello hey excuse me sorry um mmm mmmm er ah uh "
    "right sir madam really listen look actually anyway alright all dear honey".split()
)
# After an auxiliary, one of these makes a yes/no question ("is there ...", "don't you ..."); anything else is a
# fragment or an imperative ("is pretty funny", "don't worry", "have a nice day").
_SUBJECTS = frozenset(
    "i you he she it we they there this that these those anyone anybody someone somebody everyone everybody "
    "anything something everything nobody your my his her our their its".split()
)
_REQUEST_OPENERS = tuple(
    tuple(opener.split())
    for opener in (
        "can you", "could you", "would you", "will you", "won't you", "can we", "could we", "could i",
        "shall we", "shall i", "why don't", "why not", "how about", "may i", "do you mind",
    )
)
# "how nice of you" opens an exclamation; "how much", "how long" open questions.
_EXCLAMATIVE_HOW = frozenset(
    "nice wonderful great lovely beautiful sweet kind terrible awful funny interesting strange sad exciting "
    "stupid silly cute cool amazing romantic clever rude thoughtful generous marvelous".split()
)
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")
_APOSTROPHE = re.compile(r"(\w) ?['’] ?(t|s|re|ve|ll|d|m)\b")  # "don ' t" / "don ’ t" -> "don't"
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*|n't")


def _words(clause: str) -> list[str]:
    words: list[str] = []
    for word in _WORD.findall(_APOSTROPHE.sub(r"\1'\2", clause.lower())):
        if word == "n't" and words:  # "do n't" / "ca n't" as SST-2 and DailyDialog tokenize them
            words[-1] = {"ca": "can", "wo": "won"}.get(words[-1], words[-1]) + "n't"
        else:
            words.append(word)
    while len(words) > 1 and words[0] in _LEAD_WORDS:  # "well , how long ..." is a how-question
        words.pop(0)
    return words


def _clause_kind(words: list[str]) -> str:
    """'request', 'question' or 'other', from the opening words of one comma-separated clause."""
    if any(tuple(words[: len(opener)]) == opener for opener in _REQUEST_OPENERS):
        return "request"
    if not words:
        return "other"
    first, second = words[0], (words[1] if len(words) > 1 else "")
    if first.split("'")[0] in WH_WORDS:  # "what's the problem", "how's it going"
        first = first.split("'")[0]
    if first in WH_WORDS:
        if second in _EXCLAMATIVE_NEXT or (first == "how" and second in _EXCLAMATIVE_HOW):
            return "other"
        return "question"
    if (first in AUXILIARIES or first.endswith("n't")) and second in _SUBJECTS:
        return "question"
    return "other"


def _sentence_is_question(sentence: str) -> bool:
    stripped = sentence.strip().rstrip("\"')]} ")
    if not stripped:
        return False
    ends_with_qmark = stripped.endswith("?")
    if not ends_with_qmark and stripped[-1] in ".!":
        return False  # closed as a statement or an exclamation, whatever its opening
    for clause in stripped.split(","):
        kind = _clause_kind(_words(clause))
        if kind != "other":  # the first clause with a question or request opening decides
            return kind == "question"
    return ends_with_qmark  # "you did what ?": a declarative question


def is_question_dialog(text: str) -> bool:
    """The dialog teacher: is this utterance (one or more sentences) a question, in the sense of a dialog act?

    Refinements over `is_question_heuristic`, for conversational text (each pinned by tests/test_question.py):
    - an utterance is a question if any of its sentences is ("Good morning , sir . Is there a bank near here ?");
    - leading discourse words are skipped ("well , how far is it"), and a later comma clause can open the
      question ("if I buy two , can I get a discount");
    - a request or suggestion phrased as a question is a directive, not a question: "can you / could you /
      would you / will you ...", "shall we", "why don't we", "how about", "may I";
    - an auxiliary opens a question only before a subject ("is there", "don't you"), not in fragments or
      imperatives ("is pretty funny", "don't worry");
    - a sentence closed by `.` or `!` is a statement or exclamation, whatever its first word.
    """
    return any(_sentence_is_question(s) for s in _SENTENCE.findall(text))


QUESTION_TEACHERS: dict[str, Callable[[str], bool]] = {
    "heuristic": is_question_heuristic,
    "dialog": is_question_dialog,
}


def strip_question_marks(text: str) -> str:
    """The unpunctuated view of a text: every `?` removed, spaces tidied."""
    return " ".join(text.replace("?", " ").split())


# ---------------------------------------------------------------------------------------------------------
# Task definitions
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One split of one dataset. `dataset` is the Hub id; `mirror` the folder under `--data_dir`."""

    dataset: str
    mirror: str
    split: str
    text_column: str
    label_column: str | None = None  # None: labels come from the task's label_fn
    transform: Callable[[str], str] | None = None  # applied to the text before labelling/tokenizing

    def describe(self, data_dir: str | None) -> str:
        if data_dir is None:
            return f"{self.dataset} [{self.split}]"
        folder = Path(data_dir) / self.mirror
        found = [folder / f"{self.split}.{ext}" for ext in DATA_EXTENSIONS]
        found = [path for path in found if path.is_file()]
        return str(found[0] if found else folder / f"{self.split}.*")  # the file the error is about


@dataclass(frozen=True)
class EvalSource:
    name: str  # the metric prefix: eval_<name>_accuracy
    source: Source
    mirror_only: bool = False  # not on the Hub in a loadable form: skipped without --data_dir


@dataclass(frozen=True)
class TaskSpec:
    name: str
    label_names: tuple[str, ...]
    train: tuple[Source, ...]
    eval: tuple[EvalSource, ...] = ()  # empty first entry: hold out part of the train pool instead
    label_fn: Callable[[str], int] | None = None
    holdout_name: str | None = None  # eval set name of the held-out part of the pool
    description: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to_config(self) -> dict:
        return {"name": self.name, "num_labels": self.num_labels, "id2label": dict(enumerate(self.label_names))}


def _question_label(text: str) -> int:
    return int(is_question_heuristic(text))


SST2_TRAIN = Source("stanfordnlp/sst2", "sst2", "train", "sentence", "label")
SST2_VALIDATION = Source("stanfordnlp/sst2", "sst2", "validation", "sentence", "label")
TREC_TRAIN = Source("CogComp/trec", "trec", "train", "text")
DAILYDIALOG = Source("li2017dailydialog/daily_dialog", "dailydialog", "validation", "text", "is_question")

TASKS: dict[str, TaskSpec] = {
    "sentiment": TaskSpec(
        name="sentiment",
        label_names=("negative", "positive"),
        train=(SST2_TRAIN,),
        eval=(EvalSource("sentiment", SST2_VALIDATION),),
        description="Binary sentiment of movie-review text (GLUE SST-2).",
    ),
    "question": TaskSpec(
        name="question",
        label_names=("not_question", "question"),
        train=(Source("stanfordnlp/sst2", "sst2", "train", "sentence"), TREC_TRAIN),
        eval=(
            EvalSource("question_gold", DAILYDIALOG, mirror_only=True),
            EvalSource(
                "question_gold_noqm",
                replace(DAILYDIALOG, transform=strip_question_marks),
                mirror_only=True,
            ),
        ),
        label_fn=_question_label,
        holdout_name="question",
        description="Is the sentence a question? Trained on heuristic labels of SST-2 and TREC text; "
        "measured against gold dialog acts of DailyDialog.",
    ),
}


def get_tasks(names: Sequence[str], custom: dict[str, TaskSpec] | None = None) -> list[TaskSpec]:
    """The TaskSpecs named by `--tasks`, from the built-in TASKS and the config's `task_definitions`."""
    known = {**TASKS, **(custom or {})}
    if not names:
        raise ValueError(f"No tasks given; choose from {sorted(known)} (e.g. --tasks sentiment question).")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise ValueError(f"Duplicate task names {duplicates} in --tasks; list each task once.")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"Unknown task(s) {unknown}; known tasks: {sorted(known)}. Declare a new task under "
            f"`task_definitions` in the YAML config."
        )
    return [known[n] for n in names]


TASK_DEFINITION_KEYS = {
    "name": "task name (also the head name and the eval metric prefix)",
    "dataset": "Hub dataset id, read when --data_dir is not set",
    "mirror": "folder under --data_dir (default: the last part of the dataset id)",
    "train_split": "split to train on (default: train)",
    "eval_split": "split to evaluate on (default: none)",
    "text_column": "column holding the text",
    "label_column": "column holding integer class ids 0..num_labels-1",
    "label_names": "list of class names, in class-id order",
    "num_labels": "number of classes (optional; must equal len(label_names))",
}
_REQUIRED_DEFINITION_KEYS = ("name", "dataset", "text_column", "label_column")


def parse_task_definitions(value) -> dict[str, TaskSpec]:
    """Turn the config's `task_definitions` (a list of mappings, or that list as a JSON string) into TaskSpecs.

    Example (YAML):
        task_definitions:
          - {name: topic, dataset: CogComp/trec, mirror: trec, train_split: train, eval_split: test,
             text_column: text, label_column: coarse_label, label_names: [ABBR, DESC, ENTY, HUM, LOC, NUM]}
    """
    if value is None or value == "" or value == []:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"task_definitions: not a valid JSON list of mappings ({err}).") from err
    if not isinstance(value, list):
        raise ValueError(f"task_definitions: expected a list of mappings, got {type(value).__name__}.")
    specs: dict[str, TaskSpec] = {}
    for index, item in enumerate(value):
        where = f"task_definitions[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping with keys {list(TASK_DEFINITION_KEYS)}, got {item!r}.")
        where = f"{where} ({item.get('name')!r})" if "name" in item else where
        for key in item:
            if key not in TASK_DEFINITION_KEYS:
                close = difflib.get_close_matches(str(key), TASK_DEFINITION_KEYS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{where}: unknown key {key!r}.{hint} Allowed keys: {list(TASK_DEFINITION_KEYS)}.")
        missing = [k for k in _REQUIRED_DEFINITION_KEYS if not item.get(k)]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {missing}; add them to the definition.")
        for key in ("name", "dataset", "mirror", "train_split", "eval_split", "text_column", "label_column"):
            if key in item and item[key] is not None and not (isinstance(item[key], str) and item[key].strip()):
                raise ValueError(f"{where}: {key} must be a non-empty string, got {item[key]!r}.")
        name = item["name"]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            # The name keys a head in an nn.ModuleDict and prefixes metric names: no dots, spaces or dashes.
            raise ValueError(f"{where}: task name {name!r} must be letters, digits and underscores, e.g. 'topic'.")
        reserved = set(TASKS) | {e.name for t in TASKS.values() for e in t.eval}
        if name in reserved:
            raise ValueError(
                f"{where}: task name {name!r} is taken by a built-in task or eval set {sorted(reserved)}; "
                f"choose another name."
            )
        if name in specs:
            raise ValueError(f"{where}: duplicate task name {name!r}; each definition needs a unique name.")
        num_labels = item.get("num_labels")
        if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)):
            raise ValueError(f"{where}: num_labels must be an integer, got {num_labels!r}.")
        label_names = item.get("label_names")
        if label_names is None:
            if num_labels is None:
                raise ValueError(f"{where}: give label_names (a list of class names) or num_labels.")
            label_names = [f"LABEL_{i}" for i in range(num_labels)]
        if not isinstance(label_names, list) or not all(isinstance(n, (str, int)) for n in label_names):
            raise ValueError(f"{where}: label_names must be a list of class names, got {label_names!r}.")
        label_names = tuple(str(n) for n in label_names)
        if num_labels is not None and num_labels != len(label_names):
            raise ValueError(
                f"{where}: num_labels={num_labels} but label_names has {len(label_names)} entries "
                f"{list(label_names)}; list exactly one name per class (or drop num_labels)."
            )
        if len(label_names) < 2:
            raise ValueError(f"{where}: a classification task needs at least 2 classes, got {list(label_names)}.")
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"{where}: label_names {list(label_names)} repeat a name; class names must differ.")
        mirror = item.get("mirror") or item["dataset"].rstrip("/").split("/")[-1]

        def source(split: str) -> Source:
            return Source(item["dataset"], mirror, split, item["text_column"], item["label_column"])

        eval_split = item.get("eval_split")
        specs[name] = TaskSpec(
            name=name,
            label_names=label_names,
            train=(source(item.get("train_split") or "train"),),
            eval=(EvalSource(name, source(eval_split)),) if eval_split else (),
            description=f"Custom task from {item['dataset']} ({item['text_column']} -> {item['label_column']}).",
        )
    return specs


# ---------------------------------------------------------------------------------------------------------
# Loading and checking
# ---------------------------------------------------------------------------------------------------------


def load_source(source: Source, data_dir: str | None):
    """Load one split as a `datasets.Dataset`, from the mirror folder when `data_dir` is set, else the Hub."""
    import datasets

    if data_dir is not None:
        folder = Path(data_dir) / source.mirror
        if not Path(data_dir).is_dir():
            raise ValueError(f"--data_dir {data_dir!r} does not exist or is not a folder.")
        looked_for = f"{folder / (source.split + '.parquet')} (or .csv/.tsv/.jsonl/.json)"
        if not folder.is_dir():
            raise ValueError(
                f"--data_dir {data_dir!r} has no file for dataset {source.dataset!r} split {source.split!r}: it has no "
                f"folder {source.mirror!r} (looked for {looked_for}). Mirror the dataset there, or drop --data_dir "
                f"to read it from the Hub."
            )
        # A local file is no download: without this, datasets pings S3 to count one (network even with a mirror).
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        for ext, builder in DATA_EXTENSIONS.items():
            path = folder / f"{source.split}.{ext}"
            if path.is_file():
                empty_columns = _columns_if_empty(path, ext)
                if empty_columns is not None:
                    # datasets fails on empty files with unrelated errors; the caller reports "zero rows".
                    return datasets.Dataset.from_dict({c: [] for c in empty_columns})
                kwargs = {"delimiter": "\t"} if ext == "tsv" else {}
                try:
                    return datasets.load_dataset(
                        builder, data_files={source.split: str(path)}, split=source.split, **kwargs
                    )
                except Exception as err:  # datasets raises many types for unreadable files
                    raise _unreadable(path, ext, err) from err
        found = sorted(p.name for p in folder.iterdir())
        raise ValueError(
            f"--data_dir {data_dir!r} has no file for dataset {source.dataset!r} split {source.split!r}: looked for "
            f"{looked_for}; {folder} holds {found}. Add the split file, or fix the split name in the config."
        )
    try:
        return datasets.load_dataset(source.dataset, split=source.split)
    except Exception as err:
        offline = datasets.config.HF_HUB_OFFLINE or getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
        why = (
            "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and it is not cached"
            if offline
            else "the Hub could not be reached or has no such dataset/split"
        )
        raise ValueError(
            f"Could not load {source.dataset!r} split {source.split!r} from the Hub: {why} ({type(err).__name__}: "
            f"{str(err)[:300]}). Pass --data_dir with a local mirror holding {source.mirror}/{source.split}.parquet "
            f"(e.g. --data_dir ../shared/data), or connect to the Hub."
        ) from err


def _columns_if_empty(path: Path, ext: str) -> list[str] | None:
    """The column names of a data file that holds no rows, or None if it has rows (or cannot tell cheaply)."""
    if ext == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception:  # not parquet: the loader reports it
            return None
        return list(meta.schema.names) if meta.num_rows == 0 else None
    with open(path, "rb") as f:
        head = [line for line in (f.readline() for _ in range(64)) if line.strip()][:2]
        if ext in ("csv", "tsv"):
            if len(head) >= 2:
                return None
            header = head[0].decode("utf-8", errors="replace").strip() if head else ""
            return [c for c in header.split("\t" if ext == "tsv" else ",") if c]
        if not head or (ext == "json" and b"".join(head).strip() == b"[]"):
            return []
    return None


def _unreadable(path: Path, ext: str, err: BaseException) -> ValueError:
    """One clear message for a data file that exists but cannot be read; names encoding problems as such."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, UnicodeDecodeError):
        return ValueError(
            f"{path}: is not UTF-8 encoded (byte {cause.object[cause.start:cause.start + 1]!r} at offset "
            f"{cause.start} of the block being decoded: {cause.reason}). Re-save the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name}`."
        )
    detail = " <- ".join(f"{type(e).__name__}: {str(e)[:200]}" for e in _exception_chain(err) if str(e))
    return ValueError(
        f"{path}: could not be read as {ext} ({detail}). Check that the file is valid {ext}, or replace it."
    )


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def check_columns(ds, source: Source, data_dir: str | None) -> None:
    wanted = [c for c in (source.text_column, source.label_column) if c is not None]
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{source.describe(data_dir)}: missing column(s) {missing}; found {ds.column_names}. "
            f"Rename the column(s) in the file or change the task's source definition in data.py."
        )


def check_texts(texts: Sequence, where: str, column: str) -> None:
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{where}: column {column!r} row {row} is {text!r}, expected a string.")
        if not text.strip():
            raise ValueError(
                f"{where}: column {column!r} row {row} is empty or whitespace only; remove the row or fill it."
            )


def check_labels(labels: Sequence, num_labels: int, where: str, column: str) -> None:
    expected = f"expected an integer class id 0..{num_labels - 1}"
    for row, label in enumerate(labels):
        if label is None or isinstance(label, bool) or not isinstance(label, (int, np.integer, float, np.floating)):
            raise ValueError(
                f"{where}: column {column!r} row {row} is {label!r}, {expected}; fill or drop the row (text labels "
                f"must be mapped to ids in label_names order)."
            )
        if isinstance(label, (float, np.floating)) and (not math.isfinite(label) or not float(label).is_integer()):
            raise ValueError(f"{where}: column {column!r} row {row} is {label!r}, {expected}; fix or drop the row.")
    for row, label in enumerate(labels):
        if not 0 <= int(label) < num_labels:
            values = sorted({int(x) for x in labels})
            shown = values if len(values) <= 20 else values[:10] + ["..."] + values[-5:]
            raise ValueError(
                f"{where}: column {column!r} row {row} has value {label!r}, expected 0..{num_labels - 1} "
                f"(num_labels={num_labels}); the column holds the values {shown}. Fix the label, or make the "
                f"task's label_names/num_labels match the data."
            )


def check_label_feature(ds, source: Source, task: TaskSpec, where: str) -> None:
    """A ClassLabel column knows its class count: it must agree with the task's label names."""
    import datasets

    feature = ds.features.get(source.label_column)
    if isinstance(feature, datasets.ClassLabel) and feature.num_classes != task.num_labels:
        raise ValueError(
            f"{where}: column {source.label_column!r} is a ClassLabel with {feature.num_classes} classes "
            f"{feature.names}, but task {task.name!r} has num_labels={task.num_labels} {list(task.label_names)}. "
            f"Make the task's label_names match the data."
        )


def _read_source(source: Source, task: TaskSpec, data_dir: str | None) -> tuple[list[str], list[int]]:
    ds = load_source(source, data_dir)
    where = source.describe(data_dir)
    if len(ds) == 0:
        raise ValueError(f"{where}: the split has zero rows; task {task.name!r} needs data there.")
    check_columns(ds, source, data_dir)
    texts = ds[source.text_column]
    check_texts(texts, where, source.text_column)
    if source.transform is not None:
        texts = [source.transform(t) for t in texts]
    if source.label_column is not None:
        check_label_feature(ds, source, task, where)
        labels = ds[source.label_column]
        check_labels(labels, task.num_labels, where, source.label_column)
        labels = [int(x) for x in labels]
    elif task.label_fn is not None:
        labels = [task.label_fn(t) for t in texts]
    else:
        raise ValueError(f"task {task.name!r}: source {where} has no label column and the task no label_fn.")
    return texts, labels


# ---------------------------------------------------------------------------------------------------------
# Building the datasets
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MultiTaskData:
    """Tokenized data for every task: one concatenated train set plus named evaluation sets."""

    tasks: list[TaskSpec]
    train: object  # datasets.Dataset with input_ids, length, task_ids, labels; rows grouped by task
    task_sizes: list[int]  # train rows per task, in task order (rows are contiguous per task)
    eval_sets: dict[str, object] = field(default_factory=dict)  # name -> datasets.Dataset
    eval_tasks: dict[str, str] = field(default_factory=dict)  # eval set name -> task name
    eval_texts: dict[str, list[str]] = field(default_factory=dict)  # for baselines and error analysis
    samples: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # a few (text, label) per task
    truncated: dict[str, int] = field(default_factory=dict)  # "task/split" -> texts cut to max_seq_length


def _subsample(texts: list[str], labels: list[int], limit: int | None, seed: int) -> tuple[list[str], list[int]]:
    if limit is None or limit >= len(texts):
        return texts, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:limit])
    return [texts[i] for i in keep], [labels[i] for i in keep]


def augment_questions(
    texts: list[str], labels: list[int], strip_prob: float, lower_prob: float, seed: int, period_prob: float = 0.0
):
    """Noise the training text of heuristic-labelled questions so the student must learn syntax, not '?'.

    Labels are kept from the original text (the teacher saw the punctuation; the student does not always).
    `period_prob` drops the closing `.`/`!` of statements, so that `.` is no cue either.
    """
    rng = np.random.default_rng(seed)
    out = []
    for text, label in zip(texts, labels):
        if label == 1 and strip_prob > 0 and rng.random() < strip_prob:
            text = strip_question_marks(text) or text
        if label == 0 and period_prob > 0 and rng.random() < period_prob:
            text = text.rstrip().rstrip(".!").rstrip() or text
        if lower_prob > 0 and rng.random() < lower_prob:
            text = text.lower()
        out.append(text)
    return out


# Sentence forms that TREC's factoid questions lack but dialogue is full of, filled with verb phrases taken
# from TREC's how-to questions and short noun phrases from its what/who-is questions. The teacher labels each
# result; the templates carry no label.
REPHRASE_TEMPLATES = {
    "question": (
        "do you {vp} ?", "did you {vp} ?", "have you ever tried to {vp} ?", "are you going to {vp} ?",
        "should we {vp} ?", "is it hard to {vp} ?", "when do you {vp} ?", "why do you want to {vp} ?",
        "do you have {np} ?", "is {np} included ?", "what about {np} ?", "did you see {np} ?", "where is {np} ?",
        "have you heard of {np} ?", "is that {np} ?", "can I have {np} ?",
    ),
    "request": (
        "can you {vp} ?", "could you {vp} for me ?", "would you {vp} , please ?", "will you {vp} ?",
        "shall we {vp} ?", "why don't we {vp} ?", "how about we {vp} ?", "may I {vp} ?", "would you like to {vp} ?",
        "how about {np} ?", "would you like {np} ?", "could you show me {np} ?", "can you get me {np} ?",
        "may I have {np} ?", "why not {np} ?",
    ),
    "statement": (
        "I want to {vp} .", "we should {vp} .", "let's {vp} .", "you need to {vp} .", "I'd like to {vp} .",
        "I don't know how to {vp} .", "please {vp} .",
        "I'd like {np} .", "here is {np} .", "that's {np} .", "I have {np} .", "we need {np} .", "{np} , please .",
    ),
}
_HOW_TO = re.compile(
    r"^(?:how|where|when|why) (?:do|can|could|should|would) (?:i|you|we|one|people) (?P<vp>[^?]+?) ?\?$",
    re.IGNORECASE,
)
_WHAT_IS = re.compile(r"^(?:what|who) (?:is|are|was|were) (?P<np>[^?]+?) ?\?$", re.IGNORECASE)


def how_to_verb_phrases(texts: Sequence[str]) -> list[str]:
    """'How can I find a list of books ?' -> 'find a list of books' (unique, in order of first appearance)."""
    phrases = (" ".join(m["vp"].split()) for t in texts if (m := _HOW_TO.match(t.strip())))
    return list(dict.fromkeys(p for p in phrases if p))


def what_is_noun_phrases(texts: Sequence[str], max_words: int = 6) -> list[str]:
    """'What is the capital of France ?' -> 'the capital of France' (short ones only: dialogue turns are short)."""
    phrases = (" ".join(m["np"].split()) for t in texts if (m := _WHAT_IS.match(t.strip())))
    return list(dict.fromkeys(p for p in phrases if p and len(p.split()) <= max_words))


def rephrase_questions(
    verb_phrases: Sequence[str],
    n: int,
    label_fn: Callable[[str], int],
    seed: int,
    noun_phrases: Sequence[str] = (),
) -> tuple[list[str], list[int]]:
    """`n` sentences from REPHRASE_TEMPLATES (kinds drawn evenly) filled with the given phrases, each labelled by
    `label_fn`. Templates whose slot has no phrases are skipped."""
    fillers = {"vp": list(verb_phrases), "np": list(noun_phrases)}
    usable = {
        kind: [t for t in templates if fillers["vp" if "{vp}" in t else "np"]]
        for kind, templates in REPHRASE_TEMPLATES.items()
    }
    usable = {kind: templates for kind, templates in usable.items() if templates}
    if n <= 0 or not usable:
        return [], []
    rng = np.random.default_rng(seed)
    kinds = list(usable)
    texts = []
    for _ in range(n):
        templates = usable[kinds[rng.integers(len(kinds))]]
        template = templates[rng.integers(len(templates))]
        slot = "vp" if "{vp}" in template else "np"
        phrase = fillers[slot][rng.integers(len(fillers[slot]))]
        text = template.format(**{slot: phrase})
        texts.append(text[0].upper() + text[1:])
    return texts, [int(label_fn(t)) for t in texts]


def mine_traps(
    texts: Sequence[str], n: int, label_fn: Callable[[str], int], seed: int, exclude: Sequence[str] = ()
) -> tuple[list[str], list[int]]:
    """Up to `n` texts that open like a question (a wh-word or an auxiliary first) but that the teacher labels
    a statement: "what a film !", "when it ends , you sigh .", "is pretty funny". The plain student learns
    "wh-word first = question"; these rows say otherwise."""
    if n <= 0:
        return [], []
    skip = set(exclude)
    by_opening: dict[str, list[str]] = {"wh": [], "aux": []}
    for text in texts:
        words = _TOKEN.findall(text.lower())
        opening = "wh" if words and words[0] in WH_WORDS else "aux" if words and words[0] in AUXILIARIES else None
        if opening and text not in skip and not label_fn(text):
            by_opening[opening].append(text)
    # Half of each kind where possible: aux-first fragments ("is worth your time") far outnumber wh-first traps.
    rng = np.random.default_rng(seed)
    wh, aux = by_opening["wh"], by_opening["aux"]
    n_wh = min(len(wh), max(n // 2, n - len(aux)))
    traps = [wh[i] for i in np.sort(rng.permutation(len(wh))[:n_wh])]
    traps += [aux[i] for i in np.sort(rng.permutation(len(aux))[: n - n_wh])]
    return traps, [0] * len(traps)


def declarative_questions(
    texts: Sequence[str], n: int, label_fn: Callable[[str], int], seed: int, exclude: Sequence[str] = ()
) -> tuple[list[str], list[int]]:
    """Up to `n` statements of the sources turned into declarative questions by closing them with `?` instead
    of `.`/`!` ("so you 're leaving ?"), labelled by the teacher. TREC questions all open with a wh-word, so
    without these rows the student never sees a question that only its `?` marks."""
    if n <= 0:
        return [], []
    skip = set(exclude)
    # Closed sentences only: SST-2 also holds phrases ("high-minded snoozer"), which make poor questions.
    statements = [
        t for t in texts if t.rstrip().endswith((".", "!")) and "?" not in t and t not in skip and not label_fn(t)
    ]
    keep = np.sort(np.random.default_rng(seed).permutation(len(statements))[:n])
    out = [statements[i].rstrip().rstrip(".!").rstrip() + " ?" for i in keep]
    return out, [int(label_fn(t)) for t in out]


def combine_sentences(
    texts: list[str], labels: list[int], prob: float, seed: int
) -> tuple[list[str], list[int]]:
    """With probability `prob`, join a row with a random other row of the pool (either order), as dialogue turns
    join sentences ("Well , that's too far . Can you change some money ?"). The label is the larger of the two
    original labels: an utterance is a question when one of its sentences is."""
    if prob <= 0 or len(texts) < 2:
        return texts, labels
    rng = np.random.default_rng(seed)
    out_texts, out_labels = [], []
    for i, (text, label) in enumerate(zip(texts, labels)):
        if rng.random() < prob:
            j = int(rng.integers(len(texts) - 1))
            j += j >= i  # any row but this one
            first, second = (i, j) if rng.random() < 0.5 else (j, i)
            head = texts[first].rstrip()
            if head[-1] not in ".!?":
                head += " ."
            text, label = f"{head} {texts[second].strip()}", max(label, labels[j])
        out_texts.append(text)
        out_labels.append(label)
    return out_texts, out_labels


def question_label_fn(teacher: str) -> Callable[[str], int]:
    if teacher not in QUESTION_TEACHERS:
        raise ValueError(f"Unknown question_teacher {teacher!r}; choose from {sorted(QUESTION_TEACHERS)}.")
    rule = QUESTION_TEACHERS[teacher]
    return lambda text: int(rule(text))


def question_extras(
    source_texts: Sequence[str], pool: Sequence[str], label_fn: Callable[[str], int], args, seed: int
) -> tuple[list[str], list[int]]:
    """Extra weakly labelled training rows: traps mined from the sources outside the pool, and dialogue forms
    rephrased from TREC how-to questions. Both are labelled by the teacher, never by gold."""
    traps = mine_traps(source_texts, getattr(args, "question_trap_rows", 0), label_fn, seed, exclude=pool)
    rephrased = rephrase_questions(
        how_to_verb_phrases(source_texts),
        getattr(args, "question_rephrase_rows", 0),
        label_fn,
        seed,
        noun_phrases=what_is_noun_phrases(source_texts),
    )
    return traps[0] + rephrased[0], traps[1] + rephrased[1]


def build_data(tasks: list[TaskSpec], tokenizer, args, seed: int = 42) -> MultiTaskData:
    """Load, label, check and tokenize every task. `args` is train.DataArguments (duck-typed).

    Fields used: data_dir, max_seq_length, max_train_samples, max_eval_samples, question_pool_per_source,
    question_holdout_fraction, question_strip_qmark_prob, question_lowercase_prob, gold_eval; optional (defaults
    off): question_teacher, question_trap_rows, question_rephrase_rows, question_declarative_rows,
    question_combine_prob, question_strip_period_prob.
    """
    import datasets

    data = MultiTaskData(tasks=tasks, train=None, task_sizes=[])
    train_parts = []
    for task_id, task in enumerate(tasks):
        teacher = getattr(args, "question_teacher", "heuristic")
        if task.name == "question" and teacher != "heuristic":
            task = replace(task, label_fn=question_label_fn(teacher))
        texts, labels = [], []
        source_texts = []  # every row of the weakly labelled sources, for mined and rephrased extras
        for i, source in enumerate(task.train):
            t, y = _read_source(source, task, args.data_dir)
            if task.label_fn is not None and source.label_column is None:
                source_texts += t
                t, y = _subsample(t, y, args.question_pool_per_source, seed + i)
            texts += t
            labels += y
        pool_texts = list(texts)
        if task.holdout_name is not None:
            # Hold out part of the pool as the task's own validation split (heuristic labels, like training).
            order = np.random.default_rng(seed).permutation(len(texts))
            n_eval = max(1, int(round(len(texts) * args.question_holdout_fraction)))
            eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
            held_texts, held_labels = [texts[i] for i in eval_idx], [labels[i] for i in eval_idx]
            texts, labels = [texts[i] for i in train_idx], [labels[i] for i in train_idx]
            held_texts, held_labels = _subsample(held_texts, held_labels, args.max_eval_samples, seed)
            _add_eval(data, task.holdout_name, task, task_id, held_texts, held_labels, tokenizer, args)
            extra_texts, extra_labels = question_extras(source_texts, pool_texts, task.label_fn, args, seed)
            texts, labels = texts + extra_texts, labels + extra_labels
            texts, labels = combine_sentences(texts, labels, getattr(args, "question_combine_prob", 0.0), seed)
            texts = augment_questions(
                texts,
                labels,
                args.question_strip_qmark_prob,
                args.question_lowercase_prob,
                seed,
                period_prob=getattr(args, "question_strip_period_prob", 0.0),
            )
            # Added after the noise: removing their `?` would leave statements labelled as questions.
            declarative = declarative_questions(
                source_texts, getattr(args, "question_declarative_rows", 0), task.label_fn, seed, exclude=pool_texts
            )
            texts, labels = texts + declarative[0], labels + declarative[1]
        texts, labels = _subsample(texts, labels, args.max_train_samples, seed)
        if len(set(labels)) < 2:
            raise ValueError(
                f"task {task.name!r}: the training data has only class(es) {sorted(set(labels))} of "
                f"{list(task.label_names)}; a classifier needs examples of at least two classes."
            )
        data.samples[task.name] = list(zip(texts[:3], labels[:3]))
        train_parts.append(
            _tokenize(texts, labels, task_id, tokenizer, args.max_seq_length, f"{task.name}/train", data.truncated)
        )
        data.task_sizes.append(len(texts))
        for eval_source in task.eval:
            if eval_source.mirror_only and (args.data_dir is None or not args.gold_eval):
                if args.data_dir is None and args.gold_eval:
                    logger.warning(
                        "Skipping eval set %r: %s is only read from a --data_dir mirror.",
                        eval_source.name,
                        eval_source.source.dataset,
                    )
                continue
            t, y = _read_source(eval_source.source, task, args.data_dir)
            if not eval_source.mirror_only:
                t, y = _subsample(t, y, args.max_eval_samples, seed)
            _add_eval(data, eval_source.name, task, task_id, t, y, tokenizer, args)
    data.train = datasets.concatenate_datasets(train_parts)
    if sum(data.truncated.values()):
        # One warning for the whole run: long texts are expected, a warning per split would drown the log.
        logger.warning(
            "%d text(s) longer than max_seq_length=%d tokens were truncated (%s).",
            sum(data.truncated.values()),
            args.max_seq_length,
            ", ".join(f"{k}: {v}" for k, v in data.truncated.items() if v),
        )
    return data


def _add_eval(data: MultiTaskData, name, task, task_id, texts, labels, tokenizer, args) -> None:
    ds = _tokenize(texts, labels, task_id, tokenizer, args.max_seq_length, f"{task.name}/{name}", data.truncated)
    data.eval_sets[name] = ds
    data.eval_tasks[name] = task.name
    data.eval_texts[name] = texts


def _tokenize(
    texts: list[str], labels: list[int], task_id: int, tokenizer, max_length: int, what: str, truncated=None
):
    """Tokenize with a fast tokenizer through `datasets.map` (cached by fingerprint), no padding.

    Texts longer than `max_length` are cut; their count goes into `truncated[what]` (logged here if None)."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts, "labels": labels})

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        full = [len(x) for x in ids]
        # Truncate by hand to count what was cut; keep the closing special token (e.g. [SEP]).
        ids = [x if len(x) <= max_length else x[: max_length - 1] + x[-1:] for x in ids]
        return {
            "input_ids": ids,
            "length": [len(x) for x in ids],
            "full_length": full,
            "task_ids": [task_id] * len(ids),
        }

    ds = ds.map(encode, batched=True, remove_columns=["text"], desc=f"Tokenizing {what}")
    count = int(np.sum(np.asarray(ds["full_length"]) > max_length))
    if truncated is not None:
        truncated[what] = count
    elif count:
        logger.warning("%s: %d text(s) longer than %d tokens were truncated.", what, count, max_length)
    return ds.remove_columns("full_length")


# ---------------------------------------------------------------------------------------------------------
# Sampler and collator
# ---------------------------------------------------------------------------------------------------------


class MultiTaskBatchSampler(Sampler[list[int]]):
    """Yields single-task batches of indices into the concatenated train set, interleaving tasks.

    One epoch is `sum_t ceil(n_t / batch_size)` batches whatever the strategy (every example once, on
    average); the strategy only decides which task each batch comes from:
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

    def __init__(
        self,
        task_sizes: Sequence[int],
        batch_size: int,
        strategy: str = "round_robin",
        temperature: float = 2.0,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        drop_last: bool = False,
    ):
        if strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"Unknown task sampling strategy {strategy!r}; choose from {list(SAMPLING_STRATEGIES)}.")
        if temperature <= 0:
            raise ValueError(f"task_sampling_temperature must be > 0, got {temperature}.")
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
        self.strategy = strategy
        self.temperature = temperature
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
        sizes = np.asarray(self.task_sizes, dtype=float)
        if self.strategy == "round_robin":
            weights = np.ones_like(sizes)
        elif self.strategy == "proportional":
            weights = sizes
        else:
            weights = sizes ** (1.0 / self.temperature)
        return weights / weights.sum()

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

    def task_schedule(self, generator: torch.Generator) -> list[int]:
        counts = self.batches_per_task()
        total = sum(counts)
        if self.strategy == "round_robin":
            return [step % len(counts) for step in range(total)]
        if self.strategy == "proportional":
            schedule = torch.tensor([t for t, c in enumerate(counts) for _ in range(c)])
            return schedule[torch.randperm(total, generator=generator)].tolist()
        probs = torch.as_tensor(self.task_probabilities(), dtype=torch.float64)
        return torch.multinomial(probs, total, replacement=True, generator=generator).tolist()

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


def check_padding(pad_to_multiple_of: int | None, pad_to_buckets: Sequence[int] | None) -> tuple[int, ...]:
    """Validate the padding settings; returns the buckets sorted, without repeats (empty for none)."""
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive length or unset, got {pad_to_multiple_of}.")
    try:
        buckets = tuple(sorted({int(b) for b in pad_to_buckets or ()}))
    except (TypeError, ValueError):
        raise ValueError(
            f"pad_to_buckets must be a list of lengths (e.g. 16 32 64 128), got {pad_to_buckets!r}."
        ) from None
    if buckets and buckets[0] < 1:
        raise ValueError(f"pad_to_buckets must hold positive lengths, got {list(buckets)}.")
    return buckets


@dataclass
class MultiTaskCollator:
    """Pads a list of tokenized rows to the longest one and stacks task ids and labels.

    Fewer distinct shapes for compiled or GPU kernels: `pad_to_buckets` pads each batch to the smallest of
    these lengths that holds its longest row (a batch longer than all of them keeps its own length), then
    `pad_to_multiple_of` rounds the padded length up. `torch.compile(mode="reduce-overhead")` records one CUDA
    graph per shape, so a few fixed buckets (16 32 64 128) keep those recordings few and early.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    pad_to_buckets: Sequence[int] | None = None

    def __post_init__(self):
        self.pad_to_buckets = check_padding(self.pad_to_multiple_of, self.pad_to_buckets) or None

    def padded_width(self, longest: int) -> int:
        """The length a batch whose longest row has `longest` tokens is padded to."""
        width = longest
        if self.pad_to_buckets:
            index = bisect.bisect_left(self.pad_to_buckets, longest)
            if index < len(self.pad_to_buckets):
                width = self.pad_to_buckets[index]
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        return width

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # Vectorised: one flat copy of every token into a boolean mask instead of a tensor op per row
        # (about 6x faster at batch size 32, which matters once a compiled GPU step takes a few ms).
        ids = [f["input_ids"] for f in features]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        width = self.padded_width(int(lengths.max()))
        mask = np.arange(width) < lengths[:, None]  # (batch, width), row-major like the flat tokens below
        input_ids = np.full((len(ids), width), self.pad_token_id, dtype=np.int64)
        input_ids[mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if "task_ids" in features[0]:
            batch["task_ids"] = torch.tensor([f["task_ids"] for f in features], dtype=torch.long)
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch
