"""Pickle-free, crash-safe Trainer checkpoints.

The stock `Trainer` writes `training_args.bin`, `optimizer.pt`, `scheduler.pt` and `rng_state.pth`: pickles,
which run code when loaded. `SafeCheckpointMixin` writes the same state as safetensors (tensors) plus JSON
(everything else, in the safetensors header), so a checkpoint holds no file that can execute anything:

    checkpoint-N/
        config.json, model.safetensors, modeling_multitask.py, tokenizer files   (save_pretrained)
        training_args.json                                                       (instead of training_args.bin)
        optimizer.safetensors, scheduler.safetensors, [scaler.safetensors]       (instead of *.pt)
        rng_state.safetensors  (rng_state_<rank>.safetensors with several processes; instead of rng_state.pth)
        trainer_state.json

Each checkpoint is written into a hidden `.checkpoint-N.partial` folder and renamed to `checkpoint-N` only when
complete, so a run killed mid-write never leaves a `checkpoint-N` that resuming would pick up and fail on;
`latest_checkpoint` also skips any `checkpoint-N` that lacks a required file (e.g. from another tool).

Each checkpoint also holds `manifest.json`, written last: every file's size and sha256. Resuming verifies it
(`damage`): `--resume_from_checkpoint auto` skips a damaged checkpoint (truncated or emptied weights, a garbled
optimizer, invalid JSON) with a warning naming it and the one used instead; an explicit path to a damaged
checkpoint is refused naming the file. Files of a checkpoint without a manifest are checked for structure only
(a safetensors header that matches the file's size, JSON that parses). `outputs.save_outputs` writes the same
manifest for the final folder; `hub.push_folder` uploads exactly the files it lists.

DeepSpeed, FSDP, XLA and SageMaker keep the stock (pickle) optimizer format: those backends save through
their own engines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.safetensors"
SCALER_FILE = "scaler.safetensors"
TRAINING_ARGS_FILE = "training_args.json"
MANIFEST_NAME = "manifest.json"
# What a checkpoint needs to resume exactly (per-process RNG files are checked separately).
REQUIRED_FILES = ("config.json", "model.safetensors", TRAINER_STATE_NAME, OPTIMIZER_FILE, SCHEDULER_FILE)
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


# ---------------------------------------------------------------------------------------------------------
# A tree of dicts/lists/tuples/numbers/strings/tensors <-> one safetensors file
# ---------------------------------------------------------------------------------------------------------


def save_state(obj, path: str | os.PathLike) -> None:
    """Write `obj` (a state dict) to a safetensors file: tensors as tensors, the rest as JSON in its header.

    JSON cannot say tuple, non-string key or array; those are tagged so that `load_state` gives back an
    object equal to `obj` (optimizers compare `betas` as tuples and index their state by int).
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors, "state")
    save_file(tensors, str(path), metadata={"structure": json.dumps(structure)})


def load_state(path: str | os.PathLike, device: str = "cpu"):
    with safe_open(str(path), framework="pt", device=device) as f:
        metadata = f.metadata() or {}
        if "structure" not in metadata:
            raise ValueError(f"{path}: not a state file written by checkpoints.save_state (no 'structure').")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return _decode(json.loads(metadata["structure"]), tensors)


def _encode(obj, tensors: dict, where: str):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        # safetensors has no uint32 for torch: integer arrays travel as int64 and are cast back.
        array = obj.astype(np.int64) if obj.dtype.kind in "iu" else obj
        tensors[key] = torch.from_numpy(np.ascontiguousarray(array))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, where)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        items = [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]
        return {"__items__": items}
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} in a checkpoint without pickle.")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------------------
# Finding a checkpoint to resume from
# ---------------------------------------------------------------------------------------------------------


def rng_file_name(process_index: int, world_size: int) -> str:
    return "rng_state.safetensors" if world_size <= 1 else f"rng_state_{process_index}.safetensors"


def missing_files(checkpoint: str | os.PathLike, world_size: int = 1) -> list[str]:
    folder = Path(checkpoint)
    wanted = list(REQUIRED_FILES) + [rng_file_name(i, world_size) for i in range(max(1, world_size))]
    return [name for name in wanted if not (folder / name).is_file()]


