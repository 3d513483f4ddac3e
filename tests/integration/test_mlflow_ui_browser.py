"""The real MLflow UI, served by `fm-optuna ui`, shows a tracked ForkMerge run in Chromium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). The browser is
kept on loopback: every other host goes to a dead proxy, and Selenium Manager never downloads a
driver. The screenshot is saved to ``test-artifacts/mlflow_ui.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fm_optuna.tracking import metric_key
from tests.integration.test_tracking import (  # empty_store: the session's migrated store
    REPO,
    copy_store,
    empty_store,  # noqa: F401
    serve_ui,
    tracked_run,
)

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "test-artifacts" / "mlflow_ui.png"

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


def test_run_page_shows_the_run_and_its_lambda_metrics(
    empty_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager fetch a driver
    tracked = tracked_run(copy_store(empty_store, tmp_path / "tracking"))
    fm = tracked.runs["forkmerge"]
    branches = tracked.comparison.forkmerge.branches  # type: ignore[union-attr]
    expected = [fm.info.run_name, *(f"lambda/{metric_key(b.name)}" for b in branches)]

    with serve_ui(tracked.store.uri) as server:
        driver = chromium(tmp_path / "profile")
        try:
            driver.get(
                f"{server.url}/#/experiments/{tracked.store.experiment_id}/runs/{fm.info.run_id}"
            )
            text, deadline = "", time.monotonic() + 90
            while time.monotonic() < deadline:
                text = driver.find_element("tag name", "body").text
                if all(item in text for item in expected):
                    break
                time.sleep(0.5)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            driver.save_screenshot(str(SCREENSHOT))
        finally:
            driver.quit()

    assert fm.info.run_name == "forkmerge-seed0"
    for item in expected:
        assert item in text, f"{item!r} not on the run page (screenshot: {SCREENSHOT})"
    assert SCREENSHOT.stat().st_size > 10_000
