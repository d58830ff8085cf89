"""What a user sees, in a real Chromium (Debian's chromium + chromium-driver, driven by Selenium): the
MLflow UI over a small real search's store, opened at the URL the search prints, and its report.html.

Screenshots go to the test's temp dir; with S3_SCREENSHOTS=DIR also, shrunk, to DIR (the README's
docs/images). Without a browser the browser tests skip (`make browser` installs one), unless
S3_REQUIRE_BROWSER=1 (CI) makes that a failure."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from s3_ray.tracking.report import tune_records
from s3_ray.tracking.server import server_env, stop_server, wait_healthy
from s3_ray.usf.schedule import load_schedule

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# As root in a container; without the background-networking flags Chromium tries the (closed) network.
# The host resolver rule keeps every page on 127.0.0.1 (the MLflow UI links to outside sites).
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1400,900"]
NAME = "browse"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def search(small_search):
    """The session's small real search (tests/conftest.py: 9 trials at NFE 3 and 4): its run directory
    and what it printed."""
    assert small_search.returncode == 0, small_search.shown[-3000:]
    assert small_search.run_dir.name == NAME
    return small_search.run_dir, small_search.shown


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"no browser to drive: {', '.join(missing)} missing (`make browser` installs Chromium)"
        if os.environ.get("S3_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))  # chromedriver is stopped by quit()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def mlflow_ui(search, tmp_path_factory):
    """`mlflow server` over the search's own store, as `mlflow ui` would serve it (stopped by its group id)."""
    run_dir, _ = search
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-ui") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{run_dir / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], env=server_env(), cwd=run_dir, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy(uri, 120, proc), log.read_text()[-3000:]
        yield uri
    finally:
        stop_server(proc)


def store(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("s3.kind") == "search")
    trials = [r for r in runs if r.data.tags.get("s3.kind") == "trial"]
    return client, exp, parent, trials


