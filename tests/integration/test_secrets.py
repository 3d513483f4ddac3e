"""No password anywhere (issue 18, item 5): stdout, stderr, both stores and every file written,
after commands given a table of credential-carrying URL forms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fm_optuna.cli import main
from fm_optuna.tracking.uris import mask_uri

ROOT = Path(__file__).resolve().parents[2]
SECRET = "Zq9sEcr3t"

#: Credential-carrying forms of a database or server URL (unreachable: port 1).
FORMS = [
    f"postgresql://fm:{SECRET}@127.0.0.1:1/db",
    f"postgresql://fm:p@{SECRET}@127.0.0.1:1/db",  # a raw '@' in the password
    f"postgresql://fm:a/{SECRET}?#@127.0.0.1:1/db",  # raw '/', '?', '#'
    f"postgresql://fm:{SECRET}%40x@127.0.0.1:1/db",  # percent-encoded
    f"postgresql://127.0.0.1:1/db?user=fm&password={SECRET}",
    f"postgresql://127.0.0.1:1/db?password={SECRET}&user=fm",
    f"postgresql+psycopg2://127.0.0.1:1/db?sslpassword={SECRET}",
    f"mysql://127.0.0.1:1/db?user=fm&passwd={SECRET}",
    f"postgresql://fm:{SECRET}@127.0.0.1:1/db?password={SECRET}",
    f"https://fm:{SECRET}@127.0.0.1:1",
    f"https://{SECRET}@127.0.0.1:1",  # a token as the user info
]


@pytest.mark.parametrize("form", FORMS)
def test_mask_uri_hides_every_form(form: str) -> None:
    assert SECRET not in mask_uri(form)
    assert SECRET not in mask_uri(f"Found `storage = {form}` (refused)")


def written(folder: Path) -> str:
    """Every file under ``folder`` as text (databases included, byte for byte), but the study
    file the test wrote."""
    return "\n".join(
        path.read_bytes().decode("latin-1")
        for path in folder.rglob("*")
        if path.is_file() and path.suffix != ".toml"
    )


SPEC = """
[study]
name = "secret"
n_trials = 1
seed = 0
storage = "sqlite:///{root}/optuna.db"
checkpoint_dir = "{root}/checkpoints"
pruner = "none"
[problem]
benchmark = "tests.fixtures.secret_problem:build"
dsn = "{dsn}"
[training]
steps = 40
dt = 20
ranking = "given"
[search]
strategy = "random"
merge_trials = 2
[space]
dt = {{ low = 10, high = 20 }}
"""


@pytest.mark.parametrize("form", [f for f in FORMS if not f.startswith("https")])
def test_no_password_in_the_output_or_files_of_a_refused_storage(
    form: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "secret.toml"
    spec.write_text(SPEC.format(root=tmp_path, dsn=""))
    assert main(["tune", str(spec), "--storage", form, "--no-tracking"]) == 2
    assert main(["tune", str(spec), "--tracking-uri", form]) == 2
    out, err = capfd.readouterr()
    assert "error:" in err
    assert SECRET not in out + err + written(tmp_path)


@pytest.mark.parametrize("form", FORMS)
def test_no_password_in_the_output_of_a_refused_tracking_store(
    form: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["run", "--benchmark", "examples.diabetes:build", "--methods", "stl", "--steps", "5"]
    assert main([*args, "--tracking-uri", form]) == 2
    out, err = capfd.readouterr()
    assert "error:" in err
    assert SECRET not in out + err + written(tmp_path)


def test_no_password_in_either_store_or_any_file_after_a_tracked_study(tmp_path: Path) -> None:
    """A credential in a problem option reaches MLflow params and tags, Optuna user attributes
    and the artifacts: each holds it masked."""
    dsn = f"postgresql://fm:p@{SECRET}@db/x?user=fm&password={SECRET}"
    spec = tmp_path / "secret.toml"
    spec.write_text(SPEC.format(root=tmp_path, dsn=dsn))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fm_optuna.cli",
            "tune",
            str(spec),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    everything = done.stdout + done.stderr + written(tmp_path)
    assert "fm:***@" in everything  # the option was stored, masked
    assert SECRET not in everything
