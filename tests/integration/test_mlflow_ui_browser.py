"""The real MLflow UI, served by `fm-optuna ui`, shows a tracked ForkMerge run in Chromium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). The browser is
kept on loopback: every other host goes to a dead proxy, and Selenium Manager never downloads a
driver. Screenshots go to ``test-artifacts/``: the runs table and the run's Λ table and figure.
"""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.test_tracking import (  # empty_store: the session's migrated store
    EXPERIMENT,
    REPO,
    UiServer,
    copy_store,
    empty_store,  # noqa: F401
    serve_ui,
    tracked_run,
)

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian chromium is not installed (apt-get install chromium chromium-driver)",
    ),
]


def chromium(profile: Path) -> WebDriver:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
        # Nothing but loopback: any other host is sent to a proxy that does not exist.
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1;localhost",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _links(server: UiServer, timeout: float = 60.0) -> tuple[str, str]:
    """The runs-table and ForkMerge-run links `fm-optuna ui` prints once the server answers."""
    deadline = time.monotonic() + timeout
    while not any("latest ForkMerge run" in line for line in server.stdout):
        try:
            server.stdout.append(server.lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            pytest.fail(f"fm-optuna ui printed no run link: {server.stdout}")
    table = next(line for line in server.stdout if f"{EXPERIMENT}: http" in line)
    run = next(line for line in server.stdout if "latest ForkMerge run" in line)
    return table.split()[-1], run.split()[-1]


def _wait_for(driver: WebDriver, items: list[str], timeout: float = 90.0) -> str:
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        if all(item in text for item in items):
            break
        time.sleep(0.5)
    return text


def _shoot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def test_printed_link_opens_the_runs_table_then_the_lambda_table_and_figure(
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager fetch a driver
    tracked = tracked_run(copy_store(empty_store, tmp_path / "tracking"))
    fm = tracked.runs["forkmerge"]
    branches = [b.name for b in tracked.comparison.forkmerge.branches]  # type: ignore[union-attr]

    with serve_ui(tracked.store.uri) as server:
        table_link, run_link = _links(server)
        assert "workflowType=machine_learning" in table_link
        assert fm.info.run_id in run_link
        driver = chromium(tmp_path / "profile")  # a fresh profile: empty local storage
        try:
            # 1. The printed link lands on the classic runs table, not the GenAI overview.
            driver.get(table_link)
            runs = ["forkmerge-seed0", "stl-seed0", "ew-seed0"]
            table_text = _wait_for(driver, ["Run Name", *runs])
            table_shot = _shoot(driver, "mlflow_ui_runs_table.png")

            # 2. experiment → run: a click on the ForkMerge run opens its overview, whose
            # description is the Λ table with the stacked Λ figure.
            driver.find_element("link text", "forkmerge-seed0").click()
            run_text = _wait_for(driver, ["Λ per merge", "merged val", "b0 target"])
            for more in driver.find_elements("xpath", "//*[normalize-space(text())='Show more']"):
                driver.execute_script("arguments[0].click()", more)
            heading = driver.find_element("xpath", "//*[contains(text(), 'Λ per merge')]")
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)
            figure = driver.find_element("css selector", "img[src*='lambda_trajectory.png']")
            deadline = time.monotonic() + 30
            while not driver.execute_script("return arguments[0].naturalWidth", figure):
                assert time.monotonic() < deadline, "the Λ figure did not load"
                time.sleep(0.5)
            width = driver.execute_script("return arguments[0].naturalWidth", figure)
            run_text = driver.find_element("tag name", "body").text
            run_shot = _shoot(driver, "mlflow_ui_run_lambda.png")
            run_url = driver.current_url

            # 3. The printed run link opens the same overview in the model-training view (a
            # click inside the UI drops the view: MLflow keeps it in local storage only).
            driver.get(run_link)
            linked_text = _wait_for(driver, ["Λ per merge", "Model training", "Child runs"])
            linked_shot = _shoot(driver, "mlflow_ui_run_link.png")
        finally:
            driver.quit()

    for item in runs:
        assert item in table_text, f"{item!r} not in the runs table (see {table_shot})"
    for genai in ("Detect Issues", "Evaluation runs", "Tokens"):
        assert genai not in table_text, f"GenAI view shown ({genai!r}; see {table_shot})"
    assert fm.info.run_id in run_url
    for branch in branches:  # the Λ table's columns and the readable branch run names
        assert f"Λ {branch}" in run_text, f"no Λ column for {branch} (see {run_shot})"
    assert [f"b{i} {name}" for i, name in enumerate(branches)] == sorted(
        c.info.run_name for c in tracked.children
    )
    rows = [line for line in run_text.splitlines() if line.split()[:2] == ["4", "40"]]
    assert rows, f"the last merge's row (round 4, step 40) is not shown (see {run_shot})"
    assert width > 400, "the stacked Λ figure is not drawn in the overview"
    assert "Λ per merge" in linked_text and "Child runs" in linked_text
    assert "Evaluation runs" not in linked_text, f"GenAI view shown (see {linked_shot})"
    for shot in (table_shot, run_shot, linked_shot):
        assert shot.stat().st_size > 10_000
