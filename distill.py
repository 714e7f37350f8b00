"""Knowledge distillation: a trained model's logits as soft targets for the student's training rows.

    accelerate launch train.py configs/default.yaml --data_dir ../shared/data --distill_from runs/teacher

`--distill_from` names a folder saved by train.py (or a Hub repo of one), e.g. a larger encoder trained on the same
task; several names make an ensemble whose logits are the mean of theirs. Before training, the teacher labels every
training row of each task it has a head for (`--distill_tasks` narrows them) with its own tokenizer; each such row's
loss then adds

    distill_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))     (T = --distill_temperature)

to the head's cross-entropy on its hard label (Hinton et al., 2015), averaged over the task's rows in the batch.
The teacher's logits are cached on disk (under the `datasets` cache, one file per teacher weights and task, each
input keyed by a digest of its token ids), so runs with other seeds, slices or settings label each input once. The
teacher loads as predict.py loads a model (safetensors only, through this repository's class, running no code of its
folder), and only when some input is not in its cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

logger = logging.getLogger(__name__)

# The cache's layout; bump it when the logits a key names would change.
CACHE_VERSION = 1


def check_arguments(distill_from: Sequence[str], tasks: Sequence[str], weight: float, temperature: float) -> None:
    """The distillation flags on their own (the teachers' heads are checked by `Teachers.check_tasks`)."""
    if not distill_from:
        if tasks:
            raise ValueError(f"--distill_tasks {list(tasks)} needs --distill_from (the teacher's output folder).")
        return
    # A local folder is compared by where it really is (`runs/t`, `runs/t/` and a link to it are one teacher).
    where = [os.path.realpath(name) if Path(name).exists() else name for name in distill_from]
    repeated = [name for name, place in zip(distill_from, where) if where.count(place) > 1]
    if repeated:
        raise ValueError(f"--distill_from names one teacher more than once ({repeated}); name each teacher once.")
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(
            f"--distill_weight must be a finite number > 0, got {weight}; leave out --distill_from to train without it."
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"--distill_temperature must be a finite number > 0, got {temperature} (1 keeps the teacher's logits)."
        )


class Teacher:
    """A saved multi-task model that labels training texts for the heads it shares with the student."""

    def __init__(self, name_or_path: str, max_length: int, batch_size: int = 128):
        import predict
        from modeling_multitask import MultiTaskConfig

        self.name = name_or_path
        self.path = self._local_folder(name_or_path)
        try:  # the weights load only when an input is not in the cache (`model`)
            predict.check_folder(self.path)
            self.config = MultiTaskConfig.from_pretrained(self.path)
            self.tokenizer = predict.load_tokenizer(self.path)
            self.max_length = min(max_length, self.config.max_input_length(self.tokenizer))
        except (OSError, ValueError) as err:
            raise ValueError(f"--distill_from {name_or_path!r}: {err}") from err
        self.batch_size = batch_size
        self.heads = {t["name"]: t for t in self.config.tasks}
        self.tasks: list[str] = []
        self._model = None
        self._fingerprint: str | None = None

    @property
    def model(self):
        """The teacher's weights, loaded on first use as predict.py loads a model."""
        if self._model is None:
            import predict

            # Each process of a multi-GPU run labels on its own GPU (the first labels, the others read its cache).
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
            try:
                self._model = predict.load_model(self.path, device=device)
            except (OSError, ValueError) as err:
                raise ValueError(f"--distill_from {self.name!r}: {err}") from err
        return self._model

    @staticmethod
    def _local_folder(name_or_path: str) -> Path:
        if Path(name_or_path).is_dir():
            return Path(name_or_path)
        if Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")):
            raise ValueError(
                f"--distill_from {name_or_path!r}: no such folder; pass the output folder of a train.py run."
            )
        from huggingface_hub import snapshot_download

        try:  # a Hub repo of a train.py run; its weights and config, no code
            return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as err:
            raise ValueError(
                f"--distill_from {name_or_path!r} is not a local folder and could not be fetched from the Hub "
                f"({type(err).__name__}: {str(err)[:200]})."
            ) from err

    def check_tasks(self, student_tasks: list[dict], wanted: Sequence[str]) -> list[str]:
        """The tasks to distill: `wanted`, or every student task the teacher has a head for; each must have the
        student's classes in the student's order."""
        student = {t["name"]: t for t in student_tasks}
        unknown = [t for t in wanted if t not in student]
        if unknown:
            raise ValueError(f"--distill_tasks {unknown}: not among the run's tasks {list(student)}.")
        names = list(wanted) or [t for t in student if t in self.heads]
        missing = [t for t in names if t not in self.heads]
        if not names or missing:
            raise ValueError(
                f"--distill_from {self.name!r} has heads for {list(self.heads)}, none for "
                f"{missing or list(student)}: distill from a model trained on the same task(s)."
            )
        for name in names:
            ours, theirs = student[name], self.heads[name]
            our_labels = [ours["id2label"][i] for i in range(ours["num_labels"])]
            their_labels = [theirs["id2label"][i] for i in range(theirs["num_labels"])]
            if our_labels != their_labels:
                raise ValueError(
                    f"--distill_from {self.name!r}: its {name!r} head has classes {their_labels}, the run's task has "
                    f"{our_labels}; a teacher must predict the same classes in the same order."
                )
        self.tasks = names
        return names

    def fingerprint(self) -> str:
        """A digest of the teacher's weights (every safetensors file, by content), read once per `Teacher`."""
        if self._fingerprint is None:
            digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
            for file in sorted(self.path.glob("*.safetensors")):
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 24), b""):
                        digest.update(block)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def logits(self, task: str, texts: list[str], cache_dir: str | os.PathLike | None = None) -> np.ndarray:
        """(len(texts), num_labels) float32 logits of the teacher's `task` head. A cache file per teacher and task
        holds the logits of every input it has labelled, keyed by a digest of the input's token ids (as truncated
        to the run's length): only new inputs run."""
        cache = Path(cache_dir or default_cache_dir()) / f"{self.fingerprint()[:32]}-{task}.npz"
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        digests = [hashlib.sha256(np.asarray(ids, np.int64).tobytes()).digest()[:16] for ids in encoded]
        keys = np.array(digests, dtype="S16")
        cache.parent.mkdir(parents=True, exist_ok=True)
        with _cache_lock(cache):
            known_keys = np.empty(0, dtype="S16")
            known = np.empty((0, self.heads[task]["num_labels"]), dtype=np.float32)
            if cache.is_file():
                with np.load(cache, allow_pickle=False) as stored:
                    if stored["logits"].shape[1:] == known.shape[1:]:
                        known_keys, known = stored["keys"], stored["logits"]
            index = {k: i for i, k in enumerate(known_keys.tolist())}
            missing = sorted({k: i for i, k in enumerate(keys.tolist()) if k not in index}.values())
            logger.info(
                "Distillation: %d of %d %s rows labelled by the teacher (%s), the rest from %s",
                len(missing), len(texts), task, self.name, cache,
            )  # fmt: skip
            if missing:
                new_logits = self._run(task, [encoded[i] for i in missing])
                self._check_finite(new_logits, [texts[i] for i in missing], task, "the teacher's weights are broken "
                                   "(an fp16 overflow?); train the teacher again")  # fmt: skip
                known_keys = np.concatenate([known_keys, keys[missing]])
                known = np.concatenate([known, new_logits])
                index = {k: i for i, k in enumerate(known_keys.tolist())}
                _write_cache(cache, known_keys, known)
        out = known[[index[k] for k in keys.tolist()]]
        self._check_finite(out, texts, task, f"the cache file {cache} is corrupt; delete it to label them anew")
        return out

    def _check_finite(self, logits: np.ndarray, texts: list[str], task: str, cause: str) -> None:
        bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
        if len(bad):
            raise ValueError(
                f"--distill_from {self.name!r}: its {task!r} logits are not finite (inf or NaN) for {len(bad)} "
                f"training row(s), the first {texts[bad[0]][:60]!r}: {cause}."
            )

    @torch.inference_mode()
    def _run(self, task: str, encoded: list[list[int]]) -> np.ndarray:
        from tqdm.auto import tqdm

        from data import MultiTaskCollator  # data.py imports this module

        # Longest first, each batch padded to its own longest row by the training collator.
        collate = MultiTaskCollator(self.tokenizer.pad_token_id or 0)
        order = np.argsort([-len(ids) for ids in encoded], kind="stable")
        out = np.empty((len(encoded), self.heads[task]["num_labels"]), dtype=np.float32)
        with tqdm(total=len(encoded), unit="text", desc=f"Teacher logits ({task})") as bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = collate([{"input_ids": encoded[i]} for i in rows])
                logits = self.model(**{k: v.to(self.model.device) for k, v in batch.items()}, task=task).logits
                out[rows] = logits.float().cpu().numpy()
                bar.update(len(rows))
        return out


