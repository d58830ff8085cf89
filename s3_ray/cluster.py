"""Searches as Ray jobs: ``s3 submit`` and ``s3 jobs list|status|logs|stop`` (Ray's Jobs API).

A submitted job runs ``python -m s3_ray.cli search ...`` on the head node, i.e. the same command as
a local ``s3 search`` with ``$RAY_ADDRESS`` set by Ray, so the driver joins the cluster. The search
space is validated here and sent inline (as compact JSON piped to ``--space /dev/stdin``): the
cluster needs the installed package, not the file. ``--working-dir`` uploads a directory instead
(Ray's ``working_dir`` runtime environment; the job then imports ``s3_ray`` from it).

Jobs are ordinary Ray jobs: the submission id is Ray's (``raysubmit_...``), and ``ray job
logs|status|stop|list --address ...`` works on them.

Token authentication (ray 2.60, ``RAY_AUTH_MODE=token`` on the cluster): the dashboard accepts
``Authorization: Bearer <token>`` (or ``X-Ray-Authorization``, or the ``ray-authentication-token``
cookie). Ray's own client sends the header only when ``RAY_AUTH_MODE=token`` is set in the client's
environment, reading the token from ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``,
else ``~/.ray/auth_token``. Here the token is resolved the same way (plus ``--auth-token-file``,
and ``$RAY_AUTH_TOKEN``/``$RAY_AUTH_TOKEN_PATH`` count even without ``RAY_AUTH_MODE``) and passed to
``JobSubmissionClient`` as an explicit header, so it does not depend on the process-wide auth mode.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from s3_ray.errors import first_line

# Environment variables that Ray's submission client lets override an explicit address.
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
                        "benchmarks/results"]


class ClusterError(RuntimeError):
    """The cluster cannot be reached, refused the request, or the job does not exist."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # "--auth-token-file", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH" or "~/.ray/auth_token"
    path: str | None = None


def resolve_token(token_file: str | None = None, environ=None) -> Token | None:
    """The cluster token, looked up like Ray's AuthenticationTokenLoader (see the module docstring)."""
    env = os.environ if environ is None else environ
    if token_file:
        return Token(_read_token(token_file), "--auth-token-file", str(Path(token_file).resolve()))
    mode = env.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return Token(_read_token(env["RAY_AUTH_TOKEN_PATH"]), "RAY_AUTH_TOKEN_PATH", env["RAY_AUTH_TOKEN_PATH"])
    default = Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    if mode == "token" and default.is_file():
        return Token(_read_token(str(default)), "~/.ray/auth_token", str(default))
    return None


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ClusterError(f"cannot read the auth token file {path} ({e.strerror})") from None
    if not token:
        raise ClusterError(f"the auth token file {path} is empty")
    return token


