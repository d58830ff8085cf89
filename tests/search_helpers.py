"""Helpers for tests that run real searches in subprocesses (real Ray, real MLflow)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def ray_tmpdir(tmp: Path) -> str:
    """A short per-test Ray temp dir (Unix socket paths are limited to 107 bytes); it also marks
    this test's Ray processes, which are found and stopped by PID."""
    link = tmp / "ray"
    if link.is_symlink() and not link.exists():  # its dir was removed by stop_test_ray: a second search
        Path(os.readlink(link)).mkdir()
    elif not link.exists():
        short = Path(tempfile.mkdtemp(prefix="s3t-", dir="/tmp"))
        link.symlink_to(short)
    return str(link.resolve())


def search_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(RAY_TMPDIR=ray_tmpdir(tmp), RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    return env


def stop_test_ray(tmp: Path) -> int:
    """Stop the Ray processes of this test (by PID) and remove its temp dir."""
    d = ray_tmpdir(tmp)
    n = kill_processes_with_env(f"RAY_TMPDIR={d}")
    shutil.rmtree(d, ignore_errors=True)
    return n


def write_space(tmp: Path, **overrides) -> Path:
    data = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    data.update(overrides)
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def search_cmd(space: Path, runs: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "s3_ray.cli", "search", "--space", str(space), "--runs", str(runs), *extra]


def search_to_end(space: Path, tmp: Path, **env) -> subprocess.CompletedProcess:
    """`s3 search` into ``tmp/runs`` on this test's local Ray (stopped afterwards); it must succeed."""
    try:
        r = run(search_cmd(space, tmp / "runs"), {**search_env(tmp), **env}, tmp)
    finally:
        stop_test_ray(tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def kill_processes_with_env(marker: str) -> int:
    """SIGKILL every process whose environment contains ``marker`` (our own Ray processes, by PID)."""
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in env:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def trial_runs(db: Path, name: str):
    """The search's child runs (empty while the store does not exist or is busy)."""
    return mlflow_runs(db, name, "trial")


def mlflow_runs(db: Path, name: str, kind: str):
    """The runs of search ``name`` whose tag ``s3.kind`` is ``kind`` (``trial``: child runs, ``search``: parent
    runs); empty while the store does not exist or is busy."""
    from mlflow.tracking import MlflowClient

    if not db.exists():
        return []
    try:
        client = MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string=f"tags.`s3.kind` = '{kind}'", max_results=1000)
    except Exception:  # e.g. the writer holds the sqlite lock while we poll
        return []


def tune_trials(tune_dir: Path) -> list[dict]:
    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(str(tune_dir))
    return [{"trial_id": t.trial_id, "config": t.config, "result": t.last_result, "status": t.status,
             "num_failures": t.run_metadata.num_failures} for t in ea.trials]


def tune_results(tune_dir: Path) -> dict[str, list[dict]]:
    """The results in each trial's ``result.json``, per trial key, in order. A trial retried in the same
    Ray session appends to it; one that Tune runs again after ``Tuner.restore`` (a new session) starts a
    new file, which replaces the old one in the run directory."""
    out: dict[str, list[dict]] = {}
    for f in sorted(tune_dir.glob("*/result.json")):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["config"]["trial_key"], []).append(r)
    return out


def wait_for(predicate, timeout: float, interval: float = 1.0):
    """Poll ``predicate`` until it returns a true value (returned), at most ``timeout`` s; else False."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return False


def run(cmd, env, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_in_pty(cmd, env, cwd, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with stdin/stdout/stderr on a 160x40 pseudo-terminal; (exit status, what it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    chunks, end = [], time.time() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break  # Ray's processes may still hold the terminal; the driver is done
            if time.time() > end:
                proc.kill()
                break
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
    return rc, b"".join(chunks).decode("utf-8", "replace")


@dataclass
class SmallSearch:
    """A finished small real search: its run directory and what its terminal showed."""

    run_dir: Path
    returncode: int
    shown: str
    budget: int
    final_evaluations: int


def small_search_in_pty(tmp: Path, name: str = "browse") -> SmallSearch:
    """`s3 search` on a pseudo-terminal (9 trials at NFE 3 and 4, 200 samples; this test's local Ray,
    stopped afterwards): shared by the progress, report-page and browser tests."""
    budget, nfe, baselines = 9, [3, 4], ["dpm_solver_pp_2m", "unipc_bh2"]
    space = write_space(tmp, name=name, nfe=nfe, budget=budget, final_top_k=1, baselines=baselines,
                        discretizations=["logsnr_uniform"],
                        metric={"kind": "fid", "reference": "data", "samples": [200], "final_samples": 200,
                                "final_seeds": 1})
    env = {**search_env(tmp), "TERM": "xterm"}
    try:
        rc, shown = run_in_pty(search_cmd(space, tmp / "runs"), env, tmp, timeout=600)
    finally:
        stop_test_ray(tmp)
    (tmp / "terminal.txt").write_text(shown)
    # final re-evaluation: the top-1 searched and every baseline per NFE, and the converged solver
    return SmallSearch(tmp / "runs" / name, rc, shown, budget, len(nfe) * (1 + len(baselines)) + 1)
