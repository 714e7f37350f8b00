"""Tasks, data loading and checks, building the tokenized sets, and the collator (task sampling: sampler.py).

A task is a name, its label names and where its text comes from. Every source is a Hub dataset id with
a mirror folder name: with `--data_dir DIR` the split is read from `DIR/<mirror>/<split>.parquet` (or
.csv/.tsv/.jsonl/.json), otherwise from the Hub. The same config therefore runs online and offline.

Built-in tasks:
- `sentiment`: GLUE SST-2 (`stanfordnlp/sst2`), train on `train`, evaluate on `validation`.
- `question`: weak supervision. A pool of SST-2 sentences (statements) and TREC questions (`CogComp/trec`),
  labelled by a rule of question.py through the task's pool hook; a held-out part of the pool is the task's
  validation split. DailyDialog's gold dialog acts (mirror only) are extra evaluation sets, never training data.
Custom tasks come from the config's `task_definitions` (`parse_task_definitions`): a Hub dataset (or its mirror
folder) or the task's own data files (`train_file`/`validation_file`/`data_files`, like run_glue.py). Their sources
are read and checked by `check_custom_tasks` before any built-in task loads; string labels map to class ids
through a `ClassLabel` of the task's label names (given, or taken from the data).
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import json
import logging
import math
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

import question
from distill import soft_targets

logger = logging.getLogger(__name__)

DATA_EXTENSIONS = {"parquet": "parquet", "csv": "csv", "tsv": "csv", "jsonl": "json", "json": "json"}

# ---------------------------------------------------------------------------------------------------------
# Task definitions
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One split of one dataset. `dataset` is the Hub id; `mirror` the folder under `--data_dir`; `path` a data file
    of the task's own (then `dataset` only names the data, and neither the Hub nor `--data_dir` is read)."""

    dataset: str
    mirror: str
    split: str
    text_column: str
    label_column: str | None = None  # None: labels come from the task's label_fn
    transform: Callable[[str], str] | None = None  # applied to the text before labelling/tokenizing
    path: str | None = None

    def describe(self, data_dir: str | None) -> str:
        if self.path is not None:
            return self.path
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
    eval: tuple[EvalSource, ...] = ()
    # A weakly labelled task's hook (e.g. question.QuestionPool): its teacher labels the sources that have no
    # label column, and it makes the training rows; `holdout_name` names the pool's held-out eval set.
    pool: WeakLabelPool | None = None
    holdout_name: str | None = None
    description: str = ""
    # The metric the card and the README lead with: "accuracy", "f1" (macro) or "f1_pos" (F1 of class 1).
    headline_metric: str = "accuracy"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def label_fn(self) -> Callable[[str], int] | None:
        return None if self.pool is None else self.pool.label_fn

    def to_config(self) -> dict:
        if not self.label_names:
            raise ValueError(f"task {self.name!r}: label names not read yet; run data.check_custom_tasks first.")
        return {"name": self.name, "num_labels": self.num_labels, "id2label": dict(enumerate(self.label_names))}


class WeakLabelPool(Protocol):
    """What `build_data` asks of a weakly labelled task (implemented by question.QuestionPool)."""

    label_fn: Callable[[str], int]
    rows_per_source: int | None
    holdout_fraction: float

    def training_rows(
        self, texts: list[str], labels: list[int], source_texts: Sequence[str], pool: Sequence[str], seed: int
    ) -> tuple[list[str], list[int]]: ...


SST2_TRAIN = Source("stanfordnlp/sst2", "sst2", "train", "sentence", "label")
SST2_VALIDATION = Source("stanfordnlp/sst2", "sst2", "validation", "sentence", "label")
TREC_TRAIN = Source("CogComp/trec", "trec", "train", "text")
DAILYDIALOG = Source("li2017dailydialog/daily_dialog", "dailydialog", "validation", "text", "is_question")
SWITCHBOARD = Source("swda", "swda", "validation", "text", "is_question")  # SwDA release; no loadable Hub copy

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
                replace(DAILYDIALOG, transform=question.strip_question_marks),
                mirror_only=True,
            ),
            EvalSource("question_swda", SWITCHBOARD, mirror_only=True),
            EvalSource(
                "question_swda_noqm",
                replace(SWITCHBOARD, transform=question.strip_question_marks),
                mirror_only=True,
            ),
        ),
        pool=question.QuestionPool(),
        holdout_name="question",
        headline_metric="f1_pos",
        description="Is the sentence a question? Trained on rule-made (weak) labels of SST-2 and TREC text; "
        "measured against gold dialog acts of DailyDialog (written chat) and Switchboard (telephone speech).",
    ),
}