class Teachers:
    """The --distill_from models: one, or an ensemble whose logits are the mean of its members' logits (so its
    softmax is the normalised geometric mean of theirs). Each member labels and caches its own logits."""

    def __init__(self, names: Sequence[str], max_length: int, batch_size: int = 128):
        self.members = [Teacher(name, max_length, batch_size) for name in names]
        self.tasks: list[str] = []

    def check_tasks(self, student_tasks: list[dict], wanted: Sequence[str]) -> list[str]:
        """`Teacher.check_tasks` for every member; all of them must distill the same tasks."""
        chosen = {member.name: member.check_tasks(student_tasks, wanted) for member in self.members}
        if len({tuple(names) for names in chosen.values()}) > 1:
            raise ValueError(
                f"--distill_from: the teachers have heads for different tasks of the run ({chosen}); pass "
                f"--distill_tasks with the tasks every one of them has."
            )
        self.tasks = next(iter(chosen.values()))
        return self.tasks

    def logits(self, task: str, texts: list[str], cache_dir: str | os.PathLike | None = None) -> np.ndarray:
        if len(self.members) == 1:
            return self.members[0].logits(task, texts, cache_dir)
        logger.info("Distillation: %s logits are the mean of %d teachers'", task, len(self.members))
        return np.mean([member.logits(task, texts, cache_dir) for member in self.members], axis=0, dtype=np.float32)


