"""Workers finishing one study together train each baseline once, and a dead worker's claim is
taken over."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from fm_optuna.study._shared_baselines import CLAIM, RESULT, SharedBaselines

ROOT = Path(__file__).resolve().parents[2]
BUDGET = "{'steps': 60}"

WORKER = """
import sys, time
sys.path.insert(0, {root!r})
import optuna
from fm_optuna.study._shared_baselines import SharedBaselines

optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="shared", storage={storage!r})
log = {log!r}

def train(method):
    with open(log, "a") as f:
        f.write(method + "\\n")
    time.sleep(1.0)
    return {{"val": float(len(method)), "test": 1.0, "seconds": 1.0}}

while time.time() < {start}:  # start together, as workers finishing one study do
    time.sleep(0.01)
scores = SharedBaselines(study, train, stale_after=600.0, poll_seconds=0.2).scores(
    ["stl", "ew"], {budget!r})
print(sorted(scores.items()))
"""


def test_two_workers_train_each_baseline_once_and_both_report_all(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="shared", storage=storage)
    log = tmp_path / "trained.txt"
    code = WORKER.format(
        root=str(ROOT), storage=storage, log=str(log), start=time.time() + 4.0, budget=BUDGET
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assert sorted(log.read_text().split()) == ["ew", "stl"]  # each trained once, by someone
    assert outputs[0] == outputs[1] and "'stl'" in outputs[0] and "'ew'" in outputs[0]


def _study() -> optuna.Study:
    return optuna.create_study(storage=optuna.storages.InMemoryStorage())


def _recording(trained: list[str]):  # type: ignore[no-untyped-def]
    def train(method: str) -> dict[str, float]:
        trained.append(method)
        return {"val": 1.0, "test": 2.0, "seconds": 0.0}

    return train


def _claim(study: optuna.Study, method: str, claim: dict[str, object]) -> None:
    """A claim as workers write it: a study system attribute, which the dashboard does not list."""
    study._storage.set_study_system_attr(study._study_id, CLAIM + f"{method} {BUDGET}", claim)


def _legacy_claim(study: optuna.Study, method: str, claim: dict[str, object]) -> None:
    """A claim as older versions wrote it: a study user attribute."""
    study.set_user_attr(CLAIM + f"{method} {BUDGET}", claim)


def test_claims_stay_out_of_the_study_user_attributes() -> None:
    study, trained = _study(), []
    SharedBaselines(study, _recording(trained), stale_after=600.0, settle_seconds=0.0).scores(
        ["stl"], BUDGET
    )
    assert trained == ["stl"]
    assert not [key for key in study.user_attrs if key.startswith(CLAIM)]
    assert RESULT + f"stl {BUDGET}" in study.user_attrs  # the result is the study's to show
    system = study._storage.get_study_system_attrs(study._study_id)
    assert system[CLAIM + f"stl {BUDGET}"]["worker"]


def test_a_claim_by_a_worker_that_is_gone_is_taken_over() -> None:
    study, trained = _study(), []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim = {"worker": f"{__import__('socket').gethostname()}:{dead.pid}", "time": time.time()}
    _claim(study, "stl", claim)
    shared = SharedBaselines(study, _recording(trained), stale_after=600.0, settle_seconds=0.0)
    assert shared.scores(["stl"], BUDGET)["stl"]["test"] == 2.0
    assert trained == ["stl"]


def test_a_stale_claim_from_another_host_is_taken_over() -> None:
    study, trained = _study(), []
    claim = {"worker": "elsewhere:1", "time": time.time() - 60.0}
    _claim(study, "stl", claim)
    shared = SharedBaselines(study, _recording(trained), stale_after=30.0, settle_seconds=0.0)
    shared.scores(["stl"], BUDGET)
    assert trained == ["stl"]


@pytest.mark.parametrize("write", [_claim, _legacy_claim], ids=["system", "legacy-user"])
def test_a_live_claim_is_waited_for_and_its_result_used(write: Callable[..., None]) -> None:
    study, trained = _study(), []
    write(study, "stl", {"worker": "elsewhere:1", "time": time.time()})
    result = {"val": 5.0, "test": 6.0, "seconds": 7.0}
    finish = threading.Timer(0.5, study.set_user_attr, (RESULT + f"stl {BUDGET}", result))
    finish.start()
    shared = SharedBaselines(
        study, _recording(trained), stale_after=600.0, settle_seconds=0.0, poll_seconds=0.05
    )
    scores = shared.scores(["stl", "ew"], BUDGET)
    finish.join()
    assert scores == {"stl": result, "ew": {"val": 1.0, "test": 2.0, "seconds": 0.0}}
    assert trained == ["ew"]  # what nobody claimed is trained here, the claimed one waited for