def get_tasks(
    names: Sequence[str],
    custom: dict[str, TaskSpec] | None = None,
    pools: dict[str, WeakLabelPool] | None = None,
) -> list[TaskSpec]:
    """The TaskSpecs named by `--tasks`, from the built-in TASKS and the config's `task_definitions`; `pools`
    replaces a weakly labelled task's hook (train.py passes the question pool built from its arguments)."""
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
    pools = pools or {}
    return [replace(known[n], pool=pools[n]) if n in pools else known[n] for n in names]


TASK_DEFINITION_KEYS = {
    "name": "task name (also the head name and the eval metric prefix)",
    "dataset": "Hub dataset id, read when --data_dir is not set; with data files optional, it only names the data",
    "mirror": "folder under --data_dir (default: the last part of the dataset id)",
    "train_file": "the task's own training file (.csv/.tsv/.json/.jsonl/.parquet); same as data_files: {train: ...}",
    "validation_file": "the task's own evaluation file; same as data_files: {validation: ...}",
    "data_files": "the task's own files as {split: path} (or one path: the train split)",
    "train_split": "split to train on (default: train)",
    "eval_split": "split to evaluate on (default: validation when a validation file is given, else none)",
    "text_column": "column holding the text",
    "label_column": "column holding the class: class names (strings) or integer class ids 0..num_labels-1",
    "label_names": "list of class names, in class-id order (default: from the data)",
    "num_labels": "number of classes (optional; must equal len(label_names))",
}
_REQUIRED_DEFINITION_KEYS = ("name", "text_column", "label_column")


def _definition_files(item: dict, where: str) -> dict[str, str]:
    """A definition's own data files, {split: path}: each must exist and have a known extension."""
    data_files = item.get("data_files") or {}
    if isinstance(data_files, str):
        data_files = {"train": data_files}
    if not isinstance(data_files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in data_files.items()
    ):
        raise ValueError(f"{where}: data_files must map split names to file paths, e.g. {{train: train.csv}}.")
    files = dict(data_files)
    for key, split in (("train_file", "train"), ("validation_file", "validation")):
        path = item.get(key)
        if path is None:
            continue
        if not (isinstance(path, str) and path.strip()):
            raise ValueError(f"{where}: {key} must be a file path, got {path!r}.")
        if split in files and files[split] != path:
            raise ValueError(f"{where}: {key} {path!r} and data_files[{split!r}] {files[split]!r} name two files.")
        files[split] = path
    for split, path in files.items():
        key = {"train": "train_file", "validation": "validation_file"}.get(split, f"data_files[{split!r}]")
        ext = _file_extension(path)
        if ext not in DATA_EXTENSIONS:
            raise ValueError(
                f"{where}: {key} {path!r} has extension {ext!r}; use one of {['.' + e for e in DATA_EXTENSIONS]}."
            )
        file = Path(path)
        if not file.is_file():
            folder = file.parent if file.parent.is_dir() else None
            near = difflib.get_close_matches(file.name, [p.name for p in folder.iterdir()], n=1) if folder else []
            hint = f" Did you mean {str(folder / near[0])!r}?" if near else ""
            raise ValueError(
                f"{where}: {key} {path!r} does not exist (relative paths start at the working directory "
                f"{Path.cwd()}).{hint} Fix the path in the task definition."
            )
    return files


def _file_extension(path: str) -> str:
    return Path(path).suffix.lower().lstrip(".")


def check_known_keys(values, known, where: str, fix: str) -> None:
    """Refuse the first key of `values` not in `known`, suggesting the closest known one."""
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}.{hint} {fix}")


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
            value = json.loads(value, object_pairs_hook=_unique_keys)
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
        check_known_keys(item, TASK_DEFINITION_KEYS, where, f"Allowed keys: {list(TASK_DEFINITION_KEYS)}.")
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
        files = _definition_files(item, where)
        if not files and not item.get("dataset"):
            raise ValueError(
                f"{where}: give the task's data: dataset (a Hub id, or a folder under --data_dir with mirror), or "
                f"train_file (and validation_file), or data_files."
            )
        label_names = item.get("label_names")
        if label_names is None and num_labels is not None:
            label_names = [f"LABEL_{i}" for i in range(num_labels)]
        if label_names is not None:
            label_names = _check_label_names(label_names, num_labels, where)
        train_split, eval_split = _definition_splits(item, files, where)
        dataset = item.get("dataset") or name  # local files without a dataset id: the task names the data
        mirror = item.get("mirror") or dataset.rstrip("/").split("/")[-1]
        if not files:
            check_data_paths(mirror, [train_split, eval_split], where)

        def source(split: str) -> Source:
            return Source(dataset, mirror, split, item["text_column"], item["label_column"], path=files.get(split))

        origin = files[train_split] if files else item["dataset"]
        specs[name] = TaskSpec(
            name=name,
            label_names=label_names or (),  # empty: read from the data by check_custom_tasks
            train=(source(train_split),),
            eval=(EvalSource(name, source(eval_split)),) if eval_split else (),
            description=f"Custom task from {origin} ({item['text_column']} -> {item['label_column']}).",
        )
    return specs