@contextlib.contextmanager
def _cache_lock(cache: Path):
    """Runs started together (seeds side by side, a multi-GPU run's processes) take turns on a cache file: the first
    labels, the others wait and read its file, and none drops what another added. A directory where no lock file can
    be made (read-only, e.g. a shared pre-filled cache) is read without one."""
    lock = FileLock(f"{cache}.lock")
    try:
        lock.acquire()
    except OSError as err:
        logger.warning("Distillation: no lock on %s (%s); reading it without one.", cache, err)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _write_cache(cache: Path, keys: np.ndarray, logits: np.ndarray) -> None:
    """The whole file written beside the cache and moved over it; a write that fails (a full disk) leaves no part."""
    part = None
    try:
        with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".part", delete=False) as handle:
            part = Path(handle.name)
            np.savez(handle, keys=keys, logits=logits)
        os.replace(part, cache)
    except OSError as err:
        if part is not None:
            part.unlink(missing_ok=True)
        logger.warning("Distillation: the teacher's logits could not be cached in %s (%s); the next run labels "
                       "these inputs again.", cache, err)  # fmt: skip


def default_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "teacher_logits"


def soft_targets(teacher: Teachers | None, task: str, num_labels: int, width: int, texts: list[str]) -> np.ndarray:
    """The `teacher_logits` column of a task's training rows: the teacher's logits in the first `num_labels`
    places, NaN elsewhere and on every row of a task it does not distill (the loss skips NaN rows)."""
    column = np.full((len(texts), width), np.nan, dtype=np.float32)
    if teacher is not None and task in teacher.tasks:
        column[:, :num_labels] = teacher.logits(task, texts)
    return column


def distillation_terms(
    logits: dict[str, torch.Tensor],
    teacher_logits: torch.Tensor,
    task_ids: torch.Tensor,
    task_names: Sequence[str],
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Per task, T^2 * KL(teacher || student) at temperature T, the mean over the task's rows that have teacher
    logits (0 for a task without such rows in the batch). No shape depends on the data."""
    terms = {}
    for index, name in enumerate(task_names):
        student = logits[name].float()
        target = teacher_logits[:, : student.shape[-1]].float()
        rows = (task_ids == index) & torch.isfinite(target).all(-1)
        target = torch.where(rows[:, None], target, 0.0)
        per_row = F.kl_div(
            F.log_softmax(student / temperature, -1),
            F.log_softmax(target / temperature, -1),
            reduction="none",
            log_target=True,
        ).sum(-1)
        terms[name] = torch.where(rows, per_row, 0.0).sum() / rows.sum().clamp(min=1) * temperature**2
    return terms
