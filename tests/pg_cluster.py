"""A throwaway PostgreSQL cluster for the tests and ``benchmarks/tracking_load.py``: its own data dir
under /tmp, 127.0.0.1 only at a free port, one scram-password user, stopped by the postmaster's PID.
PostgreSQL refuses to run as root: as root it runs as the Debian package's ``postgres`` user."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    """The directory of ``initdb`` (Debian's versioned one first), or None when not installed."""
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").is_file():
            return d
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


class Postgres:
    """Started on construction; ``stop()`` ends it and deletes its directory."""

    def __init__(self):
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed: run `make postgres` (Debian's postgresql package)")
        self.dir = Path(tempfile.mkdtemp(prefix="s3pg-", dir="/tmp"))
        self.data, self.sock, self.log = self.dir / "data", self.dir / "sock", self.dir / "log"
        self.sock.mkdir()
        self.port, self.user, self.password = free_port(), "s3", secrets.token_hex(12)
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        self.as_user = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for p in (self.dir, self.sock, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                  "-A", "scram-sha-256", "--no-sync", "-E", "UTF8")
        pwfile.unlink()
        self.start()

    def start(self):
        """Start the server on this cluster's data dir and port (again, after ``shut_down``)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def _run(self, *cmd):
        r = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(r.stdout + r.stderr)

    def uri(self, db: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{self.user}:{password or self.password}@127.0.0.1:{self.port}/{db}"

    def uri_without_password(self, db: str) -> str:
        """For a server that gets the password as PGPASSWORD (as the compose file and manifests do)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str = "postgres"):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=db,
                               autocommit=True)

    def version(self) -> str:
        return subprocess.run([str(self.bin / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()

    def shut_down(self):
        """End the server (a "fast" shutdown: open connections are cut), keeping its data."""
        try:
            os.kill(self.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        end = time.time() + 30
        while time.time() < end and Path(f"/proc/{self.pid}").exists():
            time.sleep(0.2)

    def stop(self):
        self.shut_down()
        shutil.rmtree(self.dir, ignore_errors=True)