def _definition_splits(item: dict, files: dict, where: str) -> tuple[str, str | None]:
    """(train split, eval split or None) of a task definition; with files, each must have one."""
    train_split = item.get("train_split") or "train"
    eval_split = item.get("eval_split") or ("validation" if "validation" in files else None)
    for key, split in (("train_split", train_split), ("eval_split", eval_split)):
        if files and split is not None and split not in files:
            raise ValueError(
                f"{where}: {key} {split!r} has no file; the definition's files are {files}. Add it to "
                f"data_files (or train_file/validation_file), or fix {key}."
            )
    return train_split, eval_split


def _check_label_names(label_names, num_labels: int | None, where: str) -> tuple[str, ...]:
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
    return label_names


def check_custom_tasks(tasks: list[TaskSpec], data_dir: str | None) -> list[TaskSpec]:
    """Read and check every split of every custom task (columns, texts, labels), before any built-in task loads,
    so a bad file fails in seconds. A task without label_names gets them from its training split: a ClassLabel
    column's names, else the sorted distinct class names (string labels) or "0".."n-1" (integer ids).
    Returns the tasks, custom ones with their label names."""
    checked = []
    for task in tasks:
        if task.name not in TASKS:
            if not task.label_names:
                task = replace(task, label_names=_label_names_from_data(task, data_dir))
                logger.info("Task %r: label names from the data: %s", task.name, list(task.label_names))
            for source in (*task.train, *(e.source for e in task.eval)):
                read_source(source, task, data_dir)
        checked.append(task)
    return checked


def _label_names_from_data(task: TaskSpec, data_dir: str | None) -> tuple[str, ...]:
    import datasets

    source = task.train[0]
    ds = load_source(source, data_dir)
    where = source.describe(data_dir)
    if len(ds) == 0:
        raise ValueError(f"{where}: the split has zero rows; task {task.name!r} needs data there.")
    check_columns(ds, source, data_dir)
    feature = ds.features.get(source.label_column)
    if isinstance(feature, datasets.ClassLabel):
        names = tuple(feature.names)
    else:
        values = ds[source.label_column][:]
        if values and all(isinstance(v, str) for v in values):
            names = tuple(sorted(set(values)))
        else:
            try:
                count = max(int(v) for v in values) + 1
            except (TypeError, ValueError):  # not integer ids: check_labels names the row
                count = 2
            check_labels(values, max(count, 2), where, source.label_column)
            names = tuple(str(i) for i in range(count))
    if len(names) < 2:
        raise ValueError(
            f"{where}: column {source.label_column!r} holds one class {list(names)}; task {task.name!r} needs at "
            f"least 2 (or give label_names in its definition)."
        )
    return names


def _class_ids(labels: Sequence, task: TaskSpec, where: str, column: str) -> list[int]:
    """Class names -> ids through a `ClassLabel` of the task's label names; every row must name a known class."""
    import datasets

    names = set(task.label_names)
    for row, label in enumerate(labels):
        if not isinstance(label, str) or label not in names:
            kind = "a class name" if isinstance(label, str) else "not a class name (the column mixes names and ids)"
            close = difflib.get_close_matches(str(label), task.label_names, n=1) if isinstance(label, str) else []
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{where}: column {column!r} row {row} is {label!r}, {kind} outside task {task.name!r}'s label_names "
                f"{list(task.label_names)}.{hint} Fix the row, or list the class in label_names."
            )
    return datasets.ClassLabel(names=list(task.label_names)).str2int(list(labels))


