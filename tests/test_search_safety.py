"""A search as a careless or hostile user starts it: loopback-only local Ray whatever the
environment, run directories that stay inside ``--runs``, ``--fresh`` that deletes nothing until
every check has passed, checks before anything starts, and a fresh search's own MLflow parent run."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3_ray.tracking import server

from .search_helpers import ROOT, ray_tmpdir, search_cmd, search_env, stop_test_ray, tune_trials, write_space


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp: Path) -> dict:
    """The environment of a user who set nothing of Ray's: only the test's temp-dir marker."""
    env = {k: v for k, v in search_env(tmp).items() if not k.startswith("RAY_") or k == "RAY_TMPDIR"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def s3(args, env, cwd, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s3_ray.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def plant(run_dir: Path) -> list[Path]:
    """Sentinel files inside a directory a bad command could delete, and next to it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "tune").mkdir(exist_ok=True)
    inside, beside = run_dir / "precious.txt", run_dir.parent / "beside.txt"
    inside.write_text("keep")
    beside.write_text("keep")
    return [inside, beside]


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, r.stderr[-2000:]


# ---- §2: --name and --fresh ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["/ABS", "..", "../../x", ".", "a/b", ".hidden", "-rf"])
def test_name_cannot_leave_the_runs_root(tmp_path, name):
    victim = tmp_path / "victim"
    sentinels = plant(victim / "inner")
    runs = victim / "inner" / "runs"
    runs.mkdir()
    name = str(victim / "inner") if name == "/ABS" else name
    space = write_space(tmp_path)
    r = s3(["search", "--space", str(space), "--runs", str(runs), "--name", name, "--fresh"], clean_env(tmp_path),
           tmp_path)
    assert_one_line_error(r, "--name")
    assert all(p.read_text() == "keep" for p in sentinels)
    assert sorted(p.name for p in runs.iterdir()) == [] and not (tmp_path / "x").exists()


def test_name_in_the_space_file_is_checked_too(tmp_path):
    space = write_space(tmp_path, name="..")
    r = s3(["search", "--space", str(space), "--runs", str(tmp_path / "runs"), "--fresh"], clean_env(tmp_path), tmp_path)
    assert_one_line_error(r, "name:", "'..' is not a run name")
    assert not (tmp_path / "runs").exists()


def test_budget_override_is_validated(tmp_path):
    space = write_space(tmp_path)
    r = s3(["search", "--space", str(space), "--runs", str(tmp_path / "runs"), "--budget", "0"], clean_env(tmp_path),
           tmp_path)
    assert r.returncode == 2 and "--budget" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_fresh_keeps_the_old_run_when_mlflow_is_unreachable(tmp_path):
    runs = tmp_path / "runs"
    sentinels = plant(runs / "smoke")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        r = s3(["search", "--space", str(write_space(tmp_path)), "--runs", str(runs), "--fresh", "--mlflow-uri", uri],
               clean_env(tmp_path), tmp_path)
    finally:
        stop_test_ray(tmp_path)
    assert_one_line_error(r, f"cannot reach MLflow at {uri}")
    assert all(p.read_text() == "keep" for p in sentinels)
    assert sorted(p.name for p in (runs / "smoke").iterdir()) == ["precious.txt", "tune"]


# ---- §3: check everything before starting anything -------------------------------------------------

def test_checks_before_anything_starts(tmp_path):
    """Each bad space fails in seconds, with one line naming the field, before Ray or MLflow start and
    without a run directory."""
    env = clean_env(tmp_path)
    cases = [
        (dict(model={"kind": "checkpoint", "noise_schedule": "vp_discrete", "checkpoint": str(tmp_path / "nowhere"),
                     "output": "eps", "time_label": "discrete"},
              metric={"kind": "fid", "reference": "model", "samples": [200]}), "model.checkpoint:"),
        (dict(seed_schedules=[str(tmp_path / "missing.json")]), "seed_schedules[0]:"),
        (dict(nfe=[30]), "nfe: 30 cannot be reached"),
        (dict(model={"kind": "digits", "noise_schedule": "vp_bogus"}), "model.noise_schedule: unknown noise schedule"),
        (dict(decisions={"t_end_range": [0.5, 2.0]}), "decisions.t_end_range: must end below"),
    ]
    for overrides, needle in cases:
        space = write_space(tmp_path, **overrides)
        t0 = time.monotonic()
        r = s3(["search", "--space", str(space), "--runs", str(tmp_path / "runs")], env, tmp_path)
        assert_one_line_error(r, needle)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert time.monotonic() - t0 < 30 and not (tmp_path / "runs").exists()
    assert not Path(ray_tmpdir(tmp_path)).joinpath("session_latest").exists()  # no Ray was started
    stop_test_ray(tmp_path)


def test_resources_beyond_the_machine_fail_at_start(tmp_path):
    runs = tmp_path / "runs"
    sentinels = plant(runs / "smoke")
    space = write_space(tmp_path, resources={"cpu": 64, "gpu": 0})
    try:
        r = s3(["search", "--space", str(space), "--runs", str(runs), "--fresh"], clean_env(tmp_path), tmp_path)
    finally:
        stop_test_ray(tmp_path)
    assert_one_line_error(r, "resources: a trial needs 64 CPU", f"have {os.cpu_count()} CPU")
    assert all(p.read_text() == "keep" for p in sentinels)  # --fresh deleted nothing


