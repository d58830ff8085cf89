"""`s3 mlflow-server --backend-store-uri postgresql://...`: a real PostgreSQL (Debian's package),
started here with its own data directory, listening on 127.0.0.1 only, with a password; a smoke
search logs to the server; every trial must be in the database exactly once. PostgreSQL refuses to
run as root, so as root it runs as the ``postgres`` user the package creates. It is stopped by the
PID in its postmaster.pid (never by name)."""

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from s3_ray.tracking import server

from .search_helpers import search_cmd, search_env, stop_test_ray, wait_for, write_space
from .test_mlflow_outage import free_port

pytestmark = pytest.mark.slow


def _pg_bin() -> Path | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").is_file():
            return d
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:port with one password-protected user."""

    def __init__(self):
        self.bin = _pg_bin()
        if self.bin is None:
            pytest.fail("PostgreSQL is not installed: run `make postgres` (Debian's postgresql package)")
        self.dir = Path(tempfile.mkdtemp(prefix="s3pg-", dir="/tmp"))
        self.data, self.sock = self.dir / "data", self.dir / "sock"
        self.sock.mkdir()
        self.port, self.user, self.password = free_port(), "s3", secrets.token_hex(12)
        self.as_user = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for p in (self.dir, self.sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                  "-A", "scram-sha-256", "--no-sync", "-E", "UTF8")
        pwfile.unlink()
        self.log = self.dir / "log"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def _run(self, *cmd):
        r = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    def uri(self, db: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{self.user}:{password or self.password}@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str = "postgres"):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=db,
                               autocommit=True)

    def stop(self):
        try:
            os.kill(self.pid, signal.SIGINT)  # "fast" shutdown of the postmaster we started
        except ProcessLookupError:
            pass
        wait_for(lambda: not Path(f"/proc/{self.pid}").exists(), 30, 0.2)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pg():
    p = Postgres()
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