def _unique_keys(pairs: list[tuple]) -> dict:
    """json `object_pairs_hook`: refuse a mapping that repeats a key (json keeps the last value silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            name = dict(pairs).get("name")
            within = f" of the definition {name!r}" if isinstance(name, str) else ""
            raise ValueError(
                f"task_definitions: key {key!r} appears twice in one mapping{within}; only the last value would "
                f"count. Give each key once."
            )
        out[key] = value
    return out


def check_data_paths(mirror: str, splits: Sequence[str | None], where: str) -> None:
    """A custom task's mirror folder and split names must name files inside --data_dir: a relative folder
    (nested is fine: 'org/name') with no '..', and split names without any path separator."""
    parts = mirror.replace("\\", "/").split("/")
    if Path(mirror).is_absolute() or mirror.startswith(("/", "\\", "~")) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"{where}: mirror {mirror!r} must be a folder inside --data_dir: a relative path with no '..' or empty "
            f"part (e.g. 'trec' or 'org/name'). Copy the data into --data_dir instead."
        )
    for split in splits:
        if split is not None and (split in (".", "..") or any(c in split for c in "/\\\0")):
            raise ValueError(
                f"{where}: split {split!r} must be a file name (no '/', '\\' or '..'), e.g. 'train'; the file read is "
                f"<--data_dir>/<mirror>/<split>.parquet."
            )


def check_inside_data_dir(data_dir: str, path: Path, source: Source) -> None:
    """Refuse a mirror folder or data file whose real path (symbolic links followed) is outside --data_dir."""
    root, real = os.path.realpath(data_dir), os.path.realpath(path)
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise ValueError(
            f"--data_dir {data_dir!r}: {path} (dataset {source.dataset!r} split {source.split!r}) resolves to {real}, "
            f"outside --data_dir (through a symbolic link). Data is read only from inside --data_dir: copy the files "
            f"in, or point --data_dir at the folder that holds them."
        )


# ---------------------------------------------------------------------------------------------------------
# Loading and checking
# ---------------------------------------------------------------------------------------------------------


def load_source(source: Source, data_dir: str | None):
    """Load one split as a `datasets.Dataset`, from the mirror folder when `data_dir` is set, else the Hub."""
    import datasets

    if source.path is not None:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        return _load_file(Path(source.path), _file_extension(source.path), source.split)
    if data_dir is not None:
        folder = Path(data_dir) / source.mirror
        if not Path(data_dir).is_dir():
            raise ValueError(f"--data_dir {data_dir!r} does not exist or is not a folder.")
        check_inside_data_dir(data_dir, folder, source)
        looked_for = f"{folder / (source.split + '.parquet')} (or .csv/.tsv/.jsonl/.json)"
        if not folder.is_dir():
            raise ValueError(
                f"--data_dir {data_dir!r} has no file for dataset {source.dataset!r} split {source.split!r}: it has no "
                f"folder {source.mirror!r} (looked for {looked_for}). Mirror the dataset there, or drop --data_dir "
                f"to read it from the Hub."
            )
        # A local file is no download: without this, datasets pings S3 to count one (network even with a mirror).
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        for ext in DATA_EXTENSIONS:
            path = folder / f"{source.split}.{ext}"
            if path.is_file():
                check_inside_data_dir(data_dir, path, source)
                return _load_file(path, ext, source.split)
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


def _load_file(path: Path, ext: str, split: str):
    """One local data file as a `datasets.Dataset` (split name `split`), with a clear error if it is unreadable."""
    import datasets

    empty_columns = _columns_if_empty(path, ext)
    if empty_columns is not None:
        # datasets fails on empty files with unrelated errors; the caller reports "zero rows".
        return datasets.Dataset.from_dict({c: [] for c in empty_columns})
    kwargs = {"delimiter": "\t"} if ext == "tsv" else {}
    try:
        return datasets.load_dataset(DATA_EXTENSIONS[ext], data_files={split: str(path)}, split=split, **kwargs)
    except Exception as err:  # datasets raises many types for unreadable files
        raise _unreadable(path, ext, err) from err


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
        # Visible: a letter, mark, number, punctuation or symbol (not only control, format or space characters).
        if not any(unicodedata.category(c)[0] in "LMNPS" for c in text):
            codes = ", ".join(sorted({f"U+{ord(c):04X}" for c in text})[:8])
            raise ValueError(
                f"{where}: column {column!r} row {row} has no visible character: it holds only {codes} (control, "
                f"format or zero-width characters such as NUL U+0000 or zero-width space U+200B). Remove the row, or "
                f"fix how the file was written."
            )


def check_no_line_breaks(texts: Sequence[str], where: str, column: str) -> None:
    """A CSV/TSV text with a line break is refused: it is almost always an unterminated quote that joined the
    lines after it (their rows and labels) into one field. Multi-line texts belong in .jsonl or .parquet."""
    for row, text in enumerate(texts):
        if "\n" in text or "\r" in text:
            raise ValueError(
                f"{where}: column {column!r} row {row} holds a line break ({text[:60]!r}...). In a CSV/TSV file that "
                f"is usually an unterminated quote (\") joining the lines after it into one field, so their rows "
                f"and labels are lost. Close the quote, or remove line breaks from the texts (a .jsonl or .parquet "
                f"file can hold multi-line texts)."
            )


def check_labels(labels: Sequence, num_labels: int, where: str, column: str) -> None:
    expected = f"expected an integer class id 0..{num_labels - 1}"
    for row, label in enumerate(labels):
        if label is None or isinstance(label, bool) or not isinstance(label, (int, np.integer, float, np.floating)):
            raise ValueError(
                f"{where}: column {column!r} row {row} is {label!r}, {expected}; fill or drop the row."
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


def read_source(source: Source, task: TaskSpec, data_dir: str | None) -> tuple[list[str], list[int]]:
    """The texts (after the source's transform) and labels (the data's, or the task's label_fn) of one split,
    checked as training checks them: an error names the file, column and row. The reader for scripts that score
    a model or a rule on a task's data (bench/question_rules.py, question_errors.py, seed_soup.py, quantization.py)."""
    _, texts, labels = read_dataset(source, task, data_dir)
    return texts, labels


def read_dataset(source: Source, task: TaskSpec, data_dir: str | None) -> tuple[object, list[str], list[int]]:
    """`read_source`, with the loaded `datasets.Dataset` first, for a caller that needs another of its columns."""
    ds = load_source(source, data_dir)
    where = source.describe(data_dir)
    if len(ds) == 0:
        raise ValueError(f"{where}: the split has zero rows; task {task.name!r} needs data there.")
    check_columns(ds, source, data_dir)
    texts = ds[source.text_column][:]  # a list: iterating datasets' lazy Column formats row by row (slow)
    check_texts(texts, where, source.text_column)
    if Path(where).suffix in (".csv", ".tsv"):
        check_no_line_breaks(texts, where, source.text_column)
    if source.transform is not None:
        texts = [source.transform(t) for t in texts]
    if source.label_column is not None:
        check_label_feature(ds, source, task, where)
        labels = ds[source.label_column][:]
        if any(isinstance(x, str) for x in labels):
            labels = _class_ids(labels, task, where, source.label_column)
        check_labels(labels, task.num_labels, where, source.label_column)
        labels = [int(x) for x in labels]
    elif task.label_fn is not None:
        label_fn = task.label_fn
        labels = [label_fn(t) for t in texts]
    else:
        raise ValueError(f"task {task.name!r}: source {where} has no label column and the task no label_fn.")
    return ds, texts, labels


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
    eval_capped: dict[str, dict] = field(default_factory=dict)  # eval set name -> {"of": rows before, "how": ...}
    distilled_tasks: list[str] = field(default_factory=list)  # tasks whose rows carry a teacher's logits


def _subsample(texts: list[str], labels: list[int], limit: int | None, seed: int) -> tuple[list[str], list[int]]:
    if limit is None or limit >= len(texts):
        return texts, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:limit])
    return [texts[i] for i in keep], [labels[i] for i in keep]