def check_checkpoint(checkpoint: str | os.PathLike, world_size: int = 1) -> None:
    """Raise a ValueError naming what is missing when `checkpoint` cannot resume a run exactly."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise ValueError(f"--resume_from_checkpoint {str(checkpoint)!r} is not a folder.")
    missing = missing_files(folder, world_size)
    if missing:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (
            f" It holds pickle files {pickles}: it was written by the stock Trainer, which this script does not load."
            if pickles
            else " It is incomplete (the run was probably killed while writing it); resume from an earlier one."
        )
        raise ValueError(f"Checkpoint {folder} lacks {missing}.{hint}")
    problems = damage(folder)
    if problems:
        raise ValueError(
            f"Checkpoint {folder} is damaged: {'; '.join(problems)}. Resume from an earlier checkpoint, or pass "
            f"--resume_from_checkpoint auto to use the newest intact one."
        )


def latest_checkpoint(folder: str | os.PathLike, world_size: int = 1) -> str | None:
    """The `checkpoint-N` with the highest N that holds every file needed to resume, intact.

    Incomplete ones are skipped with a warning; damaged ones (see `damage`) with a warning that names the
    checkpoint, what is wrong and the checkpoint used instead.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(
        ((int(m[1]), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))),
        reverse=True,
    )
    damaged = []
    for _, path in found:
        missing = missing_files(path, world_size)
        if missing:
            logger.warning("Skipping incomplete checkpoint %s (missing %s).", path, missing)
            continue
        problems = damage(path)
        if problems:
            damaged.append((path, problems))
            continue
        for bad, problems in damaged:
            logger.warning(
                "Skipping damaged checkpoint %s (%s); resuming from %s instead.", bad, "; ".join(problems), path
            )
        return str(path)
    for bad, problems in damaged:
        logger.warning(
            "Skipping damaged checkpoint %s (%s); no earlier checkpoint is intact.", bad, "; ".join(problems)
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# Manifests: every file's size and sha256, written when a folder is complete
# ---------------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: str | os.PathLike, names: list[str] | None = None) -> list[str]:
    """Relative (POSIX) paths of the regular files under the top-level entries `names` of `folder` (default:
    all), sorted; symbolic links are neither listed nor followed, the manifest itself is left out."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir()) if names is None else names
    files = []
    for name in names:
        top = folder / name
        if top.is_symlink() or name == MANIFEST_NAME:
            continue
        if top.is_file():
            files.append(name)
        elif top.is_dir():
            for root, dirs, filenames in os.walk(top):
                dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
                for filename in filenames:
                    path = Path(root, filename)
                    if path.is_file() and not path.is_symlink():
                        files.append(path.relative_to(folder).as_posix())
    return sorted(files)


def write_manifest(folder: str | os.PathLike, names: list[str] | None = None) -> dict:
    """Write `folder`/manifest.json: the size and sha256 of every file under `names` (default: all)."""
    folder = Path(folder)
    files = {}
    for rel in folder_files(folder, names):
        path = folder / rel
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": 1, "files": files}
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, dict] | None:
    """{relative path: {"size", "sha256"}} from `folder`/manifest.json; None when there is none."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise ValueError("'files' must map paths to {size, sha256}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid manifest ({type(err).__name__}: {err}).") from err
    return files


def _structure_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors or .json file's structure, or None (other files are not checked)."""
    size = path.stat().st_size
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            return f"{path.name} is not valid JSON ({err})"
    elif path.suffix == ".safetensors":
        if size < 8:
            return f"{path.name} is {size} bytes, too short for a safetensors file"
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size > size - 8:
                return f"{path.name} is {size} bytes, shorter than its own header says (truncated)"
            try:
                header = json.loads(f.read(header_size))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
                return f"{path.name} has no valid safetensors header ({type(err).__name__})"
        if 8 + header_size + end != size:
            return f"{path.name} is {size} bytes, its header describes {8 + header_size + end} (truncated)"
    return None


def damage(checkpoint: str | os.PathLike) -> list[str]:
    """What is wrong with the files of a (complete) checkpoint, each naming the file; [] when it is intact.

    Checked against manifest.json (sizes, then sha256) when the checkpoint has one, and for structure always.
    """
    folder = Path(checkpoint)
    problems = []
    try:
        manifest = read_manifest(folder)
    except ValueError as err:
        manifest, problems = None, [f"{MANIFEST_NAME} is damaged ({err})"]
    if manifest is None and not problems:
        logger.warning("Checkpoint %s has no %s: its files are checked for structure only.", folder, MANIFEST_NAME)
    for rel, entry in (manifest or {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing (listed in {MANIFEST_NAME})")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel} is {path.stat().st_size} bytes, {MANIFEST_NAME} says {entry['size']}")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{rel} does not match its sha256 in {MANIFEST_NAME}")
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME and not any(p.startswith(path.name + " ") for p in problems):
            problem = _structure_problem(path)
            if problem:
                problems.append(problem)
    return problems


# ---------------------------------------------------------------------------------------------------------
# The Trainer side
# ---------------------------------------------------------------------------------------------------------


class SafeCheckpointMixin:
    """Mix into a `Trainer` subclass (before `Trainer`) to write and read checkpoints without pickle."""

    def _stock_backend(self) -> bool:
        # These save optimizer/model state through their own engines; keep the Trainer's code for them.
        return bool(
            self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or is_torch_xla_available()
            or is_sagemaker_mp_enabled()
        )

    def checkpoint_extra_state(self) -> dict:
        """Per-process state of the subclass saved with the RNG state (e.g. running statistics)."""
        return {}

    def restore_checkpoint_extra_state(self, extra: dict) -> None:
        pass

    # ---- saving ----
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Model (safetensors), config, tokenizer and training_args.json; no training_args.bin."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving model checkpoint to %s", output_dir)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        Path(output_dir, TRAINING_ARGS_FILE).write_text(self.args.to_json_string(), encoding="utf-8")

    def _save_checkpoint(self, model, trial) -> None:
        """Like `Trainer._save_checkpoint`, but written to `.checkpoint-N.partial`, renamed when complete."""
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, f".{name}.partial")
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a leftover of a run killed while writing this step
        self.accelerator.wait_for_everyone()

        self.save_model(staging, _internal_call=True)
        if (
            self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
            and self.state.best_global_step
        ):
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.exists(best):
                self.state.best_model_checkpoint = best
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if self.args.should_save:
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                cb_name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(cb_name), list):
                    self.state.stateful_callbacks[cb_name].append(cb.state())
                else:
                    self.state.stateful_callbacks[cb_name] = cb.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))

        self.accelerator.wait_for_everyone()  # every rank's RNG file is in the staging folder
        if self.args.should_save:
            write_manifest(staging)  # last: a checkpoint with a manifest was written completely
            _publish(staging, final)
            if self.args.push_to_hub:
                self._push_from_checkpoint(final)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._stock_backend():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_state(self.optimizer.state_dict(), os.path.join(output_dir, OPTIMIZER_FILE))
            save_state(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state(scaler.state_dict(), os.path.join(output_dir, SCALER_FILE))

    def _save_rng_state(self, output_dir: str) -> None:
        states = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
            "extra": self.checkpoint_extra_state(),
        }
        if torch.cuda.is_available():
            distributed = self.args.parallel_mode.value == "distributed"
            states["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
        os.makedirs(output_dir, exist_ok=True)
        save_state(states, os.path.join(output_dir, rng_file_name(self.args.process_index, self.args.world_size)))

    # ---- loading ----
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self._stock_backend():
            return super()._load_optimizer_and_scheduler(checkpoint)
        for name in (OPTIMIZER_FILE, SCHEDULER_FILE):
            if not os.path.isfile(os.path.join(checkpoint, name)):
                raise ValueError(f"Checkpoint {checkpoint} has no {name}; it cannot resume the run exactly.")
        self.optimizer.load_state_dict(load_state(os.path.join(checkpoint, OPTIMIZER_FILE)))
        self.lr_scheduler.load_state_dict(load_state(os.path.join(checkpoint, SCHEDULER_FILE)))

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, SCALER_FILE)):
            self.accelerator.scaler.load_state_dict(load_state(os.path.join(checkpoint, SCALER_FILE)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, rng_file_name(self.args.process_index, self.args.world_size))
        if not os.path.isfile(path):
            logger.warning("No %s: the resumed run will not replay dropout exactly.", path)
            return
        states = load_state(path)
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            if isinstance(states["cuda"], list):
                torch.cuda.random.set_rng_state_all(states["cuda"])
            else:
                torch.cuda.random.set_rng_state(states["cuda"])
        self.restore_checkpoint_extra_state(states.get("extra") or {})


def _publish(staging: str, final: str) -> None:
    """Move a complete checkpoint folder into place in one rename (an existing one of that step is replaced)."""
    old = None
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(os.path.dirname(final) or ".")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    # The rename is only durable once the directory entry is on disk (matters on power loss, not on SIGKILL).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