def screenshot(driver, tmp: Path, name: str, readme: bool = True) -> Path:
    """Save the window to ``tmp``; with S3_SCREENSHOTS=DIR also a small copy (<= 1000 px wide, 64 colours) there."""
    path = tmp / f"{name}.png"
    driver.save_screenshot(str(path))
    if readme and os.environ.get("S3_SCREENSHOTS"):
        from PIL import Image

        img = Image.open(path).convert("RGB")
        if img.width > 1000:
            img = img.resize((1000, round(img.height * 1000 / img.width)), Image.LANCZOS)
        out = Path(os.environ["S3_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        img.quantize(64, method=Image.Quantize.FASTOCTREE).save(out / f"{name}.png", optimize=True)
    return path


def wait_text(driver, *texts, timeout: float = 60.0) -> str:
    """The page's text once it holds every one of ``texts``."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout).until(lambda d: all(t in d.find_element("tag name", "body").text for t in texts))
    except Exception:
        raise AssertionError(f"{driver.current_url} never showed {texts}; it shows:\n"
                             f"{driver.find_element('tag name', 'body').text[:3000]}") from None
    return driver.find_element("tag name", "body").text


def test_an_existing_experiment_gets_its_kind(search):
    from s3_ray.tracking.mlflow_tracking import Tracker, trial_run_name

    client = store(search[0])[0]
    exp_id = client.create_experiment("old")  # made before experiments had a kind
    Tracker(client.tracking_uri, "old")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    config = {"nfe": 5, "source": "predictor"}
    assert trial_run_name("00012-ab", config, {"score": 0.08341, "fid": 0.08341}) == "nfe5-predictor-fid0.0834-00012-ab"
    assert trial_run_name("00013-cd", config, {"score": 1e4, "fid": 1e4, "failed": True}) == "nfe5-predictor-failed-00013-cd"
    assert trial_run_name("00014-ef", config, {"score": 0.5, "rmse": 0.5}) == "nfe5-predictor-rmse0.5-00014-ef"


def test_store_opens_on_the_work(search):
    """Run names, sortable metrics, the parent's description and links, what it logged (no browser needed)."""
    run_dir, stdout = search
    client, exp, parent, trials = store(run_dir)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.s3-trials"])
    assert view["orderByKey"] == "metrics.`fid`" and "metrics.`nfe`" in view["selectedColumns"]
    assert len(trials) == 9 and {t.data.params["source"] for t in trials} == {"baseline", "random", "predictor"}
    for t in trials:
        m, p = t.data.metrics, t.data.params
        assert m["nfe"] == float(p["nfe"]) and m["stage"] == float(p["stage"])
        who = f"baseline-{t.data.tags['s3.baseline']}" if p["source"] == "baseline" else p["source"]
        assert t.info.run_name == f"nfe{p['nfe']}-{who}-fid{m['fid']:.3g}-{t.data.tags['s3.trial_id']}"
        assert ("s3.baseline" in t.data.tags) == (p["source"] == "baseline")
    # the seeded baselines are named 'builder/discretization' (the smoke space: 2 builders x logsnr_uniform)
    assert {t.data.tags["s3.baseline"] for t in trials if "s3.baseline" in t.data.tags} <= {
        "dpm_solver_pp_2m/logsnr_uniform", "unipc_bh2/logsnr_uniform"}
    note = parent.data.tags["mlflow.note.content"]
    assert "| NFE | S3 FID | best baseline" in note
    for row in json.loads((run_dir / "summary.json").read_text())["rows"]:
        assert f"| {row['nfe']} | {row['searched']:.3f} |" in note
        # whom S3 had to beat, and who won, named on the parent run
        assert parent.data.tags[f"best_baseline_nfe{row['nfe']}"] == row["best_baseline"]
        won = "S3" if row["exported"] == row["searched_hash"] else row["best_baseline"]
        assert parent.data.tags[f"winner_nfe{row['nfe']}"] == won and note.count(f"| {won} |") >= 1
        # the exported schedule was a trial (searched or seeded): linked from the parent
        best = client.get_run(parent.data.tags[f"best_nfe{row['nfe']}_run"])
        assert best.data.tags["s3.schedule_hash"] == load_schedule(run_dir / "best" / f"nfe{row['nfe']}.json").schedule_hash()
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"score_vs_nfe.png", "schedules.png", "search_curve.png", "report.html", "summary.md", "best"} <= logged
    assert f"report: {run_dir / 'report.html'}" in stdout
    assert re.search(r"then open http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?workflowType=machine_learning", stdout)


def test_mlflow_ui_shows_the_trials_first(search, mlflow_ui, browser, tmp_path):
    run_dir, stdout = search
    _, exp, parent, trials = store(run_dir)
    # the URL the search printed, on this test's port
    url = re.search(r"then open (\S+)", stdout).group(1).replace("http://127.0.0.1:5000", mlflow_ui)
    browser.get(url)
    best = min(trials, key=lambda t: t.data.metrics["fid"])
    text = wait_text(browser, *(t.info.run_name for t in trials))
    screenshot(browser, tmp_path, "mlflow-first-view", readme=False)
    assert "/runs" in browser.current_url and "Token Usage" not in text  # not the GenAI overview
    for t in trials:  # every trial with its FID (the column's text is the full float) and NFE
        assert repr(t.data.metrics["fid"]) in text
    headers = [h.text.strip() for h in browser.find_elements("css selector", "[role=columnheader]")]
    assert {"fid", "nfe"} <= set(headers), headers
    # first thing on the page: the best trial's row lies inside the first screenful, above every other trial
    rows = {t.info.run_name: browser.find_element("xpath", f"//*[text()='{t.info.run_name}']").rect["y"] for t in trials}
    height = browser.execute_script("return window.innerHeight")
    assert rows[best.info.run_name] == min(rows.values()) and rows[best.info.run_name] < height
    assert all(y < height for y in rows.values()), (rows, height)
    browser.find_element("css selector", '[data-component-id="mlflow.assistant.chat_panel.close"]').click()
    screenshot(browser, tmp_path, "mlflow-trials")  # for the README: without MLflow's assistant panel

    run_page = f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
    browser.get(f"{run_page}?workflowType=machine_learning")
    wait_text(browser, "searched schedules vs the best tuned baseline")  # the description: the summary table
    note = browser.find_element("xpath", "//*[contains(text(), 'searched schedules vs the best tuned baseline')]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", note)
    screenshot(browser, tmp_path, "mlflow-parent")
    browser.get(f"{run_page}/artifacts?workflowType=machine_learning")
    wait_text(browser, "score_vs_nfe.png", "schedules.png", "search_curve.png", "report.html", "best", "compare")
    screenshot(browser, tmp_path, "mlflow-artifacts")


def test_report_in_chromium(search, browser, tmp_path):
    run_dir, _ = search
    html = (run_dir / "report.html").read_text()
    assert not re.search(r"""src=["'](?!data:)""", html)  # self-contained: every image inline
    browser.get((run_dir / "report.html").as_uri())
    wait_text(browser, "Summary", timeout=30)
    widths = browser.execute_script("return [...document.images].map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 5 and all(w > 0 for w in widths), widths  # FID vs NFE, 2 x samples, schedules, curve
    rows = browser.find_elements("css selector", "#summary tbody tr")
    assert [r.find_elements("tag name", "td")[0].text for r in rows] == ["3", "4"]
    screenshot(browser, tmp_path, "report")
    browser.execute_script("document.querySelector('h2:nth-of-type(2)').scrollIntoView()")
    screenshot(browser, tmp_path, "report-samples")


def test_report_command_rewrites_a_missing_report(search, tmp_path):
    """`s3 report DIR` prints the report's path, writing it (from summary.json and tune/) if missing."""
    run_dir, _ = search
    copy = tmp_path / NAME
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    (copy / "report.html").unlink()
    r = subprocess.run([sys.executable, "-m", "s3_ray.cli", "report", str(copy)], capture_output=True, text=True,
                       timeout=300, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str((copy / "report.html").resolve())
    html = (copy / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and html.count("<tr><td>") == 2
    # the search curve's records, read back from Tune's files: every trial, in suggestion order
    assert [k for k, _, _ in tune_records(copy / "tune")] == sorted(t.data.tags["s3.trial_id"] for t in store(run_dir)[3])
