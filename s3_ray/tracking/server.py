"""``s3 mlflow-server``: an MLflow tracking server for searches.

sqlite backend store ``<runs>/mlflow-server.db`` (or a PostgreSQL database, ``backend_store_uri``
``postgresql://USER[:PASSWORD]@HOST:PORT/DB``, for a server several searches share) and proxied
artifacts under ``<runs>/mlartifacts``,
bound to 127.0.0.1 unless ``--host`` says otherwise, one uvicorn worker, and the server's job
executor off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: otherwise ~7 extra processes, ~2.2 GB).

The server runs in its own process group (``mlflow server`` starts uvicorn as a child): it is stopped
by that group's id, never by name.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
HEALTH_TIMEOUT_S = 120.0  # measured: healthy after 15-23 s on 2 cores (first start: DB migrations)
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# MLflow >= 3.2 sends usage data to config.mlflow-telemetry.io from every client and server by
# default; our processes talk only to the tracking server they are given. A value already in the
# environment wins (MLFLOW_DISABLE_TELEMETRY=false opts back in).
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true"}


class ServerError(RuntimeError):
    """The server could not start; the message says what happened and what to run next."""


BACKEND_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")


def backend_uri(runs: str | Path, backend_store_uri: str | None = None) -> str:
    return backend_store_uri or f"sqlite:///{Path(runs).resolve() / 'mlflow-server.db'}"


def redact(uri: str) -> str:
    """``uri`` with its password, if any, replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(uri)
    if u.password is None:
        return uri
    netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
    return urlunsplit(u._replace(netloc=netloc))


def check_backend(uri: str, timeout: float = 10.0) -> None:
    """ServerError unless ``uri`` is an sqlite file URI or a PostgreSQL database this machine can
    connect to (checked with a real connection, so a wrong host, password or database name is named
    before the server starts)."""
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme not in BACKEND_SCHEMES:
        raise ServerError(f"--backend-store-uri: {redact(uri)!r} is not supported: give sqlite:///FILE or "
                          "postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE")
    if scheme == "sqlite":
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(max(1, timeout))})
        with engine.connect() as c:
            c.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as e:  # noqa: BLE001 (the driver's errors have no common base we can name)
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise ServerError(f"--backend-store-uri: cannot connect to {redact(uri)}: {first}") from None


def artifacts_dir(runs: str | Path) -> Path:
    return Path(runs).resolve() / "mlartifacts"


def client_uri(host: str, port: int) -> str:
    """The URI a client on this machine uses (a wildcard bind is reached through loopback)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def server_command(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, runs: str | Path = "runs",
                   allowed_hosts: str | None = None, backend_store_uri: str | None = None) -> list[str]:
    """The ``mlflow server`` command line (absolute paths: the server's cwd does not matter)."""
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", backend_uri(runs, backend_store_uri),
           "--serve-artifacts", "--artifacts-destination", str(artifacts_dir(runs)),
           "--host", host, "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def server_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(SERVER_ENV)
    return {**NO_TELEMETRY, **env}


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_bind(host: str, port: int) -> None:
    """ServerError unless ``host`` resolves to an address of this machine and ``port`` is free there."""
    if not 1 <= port <= 65535:
        raise ServerError(f"--port {port}: not a port (1..65535)")
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ServerError(f"--host {host}: not an address or a name this machine resolves "
                          f"({getattr(e, 'strerror', None) or e})") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServerError(f"port {port} on {host} is already in use (another MLflow server?): "
                                  f"stop it, or pick another port with --port") from None
            raise ServerError(f"--host {host}: cannot listen on {addr[0]} port {port} ({e.strerror}); "
                              f"give an address of this machine, e.g. 127.0.0.1") from None


def start_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, runs: str | Path = "runs",
                 allowed_hosts: str | None = None, log: str | Path | None = None,
                 env: dict | None = None, backend_store_uri: str | None = None) -> subprocess.Popen:
    """Start ``mlflow server`` in a new process group; returns at once (see ``wait_healthy``).
    Output goes to ``log`` (appended) if given, else to this process's stdout/stderr."""
    check_bind(host, port)
    Path(runs).mkdir(parents=True, exist_ok=True)
    artifacts_dir(runs).mkdir(parents=True, exist_ok=True)
    out = open(log, "ab") if log else None  # noqa: SIM115 (kept open by the child)
    try:
        return subprocess.Popen(server_command(host, port, runs, allowed_hosts, backend_store_uri), env=server_env(env),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out:
            out.close()


def is_healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(uri: str, timeout: float = HEALTH_TIMEOUT_S, proc: subprocess.Popen | None = None,
                 interval: float = 0.5) -> bool:
    """Poll ``<uri>/health`` until it answers 200 (True), ``proc`` exits or ``timeout`` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        if is_healthy(uri):
            return True
        time.sleep(interval)
    return False


def stop_server(proc: subprocess.Popen, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """Stop the server's process group (``mlflow server`` and its uvicorn child): ``sig``, then
    SIGKILL for whatever is left after ``timeout``."""
    _killpg(proc.pid, sig)  # the group we created (start_new_session): pgid == pid
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    _wait_group_gone(proc.pid, timeout)
    if proc.poll() is None or _group_alive(proc.pid):
        _killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(proc.pid, 5.0)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _wait_group_gone(pgid: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and _group_alive(pgid):
        time.sleep(0.1)


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, runs: str | Path = "runs",
          allowed_hosts: str | None = None, timeout: float = HEALTH_TIMEOUT_S, out=sys.stdout,
          backend_store_uri: str | None = None) -> int:
    """Run the server in the foreground until Ctrl-C / SIGTERM; returns its exit status."""
    check_bind(host, port)
    if backend_store_uri:
        check_backend(backend_store_uri)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding MLflow to {host}: anyone who can reach this machine on port {port} can read and "
              f"write every run (MLflow has no authentication here); keep it behind a firewall or a private "
              f"network, and set --allowed-hosts to the names clients use", file=sys.stderr)
    proc = start_server(host, port, runs, allowed_hosts, backend_store_uri=backend_store_uri)
    uri = client_uri(host, port)

    def _term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        if not wait_healthy(uri, timeout, proc):
            rc = proc.poll()
            why = f"it exited with status {rc}" if rc is not None else f"{uri}/health did not answer within {timeout:.0f} s"
            raise ServerError(f"the MLflow server did not start ({why}); its output is above. "
                              f"Check that {runs} is writable, port {port} is free and the backend store "
                              f"{redact(backend_uri(runs, backend_store_uri))} is reachable, then rerun "
                              f"`s3 mlflow-server` (add --timeout for a slow machine)")
        print(f"MLflow server ready at {uri} (backend {redact(backend_uri(runs, backend_store_uri))}, artifacts {artifacts_dir(runs)})\n"
              f"  search with: s3 search --space SPACE.yaml --mlflow-uri {uri}\n"
              f"  stop with Ctrl-C", file=out, flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        print("stopping the MLflow server", file=out, flush=True)
        return 0
    finally:
        stop_server(proc)
        signal.signal(signal.SIGTERM, old)