def _stratified_subsample(
    texts: list[str], labels: list[int], limit: int | None, seed: int
) -> tuple[list[str], list[int]]:
    """A seeded sample of `limit` rows that keeps each class's share (largest remainders), in the original order."""
    if limit is None or limit >= len(texts):
        return texts, labels
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    exact = {c: limit * len(by_class[c]) / len(texts) for c in classes}
    quota = {c: int(exact[c]) for c in classes}
    for c in sorted(classes, key=lambda c: exact[c] - quota[c], reverse=True)[: limit - sum(quota.values())]:
        quota[c] += 1
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.permutation(by_class[c])[: quota[c]] for c in classes]))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def _train_rows(data: MultiTaskData, task: TaskSpec, task_id: int, tokenizer, args, seed: int):
    """A task's training rows; a weakly labelled task's pool is read, part held out (an eval set labelled like
    training), and the rest handed to its hook."""
    texts, labels = [], []
    source_texts = []  # every row of the weakly labelled sources, for the hook's mined and rephrased rows
    for i, source in enumerate(task.train):
        t, y = read_source(source, task, args.data_dir)
        if task.pool is not None and source.label_column is None:
            source_texts += t
            t, y = _subsample(t, y, task.pool.rows_per_source, seed + i)
        texts += t
        labels += y
    if task.pool is None or task.holdout_name is None:
        return texts, labels
    pool_texts = list(texts)
    order = np.random.default_rng(seed).permutation(len(texts))
    n_eval = max(1, int(round(len(texts) * task.pool.holdout_fraction)))
    eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    held_texts, held_labels = [texts[i] for i in eval_idx], [labels[i] for i in eval_idx]
    texts, labels = [texts[i] for i in train_idx], [labels[i] for i in train_idx]
    if args.max_eval_samples is not None and args.max_eval_samples < len(held_texts):
        data.eval_capped[task.holdout_name] = {"of": len(held_texts), "how": "max_eval_samples, seeded random"}
    held_texts, held_labels = _subsample(held_texts, held_labels, args.max_eval_samples, seed)
    _add_eval(data, task.holdout_name, task, task_id, held_texts, held_labels, tokenizer, args)
    return task.pool.training_rows(texts, labels, source_texts, pool_texts, seed)


