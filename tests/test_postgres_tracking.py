"""`s3 mlflow-server --backend-store-uri postgresql://...`: a real PostgreSQL (Debian's package),
started here with its own data directory, listening on 127.0.0.1 only, with a password; a smoke
search logs to the server; every trial must be in the database exactly once. PostgreSQL refuses to
run as root, so as root it runs as the ``postgres`` user the package creates. It is stopped by the
PID in its postmaster.pid (never by name). The outage test shuts the database down in the middle of
a search (the MLflow server stays up and answers ``/health``), starts it again, and checks that
nothing is lost or logged twice."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from s3_ray.tracking import server
from s3_ray.tracking.mlflow_tracking import server_reachable

from .pg_cluster import Postgres, free_port
from .search_helpers import ROOT, search_cmd, search_env, stop_test_ray, wait_for, write_space

OUTAGE_S = 12  # the database is down this long: trials end meanwhile (3-4 s each)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg():
    try:
        p = Postgres()
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield p
    finally:
        p.stop()


def _listening(pid: int) -> set[str]:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}


def test_postgres_listens_on_loopback_only(pg):
    assert _listening(pg.pid) == {"127.0.0.1"}


def test_bad_backend_store_uris_are_refused_naming_the_flag(pg, tmp_path):
    def cli(uri):
        return subprocess.run([sys.executable, "-m", "s3_ray.cli", "mlflow-server", "--port", str(free_port()),
                               "--runs", str(tmp_path), "--backend-store-uri", uri],
                              capture_output=True, text=True, timeout=120)

    r = cli(pg.uri(password="not-the-password"))
    assert r.returncode == 2 and "--backend-store-uri: cannot connect to" in r.stderr
    assert "password authentication failed" in r.stderr and "not-the-password" not in r.stderr  # redacted
    r = cli(pg.uri(db="no_such_db"))
    assert r.returncode == 2 and 'database "no_such_db" does not exist' in r.stderr
    assert pg.password not in r.stderr
    r = cli("mysql://u@127.0.0.1/x")
    assert r.returncode == 2 and "--backend-store-uri: 'mysql://u@127.0.0.1/x' is not supported" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def _start_server(pg, tmp_path):
    """`s3 mlflow-server` on a new database ``mlflow`` of ``pg``, ready; returns (process, uri)."""
    c = pg.connect()
    c.execute("CREATE DATABASE mlflow")
    c.close()
    port = free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "s3_ray.cli", "mlflow-server", "--port", str(port), "--runs",
                             str(tmp_path / "srv"), "--backend-store-uri", pg.uri("mlflow")],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
    uri = server.client_uri("127.0.0.1", port)
    try:
        assert server.wait_healthy(uri, 180, proc), log.read_text()[-3000:]
        # /health answers before `s3 mlflow-server` (which polls it) prints its ready line: wait for the line
        ready = f"backend postgresql://{pg.user}:***@127.0.0.1:{pg.port}/mlflow"
        assert wait_for(lambda: ready in log.read_text(), 30, 0.1), log.read_text()[-3000:]
    except BaseException:
        server.stop_server(proc)
        raise
    return proc, uri


def _trials_in_db(pg, experiment: str) -> tuple[list[tuple], int]:
    """(name, trial id, status) of every trial's child run, and the number of parent runs, read from
    the database itself, not through the server. A child run the logger deleted (a leftover of a
    request cut off by the outage, replaced by a complete one) is not a trial's run: only active
    runs count, as in the MLflow UI."""
    c = pg.connect("mlflow")
    with c.cursor() as cur:
        cur.execute("SELECT e.name, t.value, r.status FROM runs r JOIN experiments e USING (experiment_id) "
                    "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 's3.trial_id' "
                    "WHERE e.name = %s AND r.lifecycle_stage = 'active'",
                    (experiment,))
        trials = cur.fetchall()
        cur.execute("SELECT count(*) FROM runs r JOIN experiments e USING (experiment_id) JOIN tags t "
                    "ON t.run_uuid = r.run_uuid AND t.key = 's3.kind' AND t.value = 'search' WHERE e.name = %s",
                    (experiment,))
        parents = cur.fetchone()[0]
    c.close()
    return trials, parents


def _count_in_db(pg, experiment: str) -> int:
    try:
        return len(_trials_in_db(pg, experiment)[0])
    except Exception:  # noqa: BLE001 (no tables yet, or the database is down)
        return -1


def test_search_logs_every_trial_once_to_a_postgres_backed_server(pg, tmp_path):
    proc, uri = _start_server(pg, tmp_path)
    try:
        space = write_space(tmp_path, name="pg", budget=8)
        try:
            r = subprocess.run(search_cmd(space, tmp_path / "runs", "--mlflow-uri", uri), env=search_env(tmp_path),
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
        finally:
            stop_test_ray(tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        trials, parents = _trials_in_db(pg, "pg")
        assert len(trials) == 8 and len({t[1] for t in trials}) == 8  # every trial, none twice
        assert {t[2] for t in trials} <= {"FINISHED", "FAILED"} and parents == 1
    finally:
        server.stop_server(proc)


def test_a_database_outage_mid_search_loses_nothing(tmp_path):
    """PostgreSQL goes down while the search runs and the MLflow server stays up: the logger must
    see the outage (``/health`` still answers), keep the trials that end meanwhile, log them when
    the database is back while the search still runs, and leave every trial in the database once."""
    budget = 16
    db = Postgres()  # its own cluster: this test shuts it down
    proc = search = None
    try:
        proc, uri = _start_server(db, tmp_path)
        smoke = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
        # 5,000 samples: ~3-4 s per trial, so that trials end during the outage and run after it
        space = write_space(tmp_path, name="pgoutage", budget=budget, concurrency=1,
                            metric={**smoke["metric"], "samples": [5000]})
        out, err = tmp_path / "search.out", tmp_path / "search.err"
        with open(out, "w") as o, open(err, "w") as e:
            search = subprocess.Popen(search_cmd(space, tmp_path / "runs", "--mlflow-uri", uri),
                                      env=search_env(tmp_path), cwd=tmp_path, stdout=o, stderr=e,
                                      start_new_session=True)
        assert wait_for(lambda: _count_in_db(db, "pgoutage") >= 2 or search.poll() is not None, timeout=300)
        assert search.poll() is None, "the search ended before the outage: " + err.read_text()[-2000:]
        db.shut_down()
        assert server.is_healthy(uri) and not server_reachable(uri)  # /health answers; the store does not
        time.sleep(OUTAGE_S)
        db.start()
        assert wait_for(lambda: server_reachable(uri), timeout=60), "the server did not reconnect to the database"
        back = _count_in_db(db, "pgoutage")
        search.wait(timeout=600)
        text = out.read_text() + err.read_text()
        assert search.returncode == 0, text[-4000:]
        assert f"MLflow at {uri} is unreachable" in text, text[-3000:]
        logged = [int(m) for m in re.findall(rf"MLflow at {re.escape(uri)} is reachable again after \d+ s: "
                                             rf"logged (\d+) pending", text)]
        assert logged and logged[0] >= 1, text[-3000:]  # the trials of the outage, logged while the search ran
        trials, parents = _trials_in_db(db, "pgoutage")
        ids = [t[1] for t in trials]
        assert len(ids) == budget and len(set(ids)) == budget, sorted(ids)
        assert {t[2] for t in trials} <= {"FINISHED", "FAILED"} and parents == 1
        print(f"\n{back} trial runs in the database when it was back; {logged[0]} logged from the outage")
    finally:
        if search is not None and search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
            search.wait(timeout=30)
        stop_test_ray(tmp_path)
        if proc is not None:
            server.stop_server(proc)
        db.stop()
