"""What a user sees in ``mlflow server``'s web UI, in a real headless Chromium (Debian's
``chromium`` and ``chromium-driver``, which ``.ci/run`` installs; driven by Selenium).

A tiny Polishing Teacher run is trained into a fresh SQLite store. A fresh browser (a new,
empty profile: no saved choice of MLflow's GenAI or model-training face) opens the address
the README gives: it must land on the experiment's runs table, model training, with the
method, percent, seed and final AP columns, not on the GenAI overview. The run page must
show its description, metric charts (training and validation; raw and polished pseudo-label
IoU in one section), system metrics, the pseudo-label picture (decoded by the browser, at its
real size) and the logged model. Screenshots go to
``$SSOD_SCREENSHOTS`` (default ``/tmp/ssod-screenshots``); the paths are printed at the end
of the test session.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
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


MODEL_TRAINING = "?workflowType=machine_learning"
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_address(server: str) -> str:
    """The address the README tells a person to open after ``mlflow ui``, on ``server``."""
    found = re.search(r"<(http://127\.0\.0\.1:5000/#/experiments/[^>]+)>", README.read_text())
    assert found, "the README gives no MLflow address"
    return found.group(1).replace("http://127.0.0.1:5000", server)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    # A profile of its own: nothing saved from another session (MLflow keeps its GenAI /
    # model-training choice in the browser's local storage).
    profile = tempfile.mkdtemp(prefix="ssod-chromium-")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1200",
                     f"--user-data-dir={profile}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


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

    from ssod.mlflow_view import run_url
    from ssod.training import run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    run(make_config("train.iterations=4", "train.eval_every=2", "train.log_every=1", "train.num_vis_images=1",
                    "tracking.log_model=true",
                    method="polish_teacher"))
    [finished] = mlflow_store.runs()
    run_id, experiment_id = finished.info.run_id, finished.info.experiment_id
    assert "system/cpu_utilization_percentage" in finished.data.metrics, "no system metrics sampled during the run"
    picture = sorted(p for p in mlflow_store.artifacts(run_id, "pseudo_labels") if p.startswith("pseudo_labels/step_"))[-1]
    width = Image.open(mlflow_store.client.download_artifacts(run_id, picture)).width
    page = f"{mlflow_server}/#/experiments/{experiment_id}/runs/{run_id}"

    # A fresh browser, the README's address: the runs table of model training, ssod's columns.
    assert experiment_id == "1"  # the README's address names the first experiment of a fresh store
    assert browser.execute_script("return window.localStorage.length") == 0
    browser.get(readme_address(mlflow_server))
    _wait(browser, lambda d: finished.info.run_name in d.find_element(By.TAG_NAME, "body").text, "the runs table")
    _wait(browser, lambda d: "final/teacher_AP" in d.find_element(By.TAG_NAME, "body").text, "ssod's columns")
    first = browser.find_element(By.TAG_NAME, "body").text
    _screenshot(browser, "fresh-browser-readme-address", report_lines)
    assert "/runs?" in browser.current_url and "workflowType=machine_learning" in browser.current_url
    for column in ("method", "percent", "seed", "final/teacher_AP", "final/student_AP"):
        assert column in first, column
    assert "polish_teacher" in first and finished.info.run_name.startswith("polish_teacher ")
    for genai in ("Usage", "Token Usage", "Observability"):  # the GenAI overview's words
        assert genai not in first, genai
    assert not [name for name in finished.data.metrics if name.startswith("data/")]
    assert finished.data.params["data/train/images"] and finished.data.params["method"] == "polish_teacher"

    # Overview: the run's description (the address ssod prints for the run).
    assert f"{page}{MODEL_TRAINING}" == run_url(mlflow_server, experiment_id, run_id)
    browser.get(f"{page}{MODEL_TRAINING}")
    _wait(browser, lambda d: "Polishing Teacher" in d.find_element(By.TAG_NAME, "body").text, "the run's description")
    _screenshot(browser, "run-overview", report_lines)

    # Model metrics: a chart per metric, the losses and the validation AP among them.
    browser.get(f"{page}/model-metrics{MODEL_TRAINING}")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 3, "metric charts")
    sections = browser.find_element(By.TAG_NAME, "body").text
    assert "val/teacher" in sections and "train" in sections, sections[:2000]
    # One section per pseudo-label measure, its sets side by side (not one section per set).
    assert "pseudo/num_per_image" in sections and "pseudo/raw" not in sections, sections[:2000]
    _screenshot(browser, "run-model-metrics", report_lines)

    # System metrics: MLflow's own monitor (CPU, memory), sampled while the run trained.
    browser.get(f"{page}/system-metrics{MODEL_TRAINING}")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 1, "system metric charts")
    assert "cpu_utilization_percentage" in browser.find_element(By.TAG_NAME, "body").text
    _screenshot(browser, "run-system-metrics", report_lines)

    # The pseudo-label picture, decoded by the browser at its real width.
    browser.get(f"{page}/artifacts/{picture}{MODEL_TRAINING}")

    def rendered(driver):
        return [image for image in driver.find_elements(By.TAG_NAME, "img")
                if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == width]

    _wait(browser, rendered, f"the picture {picture} ({width} px wide) to render")
    _screenshot(browser, "run-pseudo-label-picture", report_lines)

    # The logged model, linked from the run's page.
    browser.get(f"{page}{MODEL_TRAINING}")
    _wait(browser, lambda d: d.find_elements(By.XPATH, "//a[contains(@href, '/models/m-')]"), "a link to the logged model")
