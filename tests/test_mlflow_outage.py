"""The MLflow tracking server: `s3 mlflow-server`, and a server that goes down in the middle of a search.

The outage test runs a real `mlflow server` (started by ``s3_ray.tracking.server``), a smoke search
in a subprocess logging to it, kills the server (SIGKILL to its process group) after a few trials,
restarts it on the same backend store with `s3 mlflow-server`, and checks that the trials that ended
during the outage reached MLflow while the search still ran trials (not only at its end), that the
search finished, and that every trial reached MLflow exactly once. Every process started here is
stopped by PID.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from s3_ray.tracking import server
from s3_ray.tracking.mlflow_tracking import HTTP_LIMITS, MlflowTrialCallback, set_client_env, write_tracking

from .search_helpers import ROOT, search_cmd, search_env, stop_test_ray, tune_trials, wait_for

BUDGET = 16
OUTAGE_S = 3  # from the kill to the restart (which then takes 15-40 s to be healthy)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- fast: command line, retry bounds, a callback facing a dead server ----------------------------

def test_server_command_defaults(tmp_path):
    cmd = server.server_command(runs=tmp_path / "r")
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    arg = dict(zip(cmd[4::1], cmd[5::1]))
    assert arg["--host"] == "127.0.0.1" and arg["--port"] == "5000" and arg["--workers"] == "1"
    assert arg["--backend-store-uri"] == f"sqlite:///{(tmp_path / 'r').resolve()}/mlflow-server.db"
    assert arg["--artifacts-destination"] == str((tmp_path / "r").resolve() / "mlartifacts")
    assert "--serve-artifacts" in cmd and "--allowed-hosts" not in cmd
    assert server.server_env({})["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert server.server_env({})["MLFLOW_DISABLE_TELEMETRY"] == "true"  # no usage data to mlflow-telemetry.io
    assert server.server_env({"MLFLOW_DISABLE_TELEMETRY": "false"})["MLFLOW_DISABLE_TELEMETRY"] == "false"
    wide = server.server_command("0.0.0.0", 5001, tmp_path, allowed_hosts="mlflow:5001")
    assert wide[wide.index("--host") + 1] == "0.0.0.0" and wide[wide.index("--allowed-hosts") + 1] == "mlflow:5001"
    assert server.client_uri("0.0.0.0", 5001) == "http://127.0.0.1:5001"


def test_mlflow_server_cli_refuses_a_busy_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "s3_ray.cli", "mlflow-server", "--port", str(port), "--runs",
                            str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in r.stderr
    assert "--port" in r.stderr and "Traceback" not in r.stderr


def test_client_env_bounds_retries_disables_telemetry_and_keeps_user_values(monkeypatch):
    for k in [*HTTP_LIMITS, "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    set_client_env()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    from mlflow.environment_variables import (
        MLFLOW_DISABLE_TELEMETRY,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() <= 3 and MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 42
    assert MLFLOW_DISABLE_TELEMETRY.get() is True
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # a user who opts in keeps it
    set_client_env()
    assert MLFLOW_DISABLE_TELEMETRY.get() is False


def test_callback_does_not_stall_on_a_dead_server(tmp_path, monkeypatch, capsys):
    """With the default client settings one failed request takes ~4 minutes of retries; the callback's
    logger thread must give up within seconds, keep the trial pending and not retry before
    RETRY_AFTER_S. Tune's loop (``on_trial_complete``) never waits for the server."""
    for k in HTTP_LIMITS:
        monkeypatch.delenv(k, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    write_tracking(tmp_path / "tracking.json", uri, "dead", None, "parent-0")
    cb = MlflowTrialCallback(str(tmp_path / "tracking.json"))
    trial = SimpleNamespace(config={"trial_key": "00001-abc"}, last_result={"score": 1.0})
    t0 = time.monotonic()
    cb.on_trial_complete(0, [], trial)
    cb.wait()
    first = time.monotonic() - t0
    next_probe = cb._next_try
    trial2 = SimpleNamespace(config={"trial_key": "00002-def"}, last_result={"score": 2.0})
    t1 = time.monotonic()
    cb.on_trial_complete(1, [], trial2)
    cb.wait()
    second = time.monotonic() - t1
    assert cb._next_try == next_probe  # completions while down do not put the next probe off
    assert first < 15, f"the logger gave up on the dead server only after {first:.1f} s"
    assert second < 1.0 and set(cb._pending) == {"00001-abc", "00002-def"}
    cb.on_experiment_end([])
    assert cb._thread is None and set(cb._pending) == {"00001-abc", "00002-def"}  # left to the final sync
    err = capsys.readouterr().err
    assert f"MLflow at {uri} is unreachable" in err and "--resume" in err and err.count("unreachable") == 1
    restored = MlflowTrialCallback.__new__(MlflowTrialCallback)
    restored.__setstate__(cb.__getstate__())  # pickled into tuner.pkl: only the tracking file's path travels
    assert cb.__getstate__() == {"tracking_file": str(tmp_path / "tracking.json")}
    assert restored.tracking_file == cb.tracking_file and restored._pending == {} and restored._tracker is None


def _sqlite_parent(tmp_path, experiment: str):
    """An sqlite store with a parent run, and a trial config of a DPM-Solver++(2M) schedule."""
    from s3_ray.config import load_config
    from s3_ray.tracking.mlflow_tracking import Tracker
    from s3_ray.usf.baselines import build_baseline
    from s3_ray.usf.noise import VPLinear

    uri, cfg = f"sqlite:///{tmp_path / 'm.db'}", load_config(ROOT / "search_spaces" / "smoke.yaml")
    t = Tracker(uri, experiment, (tmp_path / "art").as_uri())
    t.start_parent(cfg.model_dump(mode="json"), "s3")
    s = build_baseline("dpm_solver_pp_2m", VPLinear(), 4)
    config = {"schedule": s.to_json(), "schedule_hash": s.schedule_hash(), "source": "baseline", "nfe": 4, "stage": 0,
              "samples": 200, "seed": 0}
    return uri, cfg, t, config


def test_partial_child_run_is_replaced_not_duplicated(tmp_path, monkeypatch, capsys):
    """A child run cut off mid-logging (server killed between create_run and set_terminated) is still
    RUNNING: the next log_trial replaces it, so the trial ends up in MLflow once, complete. And the
    callback logs the trials it kept during an outage as soon as the store answers again."""
    from s3_ray.tracking.mlflow_tracking import KIND_TAG, PARENT_TAG, TRIAL_TAG, Tracker

    uri, cfg, t, config = _sqlite_parent(tmp_path, "partial")
    t.client.create_run(t.experiment_id, tags={PARENT_TAG: t.parent_id, TRIAL_TAG: "00001-x", KIND_TAG: "trial"})
    t2 = Tracker(uri, "partial", None)
    assert t2.start_parent(cfg.model_dump(mode="json"), "s3", resume_id=t.parent_id) == t.parent_id
    assert t2.logged_trial_ids() == set() and set(t2._partial) == {"00001-x"}
    assert t2.log_trial("00001-x", config, {"score": 1.5, "fid": 1.5, "seconds": 0.1, "failed": 0})
    t3 = Tracker(uri, "partial")
    t3.start_parent(cfg.model_dump(mode="json"), "s3", resume_id=t.parent_id)
    assert t3.sync_trials([("00001-x", config, {"score": 9.0})]) == 0  # already there, complete
    runs = t.client.search_runs([t.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '00001-x'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.metrics["score"] == 1.5

    for k in HTTP_LIMITS:
        monkeypatch.delenv(k, raising=False)
    record = tmp_path / "tracking.json"
    write_tracking(record, f"http://127.0.0.1:{free_port()}", "partial", None, t.parent_id)  # down
    cb = MlflowTrialCallback(str(record))
    cb.on_trial_complete(0, [], SimpleNamespace(config={**config, "trial_key": "00002-y"}, last_result={"score": 2.5}))
    cb.close()
    assert set(cb._pending) == {"00002-y"} and cb._down_since is not None
    write_tracking(record, uri, "partial", None, t.parent_id)  # back (the same store, reachable now)
    cb._uri, cb._next_try = None, 0.0
    assert cb.flush() == 1 and cb._pending == {} and cb._down_since is None
    assert "reachable again" in capsys.readouterr().err
    assert t.client.search_runs([t.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '00002-y'")[0].info.status == "FINISHED"


def test_leftover_running_runs_beside_a_complete_one_are_deleted(tmp_path):
    """A request repeated after an outage can leave a RUNNING child run next to the trial's complete
    one (or two RUNNING ones): the next scan deletes the leftovers, keeps the complete run, and keeps
    one RUNNING run per unlogged trial to replace."""
    from s3_ray.tracking.mlflow_tracking import KIND_TAG, PARENT_TAG, TRIAL_TAG, Tracker

    uri, cfg, t, config = _sqlite_parent(tmp_path, "leftover")
    assert t.log_trial("00001-a", config, {"score": 1.5, "fid": 1.5, "seconds": 0.1, "failed": 0})
    tags = {PARENT_TAG: t.parent_id, KIND_TAG: "trial"}
    stale = t.client.create_run(t.experiment_id, tags={**tags, TRIAL_TAG: "00001-a"}).info.run_id
    cut = [t.client.create_run(t.experiment_id, tags={**tags, TRIAL_TAG: "00002-b"}).info.run_id for _ in range(2)]

    t2 = Tracker(uri, "leftover", None)
    t2.start_parent(cfg.model_dump(mode="json"), "s3", resume_id=t.parent_id)
    assert t2.logged_trial_ids() == {"00001-a"} and set(t2._partial) == {"00002-b"}
    kept = t2._partial["00002-b"]
    assert kept in cut and t.client.get_run(kept).info.lifecycle_stage == "active"
    assert [t.client.get_run(r).info.lifecycle_stage for r in (stale, *set(cut) - {kept})] == ["deleted", "deleted"]
    assert t2.log_trial("00002-b", config, {"score": 2.5, "fid": 2.5, "seconds": 0.1, "failed": 0})
    runs = t.client.search_runs([t.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{t.parent_id}'")
    assert sorted((r.data.tags[TRIAL_TAG], r.info.status) for r in runs) == [("00001-a", "FINISHED"),
                                                                              ("00002-b", "FINISHED")]


def test_callback_logs_in_its_own_thread_and_the_experiment_end_waits(tmp_path, monkeypatch):
    """Child runs are written by the logger thread, not by Tune's loop; ``on_experiment_end`` returns
    only when every completed trial is in MLflow (the driver's final sync must not race the thread)."""
    import threading

    from s3_ray.config import load_config
    from s3_ray.tracking.mlflow_tracking import TRIAL_TAG, Tracker
    from s3_ray.usf.baselines import build_baseline
    from s3_ray.usf.noise import VPLinear

    uri, cfg = f"sqlite:///{tmp_path / 'm.db'}", load_config(ROOT / "search_spaces" / "smoke.yaml")
    t = Tracker(uri, "bg", (tmp_path / "art").as_uri())
    t.start_parent(cfg.model_dump(mode="json"), "s3")
    s = build_baseline("unipc_bh2", VPLinear(), 4)
    config = {"schedule": s.to_json(), "schedule_hash": s.schedule_hash(), "source": "baseline", "nfe": 4, "stage": 0,
              "samples": 200, "seed": 0}
    threads = []
    log_trial = Tracker.log_trial

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return log_trial(self, *args, **kwargs)

    monkeypatch.setattr(Tracker, "log_trial", spy)
    write_tracking(tmp_path / "tracking.json", uri, "bg", None, t.parent_id)
    cb = MlflowTrialCallback(str(tmp_path / "tracking.json"))
    keys = [f"{i:05d}-k" for i in range(6)]
    for i, key in enumerate(keys[:5]):
        cb.on_trial_complete(i, [], SimpleNamespace(config={**config, "trial_key": key}, last_result={"score": i + 0.5}))
    cb.on_experiment_end([])
    assert cb._thread is None and cb._pending == {}
    logged = t.client.search_runs([t.experiment_id], filter_string="tags.`s3.kind` = 'trial'")
    assert sorted(r.data.tags[TRIAL_TAG] for r in logged) == keys[:5]
    assert all(r.info.status == "FINISHED" for r in logged)
    assert threads and set(threads) == {"s3-mlflow-log"} and threading.current_thread().name not in threads
    cb.on_trial_complete(5, [], SimpleNamespace(config={**config, "trial_key": keys[5]}, last_result={"score": 9.0}))
    cb.close()  # a completion after the end starts the thread again
    logged = t.client.search_runs([t.experiment_id], filter_string="tags.`s3.kind` = 'trial'")
    assert sorted(r.data.tags[TRIAL_TAG] for r in logged) == keys


def test_search_refuses_to_start_without_its_server(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    space = tmp_path / "space.yaml"
    space.write_text((ROOT / "search_spaces" / "smoke.yaml").read_text())
    env = search_env(tmp_path)
    for k in HTTP_LIMITS:
        env.pop(k, None)
    t0 = time.monotonic()
    try:
        r = subprocess.run(search_cmd(space, tmp_path / "runs", "--mlflow-uri", uri), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    finally:
        stop_test_ray(tmp_path)  # none should have started; removes the test's Ray temp dir
    assert r.returncode == 2 and f"cannot reach MLflow at {uri}" in r.stderr, r.stderr[-2000:]
    assert "s3 mlflow-server" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60


# ---- slow: a real server killed and restarted during a real search -------------------------------

def _space(tmp):
    data = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    # bigger samples: ~3-4 s per trial here, so that trials still run after the outage (~20-45 s)
    data.update(name="outage", budget=BUDGET, concurrency=1, metric={**data["metric"], "samples": [5000]})
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _trial_runs(uri):
    c = _client(uri)
    exp = c.get_experiment_by_name("outage")
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], filter_string="tags.`s3.kind` = 'trial'", max_results=1000)


def _count(uri):
    try:
        return len(_trial_runs(uri))
    except Exception:  # noqa: BLE001
        return -1


def _logged_since(uri, t: float) -> list[float]:
    """When the child runs created after ``t`` (time.time()) were created; [] if none, or unreachable."""
    try:
        return sorted(r.info.start_time / 1000 for r in _trial_runs(uri) if r.info.start_time / 1000 > t)
    except Exception:  # noqa: BLE001
        return []


@pytest.mark.slow
def test_search_survives_mlflow_outage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this test's own polling: fail fast
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    port, store = free_port(), tmp_path / "mlflow"
    uri = f"http://127.0.0.1:{port}"
    env = search_env(tmp_path)
    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(k, None)  # the search uses its own bounds
    out, err = tmp_path / "search.out", tmp_path / "search.err"
    srv = server.start_server("127.0.0.1", port, store, log=tmp_path / "mlflow-1.log")
    search = cli = None
    t0 = time.monotonic()
    try:
        assert server.wait_healthy(uri, 150, srv), (tmp_path / "mlflow-1.log").read_text()[-3000:]
        t_up = time.monotonic() - t0
        with open(out, "w") as o, open(err, "w") as e:
            search = subprocess.Popen(search_cmd(_space(tmp_path), tmp_path / "runs", "--mlflow-uri", uri), env=env,
                                      cwd=tmp_path, stdout=o, stderr=e, start_new_session=True)
        assert wait_for(lambda: _count(uri) >= 2 or search.poll() is not None, timeout=240), "no trial logged"
        assert search.poll() is None, "the search ended before the outage: " + err.read_text()[-2000:]
        server.stop_server(srv, sig=signal.SIGKILL)  # the outage: the server's whole process group
        t_kill, killed_at = time.monotonic(), time.time()
        assert not server.is_healthy(uri)
        time.sleep(OUTAGE_S)
        log2 = open(tmp_path / "mlflow-2.log", "w")  # noqa: SIM115
        cli = subprocess.Popen([sys.executable, "-m", "s3_ray.cli", "mlflow-server", "--port", str(port), "--runs",
                                str(store)], stdout=log2, stderr=subprocess.STDOUT, start_new_session=True)
        log2.close()
        assert wait_for(lambda: "MLflow server ready at" in (tmp_path / "mlflow-2.log").read_text()
                        or cli.poll() is not None, timeout=150)
        assert cli.poll() is None, (tmp_path / "mlflow-2.log").read_text()[-3000:]
        t_back, back_at = time.monotonic(), time.time()
        # the trials that ended during the outage reach MLflow while the search still runs
        assert wait_for(lambda: search.poll() is not None or _logged_since(uri, killed_at), timeout=300)
        assert search.poll() is None, "the search ended before a trial reached MLflow again: " + err.read_text()[-3000:]
        search.wait(timeout=300)
        t_end = time.monotonic()
        text = out.read_text() + err.read_text()
        assert search.returncode == 0, text[-4000:]
        runs = _trial_runs(uri)
        ids = [r.data.tags["s3.trial_id"] for r in runs]
        assert len(runs) == BUDGET and len(set(ids)) == BUDGET, sorted(ids)
        assert all(r.info.status in ("FINISHED", "FAILED") and "score" in r.data.metrics for r in runs)
        assert f"MLflow at {uri} is unreachable" in text and "--resume" in text
        # ... and not only at the end: the trials that ended during the outage were logged before the last trial
        # ended (a child run's start time is when the driver logged it; Tune's result timestamps are whole
        # seconds, rounded down)
        ended = {t["config"]["trial_key"]: t["result"]["timestamp"]
                 for t in tune_trials(tmp_path / "runs" / "outage" / "tune")}
        created = {r.data.tags["s3.trial_id"]: r.info.start_time / 1000 for r in runs}
        during = [k for k, ts in ended.items() if killed_at <= ts and ts + 1 <= back_at]
        assert during, f"no trial ended during the outage ({killed_at:.0f}-{back_at:.0f} s): {sorted(ended.values())}"
        last_end = max(ended.values())
        assert all(created[k] < last_end for k in during), {k: (ended[k], created[k], last_end) for k in during}
        logged_back = re.search(rf"MLflow at {re.escape(uri)} is reachable again after \d+ s: logged (\d+) pending", text)
        assert logged_back and int(logged_back[1]) >= 1, text[-3000:]
        assert "| NFE | S3 FID | best baseline" in text and f"browse: {uri}" in text
        later = sum(ts > max(created[k] for k in during) for ts in ended.values())
        print(f"\ntimings: server up {t_up:.0f} s, outage {t_back - t_kill:.0f} s, search after restart "
              f"{t_end - t_back:.0f} s, total {t_end - t0:.0f} s; {len(during)} trial(s) ended during the outage, "
              f"{later} after they were logged")
    finally:
        if search is not None and search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
            search.wait(timeout=30)
        stop_test_ray(tmp_path)
        server.stop_server(srv, sig=signal.SIGKILL)
        if cli is not None:
            cli.send_signal(signal.SIGTERM)  # `s3 mlflow-server` stops its own server group
            try:
                cli.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(cli.pid, signal.SIGKILL)
                cli.wait(timeout=10)
    assert cli.returncode == 0 and not server.is_healthy(uri)
    assert wait_for(lambda: not server.port_in_use("127.0.0.1", port), timeout=20), "the server outlived its CLI"
