"""The README's commands as a new user types them, from a fresh clone (issue 16).

A ```bash block of README.md right after the line ``MARKER`` (an HTML comment naming this file)
is run here literally, line by line, in one temporary folder holding a copy of studies/ and
examples/ (what a fresh clone has besides the package, which comes from PYTHONPATH):
``fm-optuna ...`` as ``python -m fm_optuna.cli ...`` and ``python ...`` as this interpreter. The
commands use the default stores under ./tracking, as on a clone: the first one creates the MLflow
store (seconds of migrations, part of what a new user waits for). ``fm-optuna ui`` serves until
Ctrl-C: it gets ``--port 0`` (port 5000 may be taken on a shared machine), must print its URL and
answer HTTP 200 there, and is stopped with SIGINT. Any command that exits non-zero, or does not
print what it exists to print, fails the test.

Every other ``fm-optuna`` command line of the README (code blocks and inline code) must at least
parse with the current command line, the README's study files must load, and its module map must
name every module of the package.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = "<!-- tested: tests/integration/test_readme_tour.py -->"
TOUR = "## A five-minute tour"
TIMEOUT = 600  # seconds per command; each takes about a minute or less on 2 cores

# What each command exists to print (a regular expression on its standard output).
EXPECTED = {
    ("fm-optuna", "run"): r"round\s+1 step\s+\d+\s+Λ = \[[0-9., ]+\]",
    ("fm-optuna", "tune"): r"best trial #\d+: ",
    ("fm-optuna", "compare"): r"saved tracking/compare/\S+/strategies\.csv",
    ("python", "-m"): r"step \d+: Λ = \[[0-9., ]+\]",
}


def marked_blocks(text: str) -> list[tuple[str, list[list[str]]]]:
    """Each marked ```bash block as (the heading it is under, its command lines as words)."""
    blocks = []
    for match in re.finditer(re.escape(MARKER) + r"\n```bash\n(.*?)```", text, flags=re.S):
        heading = [line for line in text[: match.start()].splitlines() if line.startswith("## ")]
        blocks.append((heading[-1], command_lines(match.group(1))))
    return blocks


def command_lines(block: str, first: tuple[str, ...] = ()) -> list[list[str]]:
    """The commands of a shell block (only lines starting with one of ``first``, if given):
    continuation lines joined, comments dropped."""
    lines = re.sub(r"\\\n", " ", block).splitlines()
    lines = [line for line in lines if not first or line.lstrip().startswith(first)]
    return [words for line in lines if (words := shlex.split(line, comments=True))]


def argv(words: list[str]) -> list[str]:
    if words[0] == "fm-optuna":
        return [sys.executable, "-m", "fm_optuna.cli", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    pytest.fail(f"README: `{shlex.join(words)}` is not a command this test knows how to run")


def fresh_clone(folder: Path) -> Path:
    for name in ("studies", "examples"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def environment(*, strict: bool = True) -> dict[str, str]:
    """A new user's environment: the default stores, the package on the path; ``strict`` makes
    a DeprecationWarning an error, as in the other CLI tests (not for the MLflow server, whose
    SQLAlchemy warns on its own)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store
    env.update(PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    if strict:
        env["PYTHONWARNINGS"] = "error::DeprecationWarning"
    return env


def run_command(words: list[str], cwd: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        argv(words),
        cwd=cwd,
        env=environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    where = f"README command `{shlex.join(words)}`"
    assert result.returncode == 0, f"{where} exited {result.returncode}:\n{result.stderr[-3000:]}"
    expected = EXPECTED.get((words[0], words[1]))
    if expected is not None:
        assert re.search(expected, result.stdout), f"{where} printed:\n{result.stdout[-3000:]}"
    print(f"{time.monotonic() - started:6.1f} s  {shlex.join(words)}")


def serve_ui(words: list[str], cwd: Path, timeout: float = 120.0) -> None:
    """`fm-optuna ui` as written (on any free port): its URL answers 200; Ctrl-C stops it."""
    started = time.monotonic()
    process = subprocess.Popen(
        [*argv(words), "--port", "0"],
        cwd=cwd,
        env=environment(strict=False),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As in a terminal: a suite started in the background inherits SIGINT ignored, and a
        # Python started with SIGINT ignored keeps ignoring it (no KeyboardInterrupt).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None and process.stderr is not None
    stdout: list[str] = []
    stderr: list[str] = []
    url_seen, link_seen = threading.Event(), threading.Event()

    def read_stdout() -> None:
        for line in process.stdout:
            stdout.append(line)
            if "MLflow UI at http://127.0.0.1:" in line:
                url_seen.set()
            if "fm-optuna/digits-mnistm: http://127.0.0.1:" in line:  # the tour's run command
                link_seen.set()

    readers = [
        threading.Thread(target=read_stdout, daemon=True),
        threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        assert url_seen.wait(timeout), f"`fm-optuna ui` printed no URL: {stderr[-5:]}"
        line = next(line for line in stdout if "MLflow UI at" in line)
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url is not None, line
        with urllib.request.urlopen(url.group(0), timeout=30) as response:
            assert response.status == 200
        # Then it links the newest experiments: the tour's run command logged one.
        assert link_seen.wait(timeout), "".join(stdout)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            for reader in readers:
                reader.join(timeout=10)
            process.stdout.close()
            process.stderr.close()
    assert code in (0, 130), (code, stderr[-10:])
    assert not any("Traceback" in line for line in stderr), "".join(stderr)
    assert any("stopped" in line for line in stdout), "".join(stdout)
    print(f"{time.monotonic() - started:6.1f} s  {shlex.join(words)} (--port 0, then Ctrl-C)")


def test_the_tour_is_marked_and_goes_run_tune_ui_compare() -> None:
    blocks = marked_blocks(README.read_text())
    headings = [heading for heading, _ in blocks]
    assert TOUR in headings and "## Your own problem" in headings
    tour = next(commands for heading, commands in blocks if heading == TOUR)
    assert [words[:2] for words in tour] == [
        ["fm-optuna", "run"],
        ["fm-optuna", "tune"],
        ["fm-optuna", "ui"],
        ["fm-optuna", "compare"],
    ]


@pytest.mark.slow
def test_the_readme_commands_run_as_written_from_a_fresh_clone(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path)
    for _, commands in marked_blocks(README.read_text()):
        for words in commands:
            if words[:2] == ["fm-optuna", "ui"]:
                serve_ui(words, clone)
            else:
                run_command(words, clone)
    assert (clone / "tracking" / "mlflow.db").is_file()
    assert (clone / "tracking" / "optuna.db").is_file()


def readme_command_lines(text: str) -> list[str]:
    """Every `fm-optuna ...` of the README: lines of its code blocks and inline code spans."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        found += [shlex.join(words) for words in command_lines(block, ("fm-optuna ",))]
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    found += re.findall(r"`(fm-optuna [^`]+)`", outside)
    return found


def test_every_fm_optuna_command_in_the_readme_parses() -> None:
    from fm_optuna.cli import build_parser

    lines = readme_command_lines(README.read_text())
    assert len(lines) >= 10
    for line in lines:
        words = shlex.split(line.replace("...", "x"))
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as stop:  # argparse: 0 after --help, 2 for an unknown flag or value
            assert stop.code == 0, f"README: `{line}` does not parse"


def test_the_readme_study_files_load(tmp_path: Path) -> None:
    from fm_optuna.study._spec import load_spec

    text = README.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2  # the minimal layout and the study file of your own problem
    example = (ROOT / "examples" / "diabetes.toml").read_text()
    assert blocks[0].strip() in example  # verbatim: the README's study file is the tested one
    for block in blocks:
        assert {"study", "problem"} <= set(tomllib.loads(block))
    minimal = tmp_path / "mine.toml"
    minimal.write_text(blocks[1])
    spec = load_spec(minimal)
    assert spec.problem.benchmark == "digits" and spec.training.steps == 600


def test_the_module_map_names_every_module() -> None:
    text = README.read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(fm_optuna/\n.*?)```", section, flags=re.S)
    assert block is not None
    names = set(re.findall(r"[\w.]+\.py|\w+/", block.group(1)))
    package = ROOT / "fm_optuna"
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted(package.rglob("*.py"))
        if path.name not in names
        or any(f"{folder}/" not in names for folder in path.relative_to(package).parts[:-1])
    ]
    assert not missing, f"README's module map does not name {missing}"
