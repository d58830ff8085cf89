"""A real 2-node Ray cluster (head + 1 worker, 1 CPU each, network namespaces, token auth) made by
``cluster/local.sh up 1``; a real MLflow server in the head's namespace. A smoke search submitted
with ``s3 submit`` (Ray's Jobs API) runs trials on both nodes and logs to the server; then a worker
node killed with SIGKILL while it runs a trial: that trial is retried on the head, and the search
completes its budget there.

Every process is stopped by PID in the fixtures' teardown (``local.sh down`` kills the PIDs of the
cluster's namespaces and deletes them), also when a test fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .search_helpers import ROOT, trial_runs, tune_trials, wait_for, write_space


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (Linux network namespaces)"
    if shutil.which("ip") is None or shutil.which("curl") is None:
        return "needs iproute2 ('ip netns') and curl"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "'ip netns' is unavailable here"
    return None


needs_netns = pytest.mark.skipif(_netns_unavailable() is not None, reason=str(_netns_unavailable()))

SCRIPT = ROOT / "cluster" / "local.sh"
MLFLOW_PORT = 5000  # inside the head's namespace: its own port space
# The GCS declares a node dead after `threshold` failed health checks, `period` apart; Ray's
# defaults (3000 ms, 10000 ms timeout, 5 failures) take ~15 s for a killed node, up to ~65 s for an
# unreachable one. The test cluster uses ~3 s.
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
               "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}


@dataclass
class LocalCluster:
    name: str
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def env(self) -> dict:
        """Environment of local.sh and of the clients run in the head namespace."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(S3C_NAME=self.name, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **FAST_HEALTH)
        if self.settings:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.settings["S3C_TOKEN_PATH"])
        return env

    def script(self, *args, timeout=180) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def up(self, workers: int):
        t0 = time.time()
        r = self.script("up", str(workers))
        self.timings["up_s"] = time.time() - t0
        assert r.returncode == 0, r.stdout + r.stderr
        self.up_output = r.stdout
        r = self.script("env")
        assert r.returncode == 0, r.stderr
        for line in r.stdout.splitlines():
            k, _, v = line.partition("=")
            self.settings[k] = v.strip('"')

    def down(self):
        t0 = time.time()
        r = self.script("down", timeout=120)
        self.timings["down_s"] = time.time() - t0
        for ns in self.namespaces():  # if the script failed: kill by the namespaces' PID lists ourselves
            kill_namespace(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return r

    def namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if re.fullmatch(rf"{re.escape(self.name)}-(head|w\d+)", n)]

    @property
    def head_ns(self) -> str:
        return self.settings["S3C_HEAD_NS"]

    @property
    def dashboard(self) -> str:
        return self.settings["S3C_DASHBOARD"]

    def in_head(self, *cmd, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.head_ns, *cmd], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)

    def s3(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return self.in_head(sys.executable, "-m", "s3_ray.cli", *args, timeout=timeout)

    def nodes(self) -> dict[str, dict]:
        """node id -> {ip, state} from the dashboard's state API (with the cluster's token)."""
        token = Path(self.settings["S3C_TOKEN_PATH"]).read_text().strip()
        r = self.in_head("curl", "-sf", "--max-time", "10", "-H", f"Authorization: Bearer {token}",
                         f"{self.dashboard}/api/v0/nodes?limit=100&detail=false")
        assert r.returncode == 0, r.stderr
        return {n["node_id"]: {"ip": n["node_ip"], "state": n["state"]}
                for n in json.loads(r.stdout)["data"]["result"]["result"]}


def running_trial(ns: str) -> int | None:
    """The PID of a process of the namespace that runs a Tune trial: a trial actor's process is titled
    ``ray::ImplicitFunc.train`` while Tune's ``train`` call, i.e. the trial function, runs in it (measured:
    ``ray::IDLE`` or ``ray::ImplicitFunc`` otherwise)."""
    for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::ImplicitFunc.train"):
            return int(pid)
    return None


def kill_namespace(ns: str) -> int:
    """SIGKILL every process of a network namespace (its PID list), until it is empty."""
    killed = 0
    for _ in range(50):
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        if not out:
            break
        for pid in out:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return killed


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(name=f"t{uuid.uuid4().hex[:6]}")
    try:
        c.up(workers=1)
        yield c
    finally:
        r = c.down()
        print(f"cluster timings: {c.timings}", file=sys.stderr)
        assert not c.namespaces(), f"namespaces left: {c.namespaces()} ({r.stderr})"


@pytest.fixture(scope="module")
def mlflow_server(cluster, tmp_path_factory):
    """A real MLflow server in the head's namespace (the driver runs there), sqlite store on the shared
    filesystem (the test reads it directly: the root namespace has no route to the cluster)."""
    d = tmp_path_factory.mktemp("mlflow")
    db = d / "mlflow.db"
    host = cluster.settings["S3C_HEAD_IP"]
    env = {**cluster.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", cluster.head_ns, str(Path(sys.executable).with_name("mlflow")), "server",
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(d / "artifacts"),
         "--host", host, "--port", str(MLFLOW_PORT), "--workers", "1"],
        env=env, cwd=d, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://{host}:{MLFLOW_PORT}"
    try:
        t0 = time.time()
        healthy = wait_for(lambda: proc.poll() is None and cluster.in_head(
            "curl", "-sf", "--max-time", "2", f"{uri}/health").returncode == 0, timeout=90, interval=0.5)
        assert healthy, (d / "server.log").read_text()[-3000:]
        cluster.timings["mlflow_healthy_s"] = time.time() - t0
        yield uri, db
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its gunicorn/uvicorn workers (own session)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log.close()


def submit(cluster, space: Path, runs: Path, mlflow_uri: str) -> str:
    r = cluster.s3("submit", "--address", cluster.dashboard, "--space", str(space), "--runs", str(runs),
                   "--mlflow-uri", mlflow_uri)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"as job (raysubmit_\w+)", r.stdout)
    assert m, r.stdout
    job = m.group(1)
    # how to follow it, also with plain `ray job logs` (token from the same file)
    assert f"ray job logs --address {cluster.dashboard} --follow {job}" in r.stdout
    assert f"RAY_AUTH_TOKEN_PATH={cluster.settings['S3C_TOKEN_PATH']}" in r.stdout
    return job