def test_a_failed_start_marks_its_parent_run_failed(tmp_path):
    from s3_ray.config import load_config
    from s3_ray.tracking.mlflow_tracking import Tracker

    cfg = load_config(ROOT / "search_spaces" / "smoke.yaml")
    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "smoke", (tmp_path / "art").as_uri())
    pid = t.start_parent(cfg.model_dump(mode="json"), "s3")
    t.fail_parent(pid, "Tuner.fit failed: boom")
    run = t.client.get_run(pid)
    assert run.info.status == "FAILED" and run.data.tags["s3.error"] == "Tuner.fit failed: boom"
    again = t.start_parent(cfg.model_dump(mode="json"), "s3", resume_id=pid)  # --resume takes it up again
    assert again == pid and t.client.get_run(pid).info.status == "RUNNING"
    assert t.start_parent(cfg.model_dump(mode="json"), "s3") != pid  # a new search never does


# ---- §1 and §5: a real search from a clean environment, twice into one real server ---------------

def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


def _listeners(marker: str, seen: dict) -> None:
    """Add (pid, name) -> listening addresses of every process whose environment holds ``marker``."""
    import psutil

    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.environ().get("RAY_TMPDIR") != marker:
                continue
            conns = p.net_connections(kind="inet")
        except (psutil.Error, OSError):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                seen.setdefault((p.pid, p.info["name"]), set()).add(f"{c.laddr.ip}:{c.laddr.port}")


def _parents_and_children(uri: str, name: str) -> dict[str, list]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`s3.kind` = 'search'")
    return {p.info.run_id: c.search_runs([exp.experiment_id], max_results=1000,
                                         filter_string=f"tags.`mlflow.parentRunId` = '{p.info.run_id}'")
            for p in parents}


@pytest.mark.slow
def test_local_search_is_loopback_only_and_a_new_search_gets_its_own_parent(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = clean_env(tmp_path)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env and "RAY_AUTH_MODE" not in env
    budget = 6
    space = write_space(tmp_path, budget=budget, final_top_k=1, metric={"kind": "fid", "reference": "data",
                                                                      "samples": [200], "final_samples": 200,
                                                                      "final_seeds": 1})
    srv = server.start_server("127.0.0.1", port, tmp_path / "mlflow", log=tmp_path / "mlflow.log")
    seen: dict = {}
    try:
        assert server.wait_healthy(uri, 150, srv), (tmp_path / "mlflow.log").read_text()[-3000:]
        runs = tmp_path / "runs"
        cmd = search_cmd(space, runs, "--mlflow-uri", uri)
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        marker = env["RAY_TMPDIR"]
        while proc.poll() is None:  # every process of this Ray session, sampled while the search runs
            _listeners(marker, seen)
            time.sleep(0.5)
        first = proc.stdout.read()
        assert proc.returncode == 0, first[-4000:]
        assert "9223372036854775807" not in first and "Number of trials" not in first  # Tune's banner is off
        assert "View run" not in first  # nor MLflow's per-run URL lines
        names = {n for _, n in seen}
        assert {"gcs_server", "raylet"} <= names and len(seen) >= 4, seen
        wide = {k: sorted(a for a in v if not _loopback(a.rsplit(":", 1)[0])) for k, v in seen.items()}
        assert not any(wide.values()), {k: v for k, v in wide.items() if v}
        print("\nlistening sockets of the search's Ray session:\n" + "\n".join(
            f"  {pid} {name}: {' '.join(sorted(a))}" for (pid, name), a in sorted(seen.items())))
        first_parent = json.loads((runs / "smoke" / "tracking.json").read_text())["parent_run_id"]

        # A second search of the same name into this server (``--fresh`` there, or a new run root) has
        # the same deterministic trial keys: it must get a parent run of its own and log every trial.
        from s3_ray.config import load_config
        from s3_ray.tracking.mlflow_tracking import Tracker

        records = [(t["config"]["trial_key"], t["config"], t["result"]) for t in tune_trials(runs / "smoke" / "tune")]
        assert len(records) == budget
        second = Tracker(uri, "smoke")
        second_parent = second.start_parent(load_config(space).model_dump(mode="json"), "s3")
        assert second.sync_trials(records) == budget
        family = _parents_and_children(uri, "smoke")
        assert set(family) == {first_parent, second_parent} and first_parent != second_parent
        for pid in family:  # each search logged every one of its trials, into its own parent run
            keys = [c.data.tags["s3.trial_id"] for c in family[pid]]
            assert len(keys) == budget == len(set(keys)), (pid, keys)
    finally:
        stop_test_ray(tmp_path)
        server.stop_server(srv, sig=signal.SIGKILL)


def test_submit_without_a_token_warns_that_the_job_goes_out_unauthenticated(tmp_path):
    env = {k: v for k, v in clean_env(tmp_path).items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    args = ["submit", "--address", "http://127.0.0.1:9", "--space", str(write_space(tmp_path))]
    r = s3(args, env, tmp_path)
    assert_one_line_error(r, "warning: no Ray auth token for http://127.0.0.1:9: the job goes out unauthenticated",
                          "cannot reach the Ray dashboard")
    token = tmp_path / "token"
    token.write_text("tok-123")
    r = s3([*args, "--auth-token-file", str(token)], env, tmp_path)
    assert r.returncode == 2 and "unauthenticated" not in r.stderr and "cannot reach" in r.stderr