def ray_env_prefix(token: Token | None) -> str:
    """What `ray job ...` needs in its environment to send the same token."""
    if token is None:
        return ""
    if token.source == "RAY_AUTH_TOKEN":
        return "RAY_AUTH_MODE=token "  # and RAY_AUTH_TOKEN, already exported
    return f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={shlex.quote(token.path)} "


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS if it is a URL (inside a Ray job it
    is the GCS address, not the dashboard's)."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or (ray_address if "://" in ray_address else None)
    if not address:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


@contextmanager
def _explicit_address():
    """Ray's client replaces its ``address`` argument with $RAY_API_SERVER_ADDRESS/$RAY_ADDRESS (set
    inside every Ray job and driver); an explicit address must win."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class JobsClient:
    """A thin wrapper over ``ray.job_submission.JobSubmissionClient`` with our token handling."""

    def __init__(self, address: str | None = None, token_file: str | None = None):
        self.address = resolve_address(address)
        self.token = resolve_token(token_file)
        headers = {"Authorization": f"Bearer {self.token.value}"} if self.token else None
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        try:
            with _explicit_address():
                self.client = JobSubmissionClient(self.address, headers=headers)
        except OSError as e:  # requests' ConnectionError/Timeout are OSErrors
            raise ClusterError(f"cannot reach the Ray dashboard at {self.address} ({first_line(e)})") from None
        except AuthenticationError as e:
            hint = (f" (token from {self.token.source})" if self.token else
                    " (the cluster uses token auth: set RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN, or pass --auth-token-file)")
            raise ClusterError(f"{self.address}: {first_line(e)}{hint}") from None
        except RuntimeError as e:
            raise ClusterError(f"{self.address}: {first_line(e)}") from None

    def _call(self, what: str, fn, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise ClusterError(f"{what}: cannot reach {self.address} ({first_line(e)})") from None
        except (RuntimeError, AuthenticationError) as e:
            raise ClusterError(f"{what}: {first_line(e)}") from None

    # ---- jobs --------------------------------------------------------------------------------------
    def submit(self, entrypoint: str, runtime_env: dict, metadata: dict, submission_id: str | None = None) -> str:
        return self._call("submit", self.client.submit_job, entrypoint=entrypoint, runtime_env=runtime_env,
                          metadata=metadata, submission_id=submission_id)

    def list(self):
        jobs = self._call("list", self.client.list_jobs)
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def info(self, job_id: str):
        return self._call(job_id, self.client.get_job_info, job_id)

    def status(self, job_id: str) -> str:
        return str(_status(self.info(job_id)))

    def logs(self, job_id: str) -> str:
        return self._call(job_id, self.client.get_job_logs, job_id)

    def stop(self, job_id: str) -> bool:
        return self._call(job_id, self.client.stop_job, job_id)

    def follow(self, job_id: str, out=sys.stdout) -> str:
        """Stream the job's logs until it ends; returns its final status."""
        self.info(job_id)  # a clear error for an unknown job

        async def tail():
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        try:
            asyncio.run(tail())
        except Exception as e:  # the websocket dropped (aiohttp, proxy, ...): fall back to polling
            print(f"(log stream interrupted: {first_line(e)}; polling for the job's status)", file=sys.stderr)
        return self.wait(job_id)

    def wait(self, job_id: str, timeout: float | None = None, interval: float = 1.0) -> str:
        end = None if timeout is None else time.time() + timeout
        while True:
            status = self.status(job_id)
            if status in TERMINAL:
                return status
            if end is not None and time.time() > end:
                raise ClusterError(f"{job_id}: still {status} after {timeout:.0f} s")
            time.sleep(interval)

    def logs_command(self, job_id: str, follow: bool = True) -> str:
        return f"{ray_env_prefix(self.token)}ray job logs --address {self.address} {'--follow ' if follow else ''}{job_id}"


def _status(info) -> str:
    s = info.status
    return getattr(s, "value", str(s))


# ---- s3 submit ---------------------------------------------------------------------------------

def search_entrypoint(space_json: str, *, mlflow_uri=None, budget=None, algo="s3", name=None, runs=None,
                      resume=False, fresh=False, python="python") -> str:
    """The job's shell command: ``s3 search`` with the space piped in as JSON."""
    args = [python, "-m", "s3_ray.cli", "search", "--space", "/dev/stdin", "--algo", algo]
    for flag, value in (("--mlflow-uri", mlflow_uri), ("--budget", budget), ("--name", name), ("--runs", runs)):
        if value is not None:
            args += [flag, str(value)]
    if resume:
        args.append("--resume")
    if fresh:
        args.append("--fresh")
    return f"printf '%s\\n' {shlex.quote(space_json)} | {shlex.join(args)}"


def submit_search(address: str | None, space: str, *, mlflow_uri=None, budget=None, algo="s3", name=None, runs=None,
                  resume=False, fresh=False, working_dir=None, submission_id=None, token_file=None,
                  python="python", env_vars: dict | None = None) -> tuple[JobsClient, str, str]:
    """Validate the space here, submit the search as a Ray job; returns (client, submission id, run name)."""
    import yaml

    from s3_ray.config import load_config, with_overrides

    # ConfigError (exit 2) before anything reaches the cluster
    cfg = with_overrides(load_config(space), {"budget": ("--budget", budget), "name": ("--name", name)})
    run_name = cfg.name
    space_json = json.dumps(yaml.safe_load(Path(space).read_text()), separators=(",", ":"), sort_keys=True)
    entrypoint = search_entrypoint(space_json, mlflow_uri=mlflow_uri, budget=budget, algo=algo, name=name, runs=runs,
                                   resume=resume, fresh=fresh, python=python)
    runtime_env: dict = {"env_vars": {"OMP_NUM_THREADS": "1", **(env_vars or {})}}
    if working_dir:
        wd = Path(working_dir)
        if not wd.is_dir():
            raise ClusterError(f"--working-dir {working_dir}: not a directory")
        runtime_env["working_dir"] = str(wd.resolve())
        runtime_env["excludes"] = WORKING_DIR_EXCLUDES
    metadata = {"s3.search": run_name, "s3.algo": algo, "s3.budget": str(cfg.budget), "s3.space": str(space),
                "submitted_by": "s3 submit"}
    if resolve_token(token_file) is None:
        print(f"warning: no Ray auth token for {resolve_address(address)}: the job goes out unauthenticated. A "
              f"cluster with token auth refuses it; one without lets anyone who reaches its dashboard run code. "
              f"The cluster files we ship enable token auth: pass --auth-token-file (or set RAY_AUTH_TOKEN)",
              file=sys.stderr)
    client = JobsClient(address, token_file)
    job_id = client.submit(entrypoint, runtime_env, metadata, submission_id)
    return client, job_id, run_name


def format_jobs(jobs) -> str:
    rows = [f"{'SUBMISSION ID':<30} {'STATUS':<10} {'STARTED':<19} {'SEARCH':<20} ENTRYPOINT"]
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        ep = j.entrypoint.split(" | ", 1)[-1] if j.entrypoint else ""
        ep = ep if len(ep) <= 60 else ep[:57] + "..."
        rows.append(f"{j.submission_id or j.job_id or '-':<30} {_status(j):<10} {started:<19} "
                    f"{(j.metadata or {}).get('s3.search', '-'):<20} {ep}")
    return "\n".join(rows)
