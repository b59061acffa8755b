"""What a user sees in ``mlflow server``'s web UI, in a real headless Chromium (Debian's
``chromium`` and ``chromium-driver``, which ``.ci/run`` installs; driven by Selenium).

A tiny Polishing Teacher run is trained into a fresh SQLite store; the run page must show its
description, metric charts (training and validation), system metrics, the pseudo-label
picture (decoded by the browser, at its real size) and the logged model. Screenshots go to
``$SSOD_SCREENSHOTS`` (default ``/tmp/ssod-screenshots``); the paths are printed at the end
of the test session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOTS = Path(os.environ.get("SSOD_SCREENSHOTS", "/tmp/ssod-screenshots"))
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Chromium and its driver (apt-get install chromium chromium-driver; .ci/run does)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(mlflow_uri: str, tmp_path: Path):
    """``mlflow server`` on the test's store, on loopback; yields its address."""
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", mlflow_uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()
                assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
                time.sleep(0.5)
        yield address
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: condition(d), message=f"waiting for {what}")


def _screenshot(driver, name: str, report_lines) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    report_lines.append(f"MLflow UI screenshot: {path}")
    return path


def test_the_run_page_shows_description_charts_system_metrics_the_picture_and_the_model(
    make_config, mlflow_store, mlflow_server, browser, report_lines, monkeypatch
):
    from selenium.webdriver.common.by import By

    from ssod.training import run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    run(make_config("train.iterations=4", "train.eval_every=2", "train.log_every=1", "train.num_vis_images=1",
                    "tracking.log_model=true",
                    method="polish_teacher"))
    [finished] = mlflow_store.runs()
    run_id, experiment_id = finished.info.run_id, finished.info.experiment_id
    assert "system/cpu_utilization_percentage" in finished.data.metrics, "no system metrics sampled during the run"
    picture = sorted(p for p in mlflow_store.artifacts(run_id, "pseudo_labels") if p.endswith(".png"))[-1]
    width = Image.open(mlflow_store.client.download_artifacts(run_id, picture)).width
    page = f"{mlflow_server}/#/experiments/{experiment_id}/runs/{run_id}"

    # Overview: the run's description.
    browser.get(page)
    _wait(browser, lambda d: "Polishing Teacher" in d.find_element(By.TAG_NAME, "body").text, "the run's description")
    _screenshot(browser, "run-overview", report_lines)

    # Model metrics: a chart per metric, the losses and the validation AP among them.
    browser.get(f"{page}/model-metrics")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 3, "metric charts")
    sections = browser.find_element(By.TAG_NAME, "body").text
    assert "val/teacher" in sections and "train" in sections, sections[:2000]
    _screenshot(browser, "run-model-metrics", report_lines)

    # System metrics: MLflow's own monitor (CPU, memory), sampled while the run trained.
    browser.get(f"{page}/system-metrics")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 1, "system metric charts")
    assert "cpu_utilization_percentage" in browser.find_element(By.TAG_NAME, "body").text
    _screenshot(browser, "run-system-metrics", report_lines)

    # The pseudo-label picture, decoded by the browser at its real width.
    browser.get(f"{page}/artifacts/{picture}")

    def rendered(driver):
        return [image for image in driver.find_elements(By.TAG_NAME, "img")
                if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == width]

    _wait(browser, rendered, f"the picture {picture} ({width} px wide) to render")
    _screenshot(browser, "run-pseudo-label-picture", report_lines)

    # The logged model, linked from the run's page.
    browser.get(page)
    _wait(browser, lambda d: d.find_elements(By.XPATH, "//a[contains(@href, '/models/m-')]"), "a link to the logged model")