def follow(cluster, job: str, timeout=400) -> subprocess.CompletedProcess:
    r = cluster.s3("jobs", "logs", job, "--follow", "--address", cluster.dashboard, timeout=timeout)
    assert r.returncode == 0 and f"job {job}: SUCCEEDED" in r.stderr, (r.stdout[-4000:] + r.stderr[-2000:])
    return r


def parent_and_children(db: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(name)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`s3.kind` = 'search'")
    return parents, trial_runs(db, name)


@pytest.mark.slow
@needs_netns
def test_local_sh_cluster_is_up(cluster):
    assert "dashboard: http://10.77.0.1:8265" in cluster.up_output and "s3 submit --address" in cluster.up_output
    nodes = cluster.nodes()
    assert sorted((n["ip"], n["state"]) for n in nodes.values()) == [("10.77.0.1", "ALIVE"), ("10.77.0.2", "ALIVE")]
    # token auth is on: the dashboard refuses a request without the token
    r = cluster.in_head("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{cluster.dashboard}/api/jobs/")
    assert r.stdout == "401"
    r = cluster.in_head(sys.executable, "-m", "s3_ray.cli", "jobs", "list", "--address", cluster.dashboard)
    assert r.returncode == 0  # with RAY_AUTH_TOKEN_PATH from the environment
    bad = {**cluster.env, "RAY_AUTH_TOKEN_PATH": "", "RAY_AUTH_MODE": ""}
    r = subprocess.run(["ip", "netns", "exec", cluster.head_ns, sys.executable, "-m", "s3_ray.cli", "jobs", "list",
                        "--address", cluster.dashboard], env=bad, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "token" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@needs_netns
def test_submitted_search_runs_on_both_nodes_and_logs_to_mlflow_server(cluster, mlflow_server, tmp_path):
    uri, db = mlflow_server
    name = f"c2n-{uuid.uuid4().hex[:6]}"
    space = write_space(tmp_path, name=name, budget=8, concurrency=2)
    runs = tmp_path / "runs"
    t0 = time.time()
    job = submit(cluster, space, runs, uri)
    r = follow(cluster, job)
    cluster.timings["search_job_s"] = time.time() - t0
    assert "| NFE | S3 FID | best baseline" in r.stdout and f"browse: {uri}" in r.stdout
    # the job is a standard Ray job: `s3 jobs list` and plain `ray job status` see it
    r = cluster.s3("jobs", "list", "--address", cluster.dashboard)
    assert re.search(rf"{job}\s+SUCCEEDED\s+.*{name}", r.stdout), r.stdout
    r = cluster.in_head(str(Path(sys.executable).with_name("ray")), "job", "status", "--address", cluster.dashboard, job)
    assert r.returncode == 0 and f"Job '{job}' succeeded" in r.stdout + r.stderr, r.stdout + r.stderr

    trials = tune_trials(runs / name / "tune")
    assert len(trials) == 8 and all(t["status"] == "TERMINATED" for t in trials)
    nodes = cluster.nodes()
    used = {t["result"]["node_id"] for t in trials}
    assert used == set(nodes), f"trials ran on {used}, nodes {nodes}"  # both nodes
    # ... also after the stage boundaries (Tune keeps both idle actors: s3_ray/search/actor_cache.py)
    last_stage = max(t["config"]["stage"] for t in trials)
    assert {t["result"]["node_id"] for t in trials if t["config"]["stage"] == last_stage} == used

    parents, children = parent_and_children(db, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 8
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["s3.node_id"] for c in children} == used
    assert sorted(c.data.tags["s3.trial_id"] for c in children) == sorted(t["config"]["trial_key"] for t in trials)
    assert (runs / name / "summary.json").is_file()


@pytest.mark.slow
@needs_netns
def test_search_survives_a_killed_worker_node(cluster, mlflow_server, tmp_path):
    """Runs last: it kills the module's worker node."""
    uri, db = mlflow_server
    name = f"kill-{uuid.uuid4().hex[:6]}"
    budget = 10
    # 3000 samples: ~2 s per trial, so that the worker is killed in the middle of one
    space = write_space(tmp_path, name=name, budget=budget, concurrency=2,
                        metric={"kind": "fid", "reference": "data", "samples": [3000], "final_samples": 300,
                                "final_seeds": 1})
    runs = tmp_path / "runs"
    nodes = cluster.nodes()
    worker_id = next(k for k, n in nodes.items() if n["ip"] == "10.77.0.2")
    head_id = next(k for k, n in nodes.items() if n["ip"] == "10.77.0.1")
    t0 = time.time()
    job = submit(cluster, space, runs, uri)
    worker_ns = cluster.settings["S3C_WORKER_NS"].split()[0]

    def logged() -> dict[str, str]:  # trial key -> node, of the trials in MLflow
        return {c.data.tags["s3.trial_id"]: c.data.tags["s3.node_id"] for c in trial_runs(db, name)}

    assert wait_for(lambda: worker_id in logged().values(), timeout=300, interval=0.5), "no trial ended on the worker"
    before = logged()
    # kill the worker node while it runs a trial: that trial fails and is retried on the head
    trial_pid = wait_for(lambda: running_trial(worker_ns), timeout=120, interval=0.1)
    assert trial_pid, "no trial ran on the worker node within 120 s"
    t_kill = time.time()
    os.kill(trial_pid, signal.SIGKILL)
    assert kill_namespace(worker_ns) > 0  # the worker's raylet, agents and trial actors, all at once
    assert wait_for(lambda: cluster.nodes()[worker_id]["state"] == "DEAD", timeout=60, interval=0.5)
    cluster.timings["worker_marked_dead_s"] = time.time() - t_kill
    follow(cluster, job)
    cluster.timings["kill_job_s"] = time.time() - t0

    trials = tune_trials(runs / name / "tune")
    assert len(trials) == budget and all(t["status"] == "TERMINATED" for t in trials)
    by_key = {t["config"]["trial_key"]: t for t in trials}
    # the trial killed on the worker failed, was retried on the head and finished there
    retried = [t for t in trials if t["num_failures"] >= 1]
    assert retried, f"no trial failed when the worker was killed: {[t['num_failures'] for t in trials]}"
    assert all(t["result"]["node_id"] == head_id and "score" in t["result"] for t in retried), retried
    # nothing ran on the worker after the kill (Tune's result timestamps: whole seconds, rounded down)
    on_worker = [t for t in trials if t["result"]["node_id"] == worker_id]
    assert all(t["result"]["timestamp"] <= t_kill for t in on_worker), on_worker
    # no finished trial lost or re-run: those logged before the kill kept their node and never failed
    assert all(by_key[k]["result"]["node_id"] == node and by_key[k]["num_failures"] == 0 for k, node in before.items())
    parents, children = parent_and_children(db, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["s3.trial_id"] for c in children) == sorted(by_key)
    assert (runs / name / "summary.json").is_file()


# ---- without a cluster ---------------------------------------------------------------------------

def test_token_lookup_follows_rays_order(tmp_path):
    from s3_ray.cluster import ray_env_prefix, resolve_token

    f, g = tmp_path / "a", tmp_path / "b"
    f.write_text("tok-file\n")
    g.write_text("tok-explicit")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("tok-home")
    assert resolve_token(None, {"HOME": str(home)}) is None  # ~/.ray/auth_token only with RAY_AUTH_MODE=token
    assert resolve_token(None, {"HOME": str(home), "RAY_AUTH_MODE": "token"}).value == "tok-home"
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(f)}
    t = resolve_token(None, env)
    assert (t.value, t.source) == ("tok-file", "RAY_AUTH_TOKEN_PATH")
    assert ray_env_prefix(t) == f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={f} "
    assert resolve_token(None, {**env, "RAY_AUTH_TOKEN": "tok-env"}).value == "tok-env"
    assert resolve_token(str(g), {**env, "RAY_AUTH_TOKEN": "tok-env"}).value == "tok-explicit"
    assert resolve_token(None, {**env, "RAY_AUTH_MODE": "disabled"}) is None


def test_job_entrypoint_pipes_the_validated_space(tmp_path):
    """The job's command reads the space from its own text (no file needed on the cluster): run it
    here with --resume on an empty run root, which fails only after the space was parsed."""
    import yaml

    from s3_ray.cluster import search_entrypoint
    from s3_ray.config import load_config

    space = write_space(tmp_path, name="inline", seed_schedules=["/nowhere/it's $HOME.json"])
    text = json.dumps(yaml.safe_load(space.read_text()))
    ep = search_entrypoint(text, budget=3, name="inline2", runs=str(tmp_path / "runs"), resume=True,
                           python=sys.executable)
    r = subprocess.run(ep, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and f"nothing to resume in {tmp_path / 'runs' / 'inline2' / 'tune'}" in r.stderr, r.stderr
    piped = subprocess.run(ep.split(" | ")[0], shell=True, capture_output=True, text=True).stdout
    assert load_config(space) == parse_space(piped)


def parse_space(text: str):
    from s3_ray.config import parse_config

    return parse_config(json.loads(text))


def test_submit_and_jobs_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbudget: -3\n")
    cmd = [sys.executable, "-m", "s3_ray.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([*cmd, "submit", "--address", "http://127.0.0.1:9", "--space", str(bad)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "budget" in r.stderr and "Traceback" not in r.stderr  # before any connection
    r = subprocess.run([*cmd, "jobs", "list", "--address", "http://127.0.0.1:9"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "cannot reach the Ray dashboard at http://127.0.0.1:9" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([*cmd, "jobs", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--address" in r.stderr
