"""`s3 mlflow-server --backend-store-uri postgresql://...`: a real PostgreSQL (Debian's package),
started here with its own data directory, listening on 127.0.0.1 only, with a password; a smoke
search logs to the server; every trial must be in the database exactly once. PostgreSQL refuses to
run as root, so as root it runs as the ``postgres`` user the package creates. It is stopped by the
PID in its postmaster.pid (never by name)."""

import subprocess
import sys

import pytest

from s3_ray.tracking import server

from .pg_cluster import Postgres, free_port
from .search_helpers import search_cmd, search_env, stop_test_ray, wait_for, write_space

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


def test_search_logs_every_trial_once_to_a_postgres_backed_server(pg, tmp_path):
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
        space = write_space(tmp_path, name="pg", budget=8)
        try:
            r = subprocess.run(search_cmd(space, tmp_path / "runs", "--mlflow-uri", uri), env=search_env(tmp_path),
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
        finally:
            stop_test_ray(tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # read the database itself, not through the server
        c = pg.connect("mlflow")
        with c.cursor() as cur:
            cur.execute("SELECT e.name, t.value, r.status FROM runs r JOIN experiments e USING (experiment_id) "
                        "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 's3.trial_id' WHERE e.name = 'pg'")
            trials = cur.fetchall()
            cur.execute("SELECT count(*) FROM runs r JOIN experiments e USING (experiment_id) JOIN tags t "
                        "ON t.run_uuid = r.run_uuid AND t.key = 's3.kind' AND t.value = 'search' WHERE e.name = 'pg'")
            parents = cur.fetchone()[0]
        c.close()
        assert len(trials) == 8 and len({t[1] for t in trials}) == 8  # every trial, none twice
        assert {t[2] for t in trials} <= {"FINISHED", "FAILED"} and parents == 1
    finally:
        server.stop_server(proc)