def build_data(tasks: list[TaskSpec], tokenizer, args, seed: int = 42, teacher=None) -> MultiTaskData:
    """Load, label, check and tokenize every task. `args` is train.DataArguments (data_dir, max_seq_length,
    max_train_samples, max_eval_samples, max_gold_eval_samples, gold_eval); a weakly labelled task brings its own
    options in its pool. With a `distill.Teacher`, the training rows get a `teacher_logits` column."""
    import datasets

    # A custom task without label_names takes them from its data (train.py has done so in check_custom_tasks).
    tasks = [t if t.label_names else replace(t, label_names=_label_names_from_data(t, args.data_dir)) for t in tasks]
    data = MultiTaskData(tasks=tasks, train=None, task_sizes=[])
    train_parts = []
    for task_id, task in enumerate(tasks):
        texts, labels = _train_rows(data, task, task_id, tokenizer, args, seed)
        texts, labels = _subsample(texts, labels, args.max_train_samples, seed)
        if len(set(labels)) < 2:
            raise ValueError(
                f"task {task.name!r}: the training data has only class(es) {sorted(set(labels))} of "
                f"{list(task.label_names)}; a classifier needs examples of at least two classes."
            )
        data.samples[task.name] = list(zip(texts[:3], labels[:3]))
        part = _tokenize(texts, labels, task_id, tokenizer, args.max_seq_length, f"{task.name}/train", data.truncated)
        if teacher is not None:
            width = max(t.num_labels for t in tasks)
            column = soft_targets(teacher, task.name, task.num_labels, width, texts)
            part = part.add_column("teacher_logits", column.tolist())
            if task.name in teacher.tasks:
                data.distilled_tasks.append(task.name)
        train_parts.append(part)
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
            t, y = read_source(eval_source.source, task, args.data_dir)
            # Gold sets have their own cap, a stratified sample (the same rows for every variant of a source).
            cap, how = args.max_eval_samples, "max_eval_samples, seeded random"
            subsample = _subsample
            if eval_source.mirror_only:
                cap, how = getattr(args, "max_gold_eval_samples", None), "max_gold_eval_samples, seeded stratified"
                subsample = _stratified_subsample
            if cap is not None and cap < len(t):
                data.eval_capped[eval_source.name] = {"of": len(t), "how": how}
            t, y = subsample(t, y, cap, seed)
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
    """Tokenize with a fast tokenizer through `datasets.map`, no padding.

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

    # In memory, nothing to cache: a fresh fingerprint spares datasets from pickling the tokenizer to hash `encode`.
    fingerprint = datasets.fingerprint.generate_random_fingerprint()
    ds = ds.map(encode, batched=True, remove_columns=["text"], desc=f"Tokenizing {what}", new_fingerprint=fingerprint)
    count = int(np.sum(np.asarray(ds["full_length"][:]) > max_length))
    if truncated is not None:
        truncated[what] = count
    elif count:
        logger.warning("%s: %d text(s) longer than %d tokens were truncated.", what, count, max_length)
    return ds.remove_columns("full_length")


# ---------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------


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
        if "teacher_logits" in features[0]:
            batch["teacher_logits"] = torch.tensor([f["teacher_logits"] for f in features], dtype=torch.float32)
        return batch
