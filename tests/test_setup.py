"""The two setup commands of the README (`make train`, `make test`), what .ci/run calls, and the lock file."""

from __future__ import annotations

import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# make's own variables, and the Makefile's (make exports command-line variables to its recipes).
MAKE_ENV = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
MAKE_ENV |= {"PYTHON", "VENV", "TORCH_INDEX", "DATA_DIR", "CONFIG", "PYTEST_ARGS", "SEEDS", "SOUP_DIR"}
TRAIN_COMMAND = "accelerate launch --config_file configs/accelerate/one_process.yaml train.py configs/quick.yaml --data_dir ../shared/data"


def make_dry_run(*args: str) -> list[str]:
    # The suite itself runs under `make test`, whose settings must not leak into this make.
    env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV}
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [" ".join(line.split()) for line in done.stdout.splitlines()]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_make_test_creates_the_venv_then_runs_the_suite_offline(tmp_path):
    venv = tmp_path / "venv"
    lines = make_dry_run("test", f"VENV={venv}")
    assert lines[0] == f"test -x {venv}/bin/python || python3 -m venv {venv}"
    # torch's CPU build from PyTorch's index, under the lock; then the requirements under the lock.
    assert lines[1] == (
        f"{venv}/bin/python -m pip install -q --no-deps --index-url {CPU_INDEX} torch -c requirements.lock"
    )
    assert lines[2] == f"{venv}/bin/python -m pip install -q -r requirements.txt -c requirements.lock"
    assert lines[-2] == f"touch {venv}/.installed"
    assert lines[-1] == (
        f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false {venv}/bin/python -m pytest -q"
    )


def test_make_train_runs_the_readme_main_job_in_the_venv(tmp_path):
    venv = tmp_path / "venv"
    lines = make_dry_run("train", f"VENV={venv}")
    assert lines[1].endswith("torch -c requirements.lock")
    assert lines[-1] == (
        f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false {venv}/bin/{TRAIN_COMMAND}"
    )
    assert f"`{TRAIN_COMMAND}`" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_make_soup_trains_the_main_job_once_per_seed_then_averages_the_runs(tmp_path):
    venv = tmp_path / "venv"
    lines = make_dry_run("soup", f"VENV={venv}", "SEEDS=7 8", "SOUP_DIR=out/soup")
    recipes = " ".join(lines[lines.index(f"touch {venv}/.installed") + 1 :]).replace(" \\ ", " ")
    offline = "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false"
    assert recipes == (
        f"for seed in 7 8; do {offline} {venv}/bin/{TRAIN_COMMAND} --seed $seed --output_dir out/soup/seed$seed "
        f"|| exit 1; done {offline} {venv}/bin/python bench/seed_soup.py out/soup/seed7 out/soup/seed8 "
        "--data_dir ../shared/data --save_dir out/soup/model"
    )


def test_an_installed_venv_is_reused_and_torch_index_picks_the_build(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than requirements.txt and requirements.lock
    assert make_dry_run("test", f"VENV={venv}") == [
        f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false {venv}/bin/python -m pytest -q"
    ]
    cuda = "https://download.pytorch.org/whl/cu128"
    other = tmp_path / "other"
    assert f"--index-url {cuda} torch" in make_dry_run("test", f"VENV={other}", f"TORCH_INDEX={cuda}")[1]
    assert make_dry_run("test", f"VENV={other}", "TORCH_INDEX=")[1] == (
        f"{other}/bin/python -m pip install -q --no-deps torch -c requirements.lock"
    )


def test_readme_quick_start_is_the_two_make_commands_and_ci_runs_make_test():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick_start.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == ["make train", "make test"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    assert [line for line in ci if "make " in line] == ['make test VENV="$CI_VENV"']


@pytest.mark.parametrize("make_rc", [0, 3])
def test_ci_run_removes_its_temporary_venv_and_keeps_a_given_one(tmp_path, make_rc):
    # A stand-in `make` records the VENV it was given and creates it (as the real one does, 2 GB); .ci/run must
    # delete a venv it made itself on exit, pass or fail, and leave one named by CI_VENV in place.
    fake_bin, scratch = tmp_path / "bin", tmp_path / "scratch"
    fake_bin.mkdir(), scratch.mkdir()
    (fake_bin / "make").write_text(
        '#!/bin/sh\nfor a; do case "$a" in VENV=*) mkdir -p "${a#VENV=}"; echo "${a#VENV=}" > "$LOG";; esac; done\n'
        f"exit {make_rc}\n",
        encoding="utf-8",
    )
    (fake_bin / "make").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "TMPDIR": str(scratch), "LOG": str(tmp_path / "v")}
    env.pop("CI_VENV", None)
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == make_rc, done.stderr
    venv = Path((tmp_path / "v").read_text(encoding="utf-8").strip())
    assert venv.name == "venv" and venv.parent.parent == scratch
    assert list(scratch.iterdir()) == [], "the temporary venv was left behind"

    kept = tmp_path / "kept" / "venv"
    ci_run = ["bash", str(ROOT / ".ci" / "run")]
    done = subprocess.run(ci_run, env={**env, "CI_VENV": str(kept)}, capture_output=True, check=False)
    assert done.returncode == make_rc and kept.is_dir()


def test_lock_pins_every_requirement_at_the_installed_version():
    pins = lock_pins()
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        name = canonical(requirement.name)
        assert name in pins, f"requirements.lock has no pin for {requirement.name}: run `make lock`"
        assert requirement.specifier.contains(pins[name]), f"requirements.lock: {name}=={pins[name]} is outside {line}"
        # The suite runs in the environment the lock built: what is installed is what the lock says.
        installed = Version(metadata.version(requirement.name))
        assert installed.public == pins[name], f"{name} {installed} is installed, requirements.lock says {pins[name]}"
    assert "+" not in pins["torch"], "torch is pinned without a build label; TORCH_INDEX picks the build"
