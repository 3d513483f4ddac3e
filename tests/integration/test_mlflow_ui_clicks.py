"""By clicks only, in a fresh Chromium profile opened on what `fm-optuna ui` prints: Λ of the
latest ForkMerge run, a merge decision, a study's best trial and its Λ, each within a click
budget and never through a GenAI view. Screenshots of every step go to ``test-artifacts/``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and the
``mlflow.app`` entry point of this package (``pip install -e .``).
"""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.test_mlflow_ui_browser import ARTIFACTS, CHROMIUM, chromium
from tests.integration.test_tracking import (  # empty_store: the session's migrated store
    copy_store,
    empty_store,  # noqa: F401
    serve_ui,
    tracked_run,
)
from tests.integration.test_tune import spec_file, tuner

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed"),
    pytest.mark.skipif(
        not any(e.name == "fm-optuna" for e in importlib.metadata.entry_points(group="mlflow.app")),
        reason="the mlflow.app entry point is not installed (pip install -e .)",
    ),
]

SHOW_MORE = "//*[normalize-space(text())='Show more']"
#: What only MLflow's GenAI views show.
GENAI = ("Detect Issues", "Evaluation runs", "Usage", "Tokens", "Evaluations")


class Clicks:
    """Counts the clicks of one path and checks every page on the way for GenAI views."""

    def __init__(self, driver: WebDriver, name: str) -> None:
        self.driver, self.name, self.count, self.pages = driver, name, 0, []

    def text(self) -> str:
        return self.driver.find_element("tag name", "body").text

    def wait(self, items: list[str], timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(item in text for item in items) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.check(text)
        missing = [item for item in items if item not in text]
        assert not missing, f"{self.name}: {missing} not shown (see {self.shoot()})"
        return text

    def check(self, text: str) -> None:
        shot = self.shoot()
        for genai in GENAI:
            assert genai not in text, f"{self.name}: GenAI view ({genai!r}; see {shot})"

    def shoot(self) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"clicks_{self.name}_{self.count}.png"
        self.driver.save_screenshot(str(path))
        return path

    def click(self, xpath: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.driver.find_elements("xpath", xpath) if e.is_displayed()]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert found, f"{self.name}: nothing to click at {xpath} (see {self.shoot()})"
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", found[0])
        windows = set(self.driver.window_handles)
        found[0].click()
        self.count += 1
        time.sleep(1.0)
        opened = [w for w in self.driver.window_handles if w not in windows]
        if opened:  # MLflow opens a description's links in a new tab: follow it
            self.driver.switch_to.window(opened[-1])
        self.check(self.text())

    def lambda_figure_loaded(self) -> int:
        figure = self.driver.find_element("css selector", "img[src*='lambda_trajectory.png']")
        deadline = time.monotonic() + 30
        while not self.driver.execute_script("return arguments[0].naturalWidth", figure):
            assert time.monotonic() < deadline, f"{self.name}: the Λ figure did not load"
            time.sleep(0.5)
        return int(self.driver.execute_script("return arguments[0].naturalWidth", figure))


def _link(lines: list[str], marker: str) -> str:
    return next(line for line in lines if marker in line).split()[-1]


def _wait_for_links(server: object, marker: str, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while not any(marker in line for line in server.stdout):  # type: ignore[attr-defined]
        server.stdout.append(server.lines.get(timeout=max(0.1, deadline - time.monotonic())))  # type: ignore[attr-defined]
    return list(server.stdout)  # type: ignore[attr-defined]


def test_lambda_a_merge_and_a_studys_best_trial_by_clicks_only(
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SE_OFFLINE", "true")
    uri = copy_store(empty_store, tmp_path / "tracking")
    tracked = tracked_run(uri)  # fm-optuna/toy-t0: STL, EW, a 3-branch ForkMerge (4 merges)
    from fm_optuna.tracking import StudyTracking, open_store

    path = spec_file(tmp_path, n_trials=3)
    path.write_text(path.read_text().replace('name = "toy"', 'name = "toy"\nbaselines = ["stl"]'))
    store = open_store(uri, experiment="fm-optuna/study/toy")
    tuner(path, tracking=lambda problem: StudyTracking(store, "toy", higher_is_better=False)).run()
    fm = tracked.runs["forkmerge"]

    with serve_ui(uri) as server:
        lines = _wait_for_links(server, "latest ForkMerge run")
        start = _link(lines, "start page")
        run_link = _link(lines, "latest ForkMerge run")
        study_link = _link(lines, "study run study-toy")
        counts: dict[str, int] = {}
        driver = chromium(tmp_path / "profile")  # fresh profile: empty local storage
        try:
            # 1. Λ of the latest ForkMerge run from its printed link: 0 clicks, at the top.
            lam = Clicks(driver, "lambda_from_link")
            driver.get(run_link)
            lam.wait(["Λ per merge", "Model training", "Child runs"])
            lam.click(SHOW_MORE)  # MLflow folds a description after ~90 px
            lam.wait(["merged val", "b0 target"])
            assert fm.info.run_id in driver.current_url
            assert lam.lambda_figure_loaded() > 400
            counts["Λ from the printed link"] = lam.count

            # 2. Round 2's merge decision with its inner trials: Artifacts → merges → round 2.
            merge = Clicks(driver, "merge_round_2")
            merge.click(
                "//*[@role='tab' or self::a or self::button][normalize-space(.)='Artifacts']"
            )
            merge.click("//*[normalize-space(text())='merges']")
            merge.click("//*[normalize-space(text())='round_002.json']")
            merge.wait(['"round": 2', '"trials"'])
            counts["round 2's merge decision"] = merge.count

            # 3. From MLflow's home page (the logo) to Λ: Experiments → experiment → run.
            home = Clicks(driver, "lambda_from_home")
            driver.get(start)  # the printed start page, as a new visitor would open it
            home.wait(["Experiments"])
            home.click("//a[.//*[name()='svg' and contains(@*, 'MLflow')] or @href='#/']")
            home.wait(["Experiments"])
            home.count = 0  # counted from MLflow's home page
            home.click("//a[normalize-space(.)='Experiments' or @href='#/experiments']")
            home.click("//a[normalize-space(.)='fm-optuna/toy-t0']")
            home.click("//a[normalize-space(.)='forkmerge-seed0']")
            home.wait(["Λ per merge"])
            home.click(SHOW_MORE)
            home.wait(["merged val"])
            assert home.lambda_figure_loaded() > 400
            counts["Λ from MLflow's home page"] = home.count

            # 4. A study's best trial and its Λ: the printed study run → its best trial.
            study = Clicks(driver, "study_best_trial")
            driver.get(study_link)
            study.wait(["Study toy", "best trial"])
            study.click(SHOW_MORE)
            study.wait(["Baselines", "COMPLETE"])
            study.click("//a[contains(normalize-space(.), 'its Λ per merge')]")
            study.wait(["b0 target", "Λ per merge · trial"])  # the best trial's own page
            study.click(SHOW_MORE)
            study.wait(["merged val"])
            assert study.lambda_figure_loaded() > 400
            counts["study's best trial and its Λ"] = study.count
        finally:
            driver.quit()

    (ARTIFACTS / "clicks.txt").write_text("".join(f"{k}: {v}\n" for k, v in counts.items()))
    assert counts["Λ from the printed link"] <= 2
    assert counts["Λ from MLflow's home page"] <= 4
    assert counts["study's best trial and its Λ"] <= 3
