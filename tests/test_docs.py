"""The documentation stays true to the code: README size, links, the commands it shows, and no run diaries.

Commands are checked by parsing, never by running: `train.py` flags go through its own `HfArgumentParser` and
the YAML through `train.load_config`; `predict.py`, `hub.py` and `bench/*.py` run their `main` with
`ArgumentParser.parse_args` stopped right after parsing, so nothing is loaded or trained.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("train.py", "predict.py", "hub.py", "onnx_export.py")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
DIARY = re.compile(r"session [0-9]|issue ?[0-9]", re.I)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text without its fenced code blocks (their `#` lines are comments, not headings; their links are code)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (except - and _), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#{1,6} +(.+?) *#*$", prose(path.read_text(encoding="utf-8")), re.M)}


def test_readme_is_at_most_10_kb():
    size = README.stat().st_size
    assert size <= 10240, f"README.md is {size} bytes, expected <= 10240: move detail to a page under docs/"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    broken = []
    for match in LINK.finditer(prose(page.read_text(encoding="utf-8"))):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {rel(file)}")
    assert not broken, f"{rel(page)}: broken links:\n" + "\n".join(broken)


def test_readme_layout_table_names_existing_files():
    """Every file or folder in the README's layout table exists (the table is the map of the repository)."""
    section = README.read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([^`]+)` \|", section, re.M)
    assert names, "README.md: no layout table found under '## Layout'"
    missing = [name for name in names if not (ROOT / name).exists()]
    # tests/test_e2e.py and the test_<module>.py files are named in prose only; the table names top-level entries.
    assert not missing, f"README.md layout table names files that do not exist: {missing}"


# --- the commands shown in README.md and docs/*.md --------------------------------------------------------------


def commands(text: str) -> list[str]:
    """Shell commands in fenced blocks (continuation lines joined) and inline code spans that run a program."""
    found = []
    for block in FENCE.findall(text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                found.append(line.strip())
    for span in re.findall(r"`([^`]+)`", prose(text)):
        found.append(" ".join(span.split()))
    return found


def invocations(command: str) -> list[tuple[str, list[str], list[str]]]:
    """(program, arguments, tokens before it) for each program run with python / accelerate launch in a command."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote: prose, not a command
        return []
    out = []
    segment: list[str] = []
    for token in [*tokens, "|"]:
        if token in ("|", "&&", ";", "||") or token.startswith((">", "2>")):
            for at, word in enumerate(segment):
                program = word if word in PROGRAMS else None
                if re.fullmatch(r"bench/\w+\.py", word):
                    program = word
                if program and any(w in ("python", "python3", "launch") for w in segment[:at]):
                    out.append((program, [w.strip("[]") for w in segment[at + 1 :] if w.strip("[]") not in ("", "...")], segment[:at]))
                    break
            segment = [] if token != ">" else ["<redirect>"]
        elif segment[:1] != ["<redirect>"]:
            segment.append(token)
    return out


def all_invocations():
    seen = {}
    for page in PAGES:
        for command in commands(page.read_text(encoding="utf-8")):
            for program, args, before in invocations(command):
                seen.setdefault((program, tuple(args), tuple(before)), (rel(page), command))
    return sorted(seen.items())


INVOCATIONS = all_invocations()


class _Parsed(Exception):
    pass


def load_script(path: Path):
    for folder in (str(ROOT), str(path.parent)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    name = "_docs_" + re.sub(r"\W", "_", rel(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_train_flags(args: list[str], where: str) -> None:
    import train
    from transformers import HfArgumentParser

    args = list(args)
    if args and args[0].endswith((".yaml", ".yml")):
        config = args.pop(0)
        assert (ROOT / config).is_file(), f"{where}: config file {config} does not exist"
        train.load_config(str(ROOT / config))  # unknown keys raise
    if "--help" in args or "-h" in args:
        return
    parser = HfArgumentParser(train.ARGUMENT_CLASSES)
    try:
        _, unknown = parser.parse_known_args(args)
    except SystemExit as err:
        pytest.fail(f"{where}: train.py rejects its arguments {args} (exit {err.code})")
    assert not unknown, f"{where}: train.py does not accept {unknown}"


def check_argparse_program(path: Path, args: list[str], where: str, monkeypatch) -> None:
    if "--help" in args or "-h" in args:
        return
    module = load_script(path)
    original = argparse.ArgumentParser.parse_args
    parsed = []

    def parse_then_stop(self, args=None, namespace=None):
        result = original(self, args, namespace)
        parsed.append(result)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        module.main(list(args))
    except _Parsed:
        pass
    except SystemExit as err:
        pytest.fail(f"{where}: {rel(path)} rejects its arguments {args} (exit {err.code})")
    assert parsed, f"{where}: {rel(path)}.main never parsed its arguments"


@pytest.fixture(autouse=True)
def no_abbreviations(monkeypatch):
    """argparse takes `--learning_rat` for `--learning_rate`; the docs spell every flag in full."""
    monkeypatch.setattr(argparse.ArgumentParser, "_get_option_tuples", lambda self, option_string: [])


@pytest.mark.parametrize(
    "invocation", INVOCATIONS, ids=[f"{p}:{' '.join(a)[:60]}" for (p, a, _), _ in INVOCATIONS]
)
def test_documented_commands_use_real_flags_and_files(invocation, monkeypatch):
    (program, args, before), (page, command) = invocation
    where = f"{page}: `{command}`"
    if "--config_file" in before:
        config = before[before.index("--config_file") + 1]
        assert (ROOT / config).is_file(), f"{where}: accelerate config {config} does not exist"
    path = ROOT / program
    assert path.is_file(), f"{where}: {program} does not exist"
    args = list(args)
    if program == "train.py":
        check_train_flags(args, where)
        return
    if program == "bench/strategies.py" and "--" in args:  # the flags after -- go to train.py
        at = args.index("--")
        check_train_flags(args[at + 1 :], where)
        args = args[:at]
    if program in ("bench/weight_averaging.py", "bench/learning_rates.py"):  # own flags, the rest to train.py
        try:
            _, train_args = load_script(path).parse_args(args)
        except SystemExit as err:
            pytest.fail(f"{where}: {program} rejects its arguments {args} (exit {err.code})")
        check_train_flags(train_args, where)
        return
    check_argparse_program(path, args, where, monkeypatch)


def test_documented_gpu_phases_exist():
    script = (ROOT / "bench" / "gpu.sh").read_text(encoding="utf-8")
    known = set(re.search(r'^known="([^"]+)"', script, re.M).group(1).split())
    wrong = []
    for page in PAGES:
        for command in commands(page.read_text(encoding="utf-8")):
            for match in re.finditer(r"bench/gpu\.sh((?: [a-z_0-9]+)*)", command):
                wrong += [f"{rel(page)}: {p}" for p in match.group(1).split() if p not in known]
    assert not wrong, f"phases that bench/gpu.sh does not know: {wrong}"


def test_commands_were_found():
    """Guard against the extraction silently finding nothing."""
    programs = {program for (program, _, _), _ in INVOCATIONS}
    assert {"train.py", "predict.py", "hub.py"} <= programs


# --- no run diaries in what users read ---------------------------------------------------------------------------


def diary_files() -> list[Path]:
    files = [*PAGES, *(ROOT / "docs").rglob("*"), *(ROOT / "configs").rglob("*"), *(ROOT / "bench").rglob("*")]
    skip = {ROOT / "bench" / "question_errors.py"}
    return sorted({f for f in files if f.is_file() and f not in skip and "__pycache__" not in f.parts})


def test_no_session_or_issue_numbers():
    hits = []
    for file in diary_files():
        if DIARY.search(rel(file)):
            hits.append(f"{rel(file)}: in the file name")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # an image
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if DIARY.search(line):
                hits.append(f"{rel(file)}:{number}: {line.strip()[:100]}")
    assert not hits, "'session N' / 'issue N' belong in the git history, not in the docs:\n" + "\n".join(hits)
