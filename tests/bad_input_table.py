"""Measure how fm-optuna answers bad inputs and faults (issue 18's table), as an operator would.

Each case runs the real command in a fresh folder and records: exit code, the last line of
stderr, whether a traceback was printed, what was written (files in the folder) and whether
data was lost (a checkpoint that existed before and is not a whole one after). Run:

    PYTHONPATH=. python tests/bad_input_table.py > table.md

Not collected by pytest (no ``test_`` prefix); the properties it measures are asserted by the
tests under tests/integration/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIA = ["--benchmark", "examples.diabetes:build"]
TINY = ["--steps", "40", "--dt", "20", "--merge-trials", "2", "--methods", "forkmerge"]
PW = "Zq9sEcr3t"

SPEC = """
[study]
name = "t"
n_trials = 1
seed = 0
{study}
[problem]
benchmark = "examples.diabetes:build"
{problem}
[training]
steps = 40
dt = 20
ranking = "given"
{training}
[search]
strategy = "random"
merge_trials = 2
[space]
dt = {{ low = 10, high = 20 }}
"""


def spec(folder: Path, *, study: str = "", problem: str = "", training: str = "") -> str:
    path = folder / "t.toml"
    text = SPEC.format(study=study, problem=problem, training="")
    for line in training.splitlines():  # a [training] key given replaces the template's
        key = line.split("=", 1)[0].strip()
        kept = [t for t in text.splitlines() if t.split("=", 1)[0].strip() != key]
        text = "\n".join(kept).replace("[training]\n", f"[training]\n{line}\n") + "\n"
    path.write_text(text)
    return str(path)


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]
    setup: Callable[[Path], None] | None = None
    signal_after: tuple[str, int] | None = None  # (file to wait for, signal)
    teardown: Callable[[Path], None] | None = None


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def ro_folder(folder: Path) -> None:
    (folder / "src").mkdir()
    (folder / "ro").mkdir()
    _mount("--bind", str(folder / "src"), str(folder / "ro"))
    _mount("-o", "remount,bind,ro", str(folder / "ro"))


def tiny_fs(folder: Path) -> None:
    (folder / "tiny").mkdir()
    _mount("-t", "tmpfs", "-o", "size=100k", "tmpfs", str(folder / "tiny"))


def unmount(name: str) -> Callable[[Path], None]:
    def undo(folder: Path) -> None:
        subprocess.run(["umount", "-l", str(folder / name)], capture_output=True)

    return undo


def write(name: str, text: str) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / name).write_text(text)

    return make


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        for step in steps:
            step(folder)

    return run


def run_(*extra: str) -> Callable[[Path], list[str]]:
    return lambda folder: ["run", *DIA, *TINY, "--no-tracking", *extra]


def tune_(
    study: str = "", problem: str = "", training: str = "", *extra: str
) -> Callable[[Path], list[str]]:
    return lambda folder: [
        "tune",
        spec(folder, study=study, problem=problem, training=training),
        "--no-tracking",
        *extra,
    ]


CASES = [
    # signals
    Case(
        "SIGTERM during tune",
        tune_("checkpoint_dir = 'ck'", "", "steps = 4000"),
        signal_after=("ck/t/trial_0.ckpt", signal.SIGTERM),
    ),
    Case(
        "SIGINT during tune",
        tune_("checkpoint_dir = 'ck'", "", "steps = 4000"),
        signal_after=("ck/t/trial_0.ckpt", signal.SIGINT),
    ),
    Case(
        "SIGTERM during run",
        lambda f: [
            "run",
            *DIA,
            "--methods",
            "forkmerge",
            "--steps",
            "4000",
            "--dt",
            "50",
            "--no-tracking",
            "--checkpoint",
            "a.ckpt",
        ],
        signal_after=("a.ckpt", signal.SIGTERM),
    ),
    Case(
        "SIGINT during run",
        lambda f: [
            "run",
            *DIA,
            "--methods",
            "forkmerge",
            "--steps",
            "4000",
            "--dt",
            "50",
            "--no-tracking",
            "--checkpoint",
            "a.ckpt",
        ],
        signal_after=("a.ckpt", signal.SIGINT),
    ),
    # full disk, read-only places
    Case(
        "run: checkpoint on a full 100k tmpfs",
        lambda f: [
            "run",
            *DIA,
            "--methods",
            "forkmerge",
            "--steps",
            "400",
            "--dt",
            "50",
            "--merge-trials",
            "2",
            "--no-tracking",
            "--checkpoint",
            str(f / "tiny/a.ckpt"),
        ],
        setup=tiny_fs,
        teardown=unmount("tiny"),
    ),
    Case(
        "tune: checkpoint_dir on a full 100k tmpfs",
        lambda f: [
            "tune",
            spec(f, study=f"checkpoint_dir = '{f}/tiny'", training="steps = 400"),
            "--no-tracking",
        ],
        setup=tiny_fs,
        teardown=unmount("tiny"),
    ),
    Case(
        "run: --checkpoint in a read-only folder",
        lambda f: run_("--checkpoint", str(f / "ro/a.ckpt"))(f),
        setup=ro_folder,
        teardown=unmount("ro"),
    ),
    Case(
        "tune: checkpoint_dir read-only",
        lambda f: ["tune", spec(f, study=f"checkpoint_dir = '{f}/ro'"), "--no-tracking"],
        setup=ro_folder,
        teardown=unmount("ro"),
    ),
    Case(
        "run: --save-merge-problems read-only",
        lambda f: run_("--save-merge-problems", str(f / "ro/mp"))(f),
        setup=ro_folder,
        teardown=unmount("ro"),
    ),
    Case(
        "run: MLflow store in a read-only folder",
        lambda f: ["run", *DIA, *TINY, "--tracking-uri", f"sqlite:///{f}/ro/mlflow.db"],
        setup=ro_folder,
        teardown=unmount("ro"),
    ),
    Case(
        "tune: Optuna storage in a read-only folder",
        lambda f: [
            "tune",
            spec(f, study=f"storage = 'sqlite:///{f}/ro/optuna.db'"),
            "--no-tracking",
        ],
        setup=ro_folder,
        teardown=unmount("ro"),
    ),
    # secrets
    Case(
        "tune: storage password in userinfo",
        tune_("", "", "", "--storage", f"postgresql://fm:{PW}@127.0.0.1:1/db"),
    ),
    Case(
        "tune: storage password with '@'",
        tune_("", "", "", "--storage", f"postgresql://fm:p@{PW}@127.0.0.1:1/db"),
    ),
    Case(
        "tune: storage ?user=&password=",
        tune_("", "", "", "--storage", f"postgresql://127.0.0.1:1/db?user=fm&password={PW}"),
    ),
    Case(
        "run: tracking ?sslpassword=",
        lambda f: [
            "run",
            *DIA,
            *TINY,
            "--tracking-uri",
            f"postgresql://127.0.0.1:1/db?sslpassword={PW}",
        ],
    ),
    Case(
        "run: tracking https token",
        lambda f: ["run", *DIA, *TINY, "--tracking-uri", f"https://{PW}@127.0.0.1:1"],
    ),
    Case(
        "run: tracking mysql ?passwd=",
        lambda f: ["run", *DIA, *TINY, "--tracking-uri", f"mysql://127.0.0.1:1/db?passwd={PW}"],
    ),
    # check order
    Case(
        "tune: corrupt optuna.db, tracking on",
        lambda f: [
            "tune",
            spec(f, study=f"storage = 'sqlite:///{f}/optuna.db'"),
            "--tracking-uri",
            f"sqlite:///{f}/mlflow.db",
        ],
        setup=write("optuna.db", "garbage" * 30),
    ),
    Case(
        "tune: sqlite://tracking/optuna.db (2 slashes)",
        lambda f: [
            "tune",
            spec(f, study="storage = 'sqlite://tracking/optuna.db'"),
            "--tracking-uri",
            f"sqlite:///{f}/mlflow.db",
        ],
    ),
    Case(
        "run: corrupt mlflow.db",
        lambda f: ["run", *DIA, *TINY, "--tracking-uri", f"sqlite:///{f}/mlflow.db"],
        setup=write("mlflow.db", "garbage" * 30),
    ),
    # problem check
    Case(
        "run: evaluate returns tensors",
        lambda f: ["run", "--benchmark", "tm:build", *TINY, "--no-tracking"],
        setup=write(
            "tm.py",
            "import torch\nfrom examples.diabetes import "
            "build as b\ndef build(**k):\n    p = b(**k)\n    e = p.evaluate\n    p.evaluate = "
            "lambda m, s, t=None: {a: {x: torch.tensor(v) for x, v in d.items()} for a, d in "
            "e(m, s, t).items()}\n    return p\n",
        ),
    ),
    Case(
        "run: factory raises its own error",
        lambda f: ["run", "--benchmark", "rz:build", "--no-tracking"],
        setup=write("rz.py", "def build(**k):\n    raise OSError('no data at /data')\n"),
    ),
    Case(
        "run: factory raises ConfigError",
        lambda f: ["run", "--benchmark", "rc:build", "--no-tracking"],
        setup=write(
            "rc.py",
            "from fm_optuna import ConfigError\ndef "
            "build(**k):\n    raise ConfigError('Parameter `x` should be 1. Found `x = 2`.')\n",
        ),
    ),
    Case(
        "run: user module imports a missing package",
        lambda f: ["run", "--benchmark", "mm:build", "--no-tracking"],
        setup=write("mm.py", "import not_a_pkg_xyz\n"),
    ),
    Case(
        "run: user module has a syntax error",
        lambda f: ["run", "--benchmark", "se:build", "--no-tracking"],
        setup=write("se.py", "def build(:\n"),
    ),
    Case(
        "run: module not found", lambda f: ["run", "--benchmark", "nope_mod:build", "--no-tracking"]
    ),
    Case(
        "run: factory attribute missing",
        lambda f: ["run", "--benchmark", "examples.diabetes:nope", "--no-tracking"],
    ),
    Case(
        "run: make_model raises",
        lambda f: ["run", "--benchmark", "mr:build", "--no-tracking"],
        setup=write(
            "mr.py",
            "from examples.diabetes import build as b\ndef build(**k):\n    "
            "p = b(**k)\n    p.make_model = lambda: 1/0\n    return p\n",
        ),
    ),
    # messages
    Case('tune: [problem] batch_size = "32"', tune_("", 'batch_size = "32"')),
    Case('tune: [training] dt = "20"', lambda f: ["tune", _dt_string(f), "--no-tracking"]),
    Case("run: --lr -1e-3", run_("--lr", "-1e-3")),
    Case("run: --dt -5", run_("--dt", "-5")),
    Case("run: --steps -.5", run_("--steps", "-.5")),
    Case("run: --experiment ''", lambda f: ["run", *DIA, *TINY, "--experiment", ""]),
    Case("run: --option batch_size=abc", run_("--option", "batch_size=abc")),
    Case("tune: every trial fails (lr = 1e6)", tune_("", "", "lr = 1e6")),
    # assorted bad inputs that already held
    Case("run: --dt 0", run_("--dt", "0")),
    Case("run: --dt larger than --steps", run_("--dt", "400")),
    Case("run: --strategy nope", run_("--strategy", "nope")),
    Case("run: --branches 1", run_("--branches", "1")),
    Case("run: --benchmark unknown", lambda f: ["run", "--benchmark", "nope", "--no-tracking"]),
    Case("run: --target unknown", run_("--target", "nope")),
    Case("run: --seeds 0", run_("--seeds", "0")),
    Case("run: --methods nope", run_("--methods", "nope")),
    Case(
        "run: --resume from a garbage checkpoint",
        run_("--resume", "--checkpoint", "g.ckpt"),
        setup=write("g.ckpt", "garbage"),
    ),
    Case(
        "run: --tracking-uri ftp://x", lambda f: ["run", *DIA, *TINY, "--tracking-uri", "ftp://x"]
    ),
    Case("tune: missing study file", lambda f: ["tune", "nope.toml", "--no-tracking"]),
    Case("tune: unknown key", tune_("", "", "nope = 1")),
    Case(
        "tune: empty study file",
        lambda f: ["tune", str(f / "e.toml"), "--no-tracking"],
        setup=write("e.toml", ""),
    ),
    Case("tune: --n-trials -1", tune_("", "", "", "--n-trials", "-1")),
    Case(
        "run: two runs, one checkpoint",
        run_("--checkpoint", "s.ckpt"),
        setup=lambda f: _hold_lock(f / "s.ckpt.lock"),
    ),
]


def _hold_lock(path: Path) -> None:
    """A second `run` on the same checkpoint: a process holding its lock for 60 s."""
    code = (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(str(os.getpid())); f.flush(); time.sleep(60)\n"
    )
    subprocess.Popen([sys.executable, "-c", code, str(path)])
    while not path.exists() or not path.read_text():
        time.sleep(0.05)


def _dt_string(folder: Path) -> str:
    path = Path(spec(folder))
    path.write_text(path.read_text().replace("dt = 20\n", 'dt = "20"\n'))
    return str(path)


def measure(case: Case) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix="fm-bad-"))
    if case.setup is not None:
        case.setup(folder)
    before = {p for p in folder.rglob("*")}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{folder}", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "fm_optuna.cli", *case.args(folder)]
    process = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if case.signal_after is not None:
        name, signum = case.signal_after
        deadline = time.monotonic() + 300
        while not (folder / name).exists() and process.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if process.poll() is None:
            process.send_signal(signum)
    out, err = process.communicate(timeout=900)
    after = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p not in before and p.is_file() and "mlartifacts" not in p.parts
    )
    lost = "-"
    for ckpt in folder.rglob("*.ckpt"):
        try:
            import torch

            torch.load(ckpt, weights_only=False)
        except Exception:
            lost = f"{ckpt.name} unreadable" if ckpt.name != "g.ckpt" else "-"
    if case.teardown is not None:
        case.teardown(folder)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    text = out + err
    return {
        "case": case.name,
        "exit": process.returncode,
        "line": (lines[-1] if lines else "")[:230].replace("|", "\\|"),
        "traceback": "yes" if "Traceback" in err else "no",
        "written": ", ".join(after)[:120] or "nothing",
        "lost": lost,
        "secret shown": "YES" if PW in text else "no",
    }


def main() -> None:
    print("| # | case | exit | traceback | secret shown | the one line | written | data lost |")
    print("|---|---|---|---|---|---|---|---|")
    for number, case in enumerate(CASES, start=1):
        row = measure(case)
        print(
            f"| {number} | {row['case']} | {row['exit']} | {row['traceback']} | "
            f"{row['secret shown']} | {row['line']} | {row['written']} | {row['lost']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
