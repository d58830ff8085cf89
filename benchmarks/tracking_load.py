"""Several searches logging at once to ONE `s3 mlflow-server`: sqlite store against PostgreSQL.

The script starts `s3 mlflow-server` (a subprocess on 127.0.0.1, a free port, stopped by PID) once
with its default sqlite store and once with a PostgreSQL backend (a throwaway cluster of Debian's
package, `make postgres`: its own data directory under /tmp, 127.0.0.1 only, scram-sha-256 password,
stopped by its postmaster's PID; MLflow gets the password as libpq's PGPASSWORD, as in
docker/compose.yaml and cluster/kuberay/mlflow.yaml). At each load level it runs N "searches" at once,
each a separate OS process (forked from one process that imported the tracking code once) that logs
through the driver's own code path: ``Tracker`` +
``Tracker.start_parent`` + ``write_tracking`` (as ``run_search`` does), an ``MlflowTrialCallback`` fed
by W worker threads that complete trials as fast as possible (``--trial-s`` paces them), each
completion handed to ``on_trial_complete`` one at a time as Tune's loop does, then
``on_experiment_end`` (the callback's flush, with its outage handling) and the driver's final sync
(``Tracker.sync_trials``, retried once more, as the driver's ``_sync`` is after its final evaluation). A
trial carries what a real one does: its schedule (a baseline at NFE 3-6: ~50 params,
``schedule.json``), metrics and tags.

Measured per level: child runs logged per second (all searches together, from the start signal to
the last search's final sync), p50/p99 of one ``Tracker.log_trial`` (the requests of one child run)
and of completion -> logged, errors (``log_trial`` exceptions, the callback's warnings, HTTP 5xx
answers and urllib3 retries), the server's CPU per child run; afterwards, read back from the server
(``MlflowClient.search_runs`` over each search's experiment): lost runs (an expected trial key
missing), duplicated runs (a trial key logged twice), runs left unfinished, and replaced (deleted)
partial runs. Writes benchmarks/results/tracking_load.{json,md}.

    python benchmarks/tracking_load.py [--workers 16] [--trials 16] [--sqlite-levels 1,2,4,8,16,32]
                                       [--postgres-levels 1,2,4,8] [--trial-s 0] [--deadline 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from s3_ray.tracking.server import _group_alive  # noqa: E402
from tests.pg_cluster import Postgres, free_port  # noqa: E402  (the tests' throwaway PostgreSQL)

RESULTS = Path(os.environ.get("S3_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
PROGRESS = Path(tempfile.gettempdir()) / "tracking_load.progress.json"  # the levels so far, during a run
BREAK_COLLAPSE = 0.5  # a level "collapses" when its logged/s falls below this share of the best lower level


def _ray_env() -> None:
    """mlflow_tracking imports ray.tune: loopback, no usage stats, a short temp dir (nothing starts Ray)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not os.environ.get("RAY_TMPDIR"):
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="s3tl-ray-", dir="/tmp")


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ---- one search (a worker process) ----------------------------------------------------------------

class _HttpCounter:
    """Counts urllib3's own log records: requests, 5xx answers, retries."""

    def __init__(self):
        import logging

        self.requests = self.errors_5xx = self.retries = 0
        counter = self

        class H(logging.Handler):
            def emit(self, record):
                msg = record.msg
                if msg.startswith('%s://%s:%s "'):
                    counter.requests += 1
                    if isinstance(record.args[6], int) and record.args[6] >= 500:
                        counter.errors_5xx += 1
                elif msg.startswith(("Retry: ", "Retrying (")):
                    counter.retries += 1

        lg = logging.getLogger("urllib3.connectionpool")
        lg.setLevel(logging.DEBUG)
        lg.addHandler(H())
        lg.propagate = False


def trial_configs(n_schedules: int = 24) -> list[dict]:
    """Configs like the searcher's: a schedule (baselines at NFE 3-6), its hash, source, stage..."""
    from s3_ray.usf.baselines import build_baseline
    from s3_ray.usf.noise import VPLinear

    noise, out = VPLinear(), []
    names = ["dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh2", "unipc_bh1_3", "ddim", "dpm_solver_2s"]
    for nfe in (3, 4, 5, 6):
        for name in names:
            s = build_baseline(name, noise, nfe, discretization="logsnr_uniform" if nfe % 2 else "time_quadratic")
            out.append({"schedule": s.to_json(), "schedule_hash": s.schedule_hash(), "nfe": nfe, "samples": 1000,
                        "seed": 0})
    return out[:n_schedules]


def final_sync(tracker, records) -> int | None:
    """The driver's ``_sync`` (s3_ray/search/driver.py): ``Tracker.sync_trials`` of every trial, None if it
    raised. Not imported from the driver: that module imports torch (~450 MB and ~2 s of CPU per search
    process, which limited how many searches this machine could run at once)."""
    try:
        return tracker.sync_trials(records)
    except Exception as e:  # noqa: BLE001 (as the driver: the records stay in the run directory)
        print(f"warning: MLflow sync at {tracker.uri} failed ({str(e).splitlines()[0] if str(e) else e!r})",
              file=sys.stderr, flush=True)
        return None


def search_process(name: str, uri: str, workers: int, trials: int, trial_s: float, out: str, run_dir: str,
                   configs: str, ready, go) -> None:
    """One search: the driver's parent run and tracking record, then ``trials`` completions from
    ``workers`` threads through MlflowTrialCallback, its flush at the end and the driver's final sync.
    ``ready()`` once set up; the trials start when ``go()`` returns."""
    _ray_env()
    from s3_ray.tracking import mlflow_tracking as mt

    http = _HttpCounter()
    said: list[str] = []
    say = mt._say

    def _say(msg):  # the callback's warnings, counted (and still printed)
        said.append(msg)
        say(msg)

    mt._say = _say
    calls: list[float] = []
    errors: list[str] = []
    logged_at: dict[str, float] = {}
    log_trial = mt.Tracker.log_trial

    def timed_log_trial(self, trial_id, config, result):
        t0 = time.monotonic()
        try:
            created = log_trial(self, trial_id, config, result)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            raise
        if created:
            calls.append(time.monotonic() - t0)
            logged_at[trial_id] = time.monotonic()
        return created

    mt.Tracker.log_trial = timed_log_trial
    given = json.loads(Path(configs).read_text())
    pool, search_config = given["trials"], {**given["search"], "name": name}
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tracker = mt.Tracker(uri, name, None)  # as run_search (driver._tracker): the store must answer first
    parent = tracker.start_parent(search_config, "s3")
    mt.write_tracking(run / mt.TRACKING_FILE, uri, name, None, parent)
    cb = mt.MlflowTrialCallback(str(run / mt.TRACKING_FILE))
    sources = ["baseline", "random", "predictor", "predictor"]
    records: list[tuple[str, dict, dict]] = []
    completed_at: dict[str, float] = {}
    next_i, lock, loop = [0], threading.Lock(), threading.Lock()  # loop: Tune hands completions over one by one

    def worker(w: int):
        while True:
            with lock:
                i = next_i[0]
                if i >= trials:
                    return
                next_i[0] += 1
            if trial_s:
                time.sleep(trial_s)
            base = pool[i % len(pool)]
            key = f"{i:05d}-{base['schedule_hash'][:10]}"
            config = {**base, "trial_key": key, "source": sources[i % len(sources)], "stage": i * 4 // trials}
            failed = i % 29 == 28
            result = {"score": 1e9 if failed else 2.0 + (i % 17) / 7, "fid": 2.0 + (i % 17) / 7, "kid": 0.01,
                      "kid_std": 0.001, "seconds": 0.45, "failed": int(failed), "trial_id": f"{w:04d}_{i:05d}",
                      "node_id": "a" * 56}
            with loop:
                cb.on_trial_complete(i, [], SimpleNamespace(config=config, last_result=result))
                completed_at[key] = time.monotonic()
                records.append((key, config, result))

    t0 = None
    marks: dict[str, float] = {}

    def report(*_):
        """The stats so far; also on SIGTERM (the level's deadline passed), then exit at once."""
        now = time.monotonic()
        e2e = [v - completed_at[k] for k, v in list(logged_at.items()) if k in completed_at]
        Path(out).write_text(json.dumps({
            "name": name, "experiment_id": tracker.experiment_id, "parent_run_id": parent,
            "expected": sorted(completed_at), "logged": len(logged_at), "completed_s": marks.get("completed", now) - t0,
            "flushed_s": marks.get("flushed", now) - t0, "synced_s": marks.get("synced", now) - t0,
            "final_sync_added": marks.get("added"), "final_sync_retry_added": marks.get("retried"),
            "cut_off": "synced" not in marks, "log_call_s": list(calls), "end_to_end_s": e2e, "errors": list(errors),
            "warnings": list(said), "http": {"requests": http.requests, "5xx": http.errors_5xx, "retries": http.retries}}))
        if _:
            os._exit(3)

    signal.signal(signal.SIGTERM, report)
    ready()
    go()
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    marks["completed"] = time.monotonic()
    cb.on_experiment_end([])  # the callback's flush: waits for the logger thread
    marks["flushed"] = time.monotonic()
    marks["added"] = final_sync(tracker, records)  # the driver's sync once the trials have ended
    if marks["added"] is None:  # the driver tries again after its final evaluation
        time.sleep(5)
        marks["retried"] = final_sync(tracker, records)
    marks["synced"] = time.monotonic()
    report()


def zygote(n: int, prefix: str, uri: str, workers: int, trials: int, trial_s: float, work: str, configs: str) -> int:
    """The ``n`` searches of a level: this process imports the tracking code once, then forks one child
    process per search (each its own MLflow client, HTTP connections and logger thread, created after the
    fork; no thread runs before it). Prints ``ready`` once every child has its parent run, starts them
    together on a ``go`` line, forwards SIGTERM (the level's deadline) to them. Spawning 32 interpreters
    instead cost ~40-80 s of this 2-core machine per level."""
    _ray_env()
    import traceback

    from mlflow.tracking import MlflowClient  # noqa: F401 (imported before the fork, once)

    from s3_ray.tracking import mlflow_tracking  # noqa: F401

    assert threading.active_count() == 1, threading.enumerate()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    children: dict[int, str] = {}
    for i in range(n):
        name = f"{prefix}-s{i}"
        pid = os.fork()
        if pid == 0:  # a search
            code = 1
            try:
                os.close(ready_r)
                os.close(go_w)
                fd = os.open(Path(work) / f"{name}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                search_process(name, uri, workers, trials, trial_s, str(Path(work) / f"{name}.json"),
                               str(Path(work) / name), configs, ready=lambda: os.write(ready_w, b"r"),
                               go=lambda: os.read(go_r, 1))
                code = 0
            except BaseException:  # noqa: BLE001 (reported in its .err file)
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = name
    os.close(ready_w)
    os.close(go_r)
    got = 0
    while got < n:
        b = os.read(ready_r, n - got)
        if not b:  # a child died before it was ready
            break
        got += len(b)
    if got < n:
        for pid in children:
            _kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
        print("failed", flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: [_kill(pid, signal.SIGTERM) for pid in children])
    print("ready", flush=True)
    sys.stdin.readline()
    os.write(go_w, b"g" * n)
    status = 0
    for pid, name in children.items():
        _, st = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(st)
        if code not in (0, 3):  # 3: cut off at the deadline (it wrote what it had)
            print(f"search {name} exited with {code}", file=sys.stderr, flush=True)
            status = 1
    return status


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---- servers --------------------------------------------------------------------------------------

def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants, reaped children included."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            c = p.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.NoSuchProcess:
            pass
    return total


class Server:
    """`s3 mlflow-server` on 127.0.0.1 at a free port (its own session); stopped by PID."""

    def __init__(self, runs: Path, backend_store_uri: str | None = None, env: dict | None = None,
                 timeout: float = 180):
        from s3_ray.tracking import server

        self.port = free_port()
        self.uri = server.client_uri("127.0.0.1", self.port)
        self.log = runs / "server.log"
        runs.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "s3_ray.cli", "mlflow-server", "--port", str(self.port), "--runs", str(runs)]
        if backend_store_uri:
            cmd += ["--backend-store-uri", backend_store_uri]
        t0 = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})}, start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            if "MLflow server ready at" in self.log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"`s3 mlflow-server` did not start: {self.log.read_text(errors='replace')[-3000:]}")
        self.start_s = time.monotonic() - t0
        import psutil

        self.pids = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]

    def cpu(self) -> float:
        return _tree_cpu(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `s3 mlflow-server` stops its server's process group
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in getattr(self, "pids", []):  # whatever outlived it, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- a load level ---------------------------------------------------------------------------------

def count_runs(uri: str, experiment_id: str, expected: list[str]) -> dict:
    """Child runs of one search as the server has them: lost, duplicated, unfinished, replaced."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def runs(view):
        out, token = [], None
        while True:
            page = client.search_runs([experiment_id], filter_string="tags.`s3.kind` = 'trial'", run_view_type=view,
                                      max_results=1000, page_token=token)
            out += page
            token = page.token
            if not token:
                return out

    active = runs(ViewType.ACTIVE_ONLY)
    keys = [r.data.tags.get("s3.trial_id") for r in active]
    per_key: dict[str, int] = {}
    for k in keys:
        per_key[k] = per_key.get(k, 0) + 1
    return {"present": len(active), "unique": len(per_key), "lost": len(set(expected) - set(per_key)),
            "duplicated": sum(n - 1 for n in per_key.values()), "unexpected": len(set(per_key) - set(expected)),
            "unfinished": sum(r.info.status not in ("FINISHED", "FAILED") for r in active),
            "replaced": len(runs(ViewType.DELETED_ONLY))}


def run_level(uri: str, searches: int, workers: int, trials: int, work: Path, prefix: str, trial_s: float = 0.0,
              cpu_of=None, timeout: float = 300) -> dict:
    """``searches`` concurrent search processes against ``uri``; per-search JSON merged, runs counted.
    A search still logging ``timeout`` s after the start is cut off (SIGTERM: it reports what it has,
    counted as ``cut_off``; its missing trials count as lost)."""
    work.mkdir(parents=True, exist_ok=True)
    configs = work / "configs.json"
    if not configs.exists():  # built here once: validating a search config imports torch (~450 MB per process)
        from s3_ray.config import load_config

        search = load_config(ROOT / "search_spaces" / "smoke.yaml").model_dump(mode="json")
        configs.write_text(json.dumps({"search": search, "trials": trial_configs()}))
    (work / "ray").mkdir(exist_ok=True)  # RAY_TMPDIR of the search processes (nothing starts Ray there)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": str(work / "ray")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--zygote", str(searches), "--prefix", prefix, "--uri", uri,
           "--workers", str(workers), "--trials", str(trials), "--trial-s", str(trial_s), "--work", str(work),
           "--configs", str(configs)]
    err = open(work / "zygote.err", "w")  # noqa: SIM115 (closed below)
    z = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=work,
                         start_new_session=True)  # its own process group: the zygote and the searches it forks
    names = [f"{prefix}-s{i}" for i in range(searches)]

    def tails() -> str:
        return "\n".join(f"{f.name}: {f.read_text(errors='replace')[-1500:]}" for f in
                         [work / "zygote.err", *(work / f"{n}.err" for n in names)] if f.exists() and f.stat().st_size)

    try:
        # every search process has imported, created its parent run and its callback
        if z.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the searches did not start (exit {z.wait(timeout=60)}): {tails()}")
        cpu0 = cpu_of() if cpu_of else None
        t0 = time.monotonic()
        z.stdin.write("go\n")
        z.stdin.flush()
        try:
            z.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            z.send_signal(signal.SIGTERM)  # the deadline: each search writes what it has and exits
            z.wait(timeout=60)
        wall = time.monotonic() - t0
        cpu = (cpu_of() - cpu0) if cpu_of else None
        if z.returncode:
            raise RuntimeError(f"a search failed (exit {z.returncode}): {tails()}")
    finally:
        if z.poll() is None or _group_alive(z.pid):
            try:
                os.killpg(z.pid, signal.SIGKILL)  # the group we created: pgid == the zygote's pid
            except ProcessLookupError:
                pass
            z.wait(timeout=10)
        err.close()
    missing = [n for n in names if not (work / f"{n}.json").exists()]
    if missing:
        raise RuntimeError(f"no results from {missing}: {tails()}")
    outs = [json.loads((work / f"{n}.json").read_text()) for n in names]
    counts = [count_runs(uri, o["experiment_id"], o["expected"]) for o in outs]
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    expected = sum(len(o["expected"]) for o in outs)
    calls = [x for o in outs for x in o["log_call_s"]]
    e2e = [x for o in outs for x in o["end_to_end_s"]]
    done = max(o["synced_s"] for o in outs)
    cut = sum(o["cut_off"] for o in outs)
    logged = total["unique"]
    return {
        "searches": searches, "workers": workers, "trials_per_search": trials, "trial_s": trial_s, "expected": expected,
        **total, "cut_off": cut, "deadline_s": timeout, "wall_s": wall, "logging_s": done, "completing_s": max(o["completed_s"] for o in outs),
        "logged_per_s": logged / done if done > 0 else None,
        "offered_per_s": expected / max(1e-9, max(o["completed_s"] for o in outs)),
        "log_call_p50_ms": 1e3 * pct(calls, 50) if calls else None, "log_call_p99_ms": 1e3 * pct(calls, 99) if calls else None,
        "end_to_end_p50_s": pct(e2e, 50), "end_to_end_p99_s": pct(e2e, 99),
        "log_trial_errors": sum(len(o["errors"]) for o in outs), "callback_warnings": sum(len(o["warnings"]) for o in outs),
        "final_sync_added": sum(o["final_sync_added"] or 0 for o in outs),
        "final_sync_failed": sum(o["final_sync_added"] is None and not o["cut_off"] for o in outs),
        "http_requests": sum(o["http"]["requests"] for o in outs), "http_5xx": sum(o["http"]["5xx"] for o in outs),
        "http_retries": sum(o["http"]["retries"] for o in outs),
        "server_cpu_ms_per_run": 1e3 * cpu / logged if cpu is not None and logged else None,
        "error_samples": sorted({e for o in outs for e in o["errors"]})[:5],
        "warning_samples": sorted({w[:300] for o in outs for w in o["warnings"]})[:5],
    }


def broken(level: dict, lower: list[dict]) -> list[str]:
    """Why a level counts as broken: errors that reached our code (a ``log_trial`` exception, a failed final
    sync), lost / duplicated / unfinished runs, a search cut off at the deadline, or throughput collapse. An
    HTTP 5xx or a retry the MLflow client absorbed is reported, but breaks nothing by itself."""
    why = []
    if level["cut_off"]:
        why.append(f"{level['cut_off']} of {level['searches']} searches still logging after the {level['deadline_s']:.0f} s "
                   f"deadline")
    for k in ("lost", "duplicated", "unfinished", "unexpected"):
        if level[k]:
            why.append(f"{level[k]} {k}")
    if level["log_trial_errors"] or level["final_sync_failed"]:
        why.append(f"errors ({level['log_trial_errors']} log_trial exceptions, {level['final_sync_failed']} failed final "
                   f"syncs; {level['http_5xx']} HTTP 5xx, {level['http_retries']} retries)")
    best = max((x["logged_per_s"] or 0 for x in lower), default=0)
    if best and (level["logged_per_s"] or 0) < BREAK_COLLAPSE * best:
        why.append(f"throughput collapse ({fmt(level['logged_per_s'])}/s vs {best:.1f}/s at a lower level)")
    return why


def server_errors(log: str, most: int = 5) -> list[str]:
    """The exception line ending each traceback in the server's log (the first ``most`` distinct ones)."""
    found: list[str] = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            for nxt in lines[i + 1:]:
                if nxt and not nxt.startswith((" ", "\t", "Traceback", "During handling", "The above exception")):
                    if nxt[:300] not in found:
                        found.append(nxt[:300])
                    break
    return found[:most]


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_at_start": os.getloadavg()}


def bench(a) -> dict:
    work = Path(tempfile.mkdtemp(prefix="s3tl-", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(work / "ray")  # removed with ``work``
    (work / "ray").mkdir()
    _ray_env()
    import mlflow
    import psycopg
    import sqlalchemy

    from s3_ray.tracking.mlflow_tracking import HTTP_LIMITS

    t_start = time.monotonic()
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
           "command": " ".join(["python", "benchmarks/tracking_load.py", *sys.argv[1:]]),
           "versions": {"mlflow": mlflow.__version__, "sqlalchemy": sqlalchemy.__version__, "psycopg": psycopg.__version__},
           "settings": {"workers": a.workers, "trials_per_search": a.trials, "trial_s": a.trial_s,
                        "http_limits": {k: os.environ.get(k, v) for k, v in HTTP_LIMITS.items()},
                        "break_collapse": BREAK_COLLAPSE, "deadline_s": a.deadline},
           "backends": {}}
    plan = [(b, None) for b in a.backends.split(",")]
    try:
        while plan:
            backend, only = plan.pop(0)
            kind = "postgres" if backend == "postgres" else "sqlite"
            levels = only or [int(x) for x in (a.sqlite_levels if kind == "sqlite" else a.postgres_levels).split(",") if x]
            server_env = {"MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(a.pool_check)} if backend == "sqlite-pool" else {}
            pg = srv = None
            t_backend = time.monotonic()
            try:
                if kind == "postgres":
                    pg = Postgres()
                    with pg.connect() as c:
                        c.execute('CREATE DATABASE "mlflow"')
                    out["versions"]["postgres"] = pg.version()
                    srv = Server(work / "pg-server", pg.uri_without_password("mlflow"), env={"PGPASSWORD": pg.password})

                    def cpu_of(srv=srv, pg=pg):
                        return srv.cpu() + _tree_cpu(pg.pid)
                else:
                    srv = Server(work / f"{backend}-server", env=server_env)
                    cpu_of = srv.cpu
                res = {"server_start_s": srv.start_s, "server_env": server_env, "levels": []}
                out["backends"][backend] = res
                print(f"{backend}: server up in {srv.start_s:.0f} s at {srv.uri}", flush=True)
                for n in levels:
                    lv = run_level(srv.uri, n, a.workers, a.trials, work / backend / f"n{n}", f"{backend}-n{n}",
                                   a.trial_s, cpu_of, timeout=a.deadline)
                    lv["broken"] = broken(lv, res["levels"])
                    res["levels"].append(lv)
                    print(f"  {n:2d} searches x {a.workers}: {fmt(lv['logged_per_s'])} runs/s, log_trial p50 "
                          f"{fmt(lv['log_call_p50_ms'], '.0f')} ms p99 {fmt(lv['log_call_p99_ms'], '.0f')} ms, lost "
                          f"{lv['lost']}, dup {lv['duplicated']}, unfinished {lv['unfinished']}, errors "
                          f"{lv['log_trial_errors']}, 5xx {lv['http_5xx']}, retries {lv['http_retries']}, wall "
                          f"{lv['wall_s']:.0f} s{'  BROKEN: ' + '; '.join(lv['broken']) if lv['broken'] else ''}",
                          flush=True)
                    PROGRESS.write_text(json.dumps(out, indent=1))  # kept if a later level fails
                    if lv["broken"] and backend == "sqlite" and not any(x["broken"] for x in res["levels"][:-1]):
                        if a.pool_check:  # the same load again, the server's connection pool above its threads
                            plan.insert(0, ("sqlite-pool", [n]))
                        if a.stop_at_break:
                            break
                log = srv.log.read_text(errors="replace")
                res["server_log"] = {"database is locked": log.count("database is locked"),
                                     "OperationalError": log.count("OperationalError"), "Traceback": log.count("Traceback")}
                res["server_log_errors"] = server_errors(log)
            finally:
                if srv:
                    srv.stop()
                if pg:
                    pg.stop()
                if backend in out["backends"]:
                    out["backends"][backend]["phase_s"] = time.monotonic() - t_backend
    finally:
        if a.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    out["total_s"] = time.monotonic() - t_start
    out["summary"] = summarize(out)
    return out


def summarize(out: dict) -> dict:
    b = out["backends"]
    s = {}
    sq, pg = b.get("sqlite", {}).get("levels", []), b.get("postgres", {}).get("levels", [])
    first_break = next((lv for lv in sq if lv["broken"]), None)
    s["sqlite_breaking_point"] = ({"searches": first_break["searches"], "why": first_break["broken"]} if first_break
                                  else None)
    s["sqlite_highest_clean_level"] = max((lv["searches"] for lv in sq if not lv["broken"]), default=None)
    four = next((lv for lv in pg if lv["searches"] == 4), None)
    if four:
        s["target_postgres_4x16"] = {"lost": four["lost"], "duplicated": four["duplicated"],
                                     "met": four["lost"] == 0 and four["duplicated"] == 0 and four["unfinished"] == 0
                                     and four["workers"] >= 16}
    ratios = {}
    for lv in pg:
        other = next((x for x in sq if x["searches"] == lv["searches"]), None)
        if other and other["logged_per_s"]:
            ratios[str(lv["searches"])] = {
                "throughput_postgres_over_sqlite": lv["logged_per_s"] / other["logged_per_s"],
                "p99_log_call_postgres_over_sqlite": (lv["log_call_p99_ms"] / other["log_call_p99_ms"]
                                                      if other["log_call_p99_ms"] and lv["log_call_p99_ms"] else None)}
    s["ratios"] = ratios
    pool = b.get("sqlite-pool", {}).get("levels", [])
    if pool:
        s["sqlite_pool_check"] = {"searches": pool[0]["searches"], "server_env": b["sqlite-pool"]["server_env"],
                                  "broken": pool[0]["broken"], "logged_per_s": pool[0]["logged_per_s"],
                                  "log_call_p99_ms": pool[0]["log_call_p99_ms"]}
    return s


STORE_LABEL = {"sqlite": "sqlite", "postgres": "PostgreSQL"}


def markdown(out: dict) -> str:
    m, st = out["machine"], out["settings"]
    pace = "as fast as possible" if not st["trial_s"] else f"one every {st['trial_s']} s per worker"
    lines = [
        "# Tracking load: concurrent searches against one `s3 mlflow-server`, sqlite vs PostgreSQL", "",
        f"{out['date']}; {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, load average at start "
        f"{m['load_avg_at_start'][0]:.2f} (the machine is shared: numbers are noisy); MLflow {out['versions']['mlflow']}, "
        f"SQLAlchemy {out['versions']['sqlalchemy']}, psycopg {out['versions']['psycopg']}, "
        f"{out['versions'].get('postgres', 'PostgreSQL not run')}. Whole run {out['total_s']:.0f} s "
        f"(`{out['command']}`).", "",
        f"Each search is its own process logging through the driver's code path (`Tracker.start_parent`, "
        f"`MlflowTrialCallback` with its logger thread and outage handling, then the driver's final sync: `Tracker.sync_trials`, as in `driver._sync`), "
        f"{st['workers']} worker threads completing {st['trials_per_search']} trials per search "
        f"{pace} "
        f"(~50 params, 9 metrics, 7 tags and `schedule.json` per child run, as the real sync logs). Lost / duplicated / "
        f"unfinished are counted afterwards from the server (`search_runs` over each search's experiment). "
        f"`log_trial` = one child run's requests; end-to-end = completion to logged (the backlog of a search's single "
        f"logger thread included). Client HTTP limits: {st['http_limits']}.", "",
        "| store | searches x workers | child runs | logged/s | log_trial p50 / p99 ms | end-to-end p50 / p99 s | "
        "server CPU ms/run | log_trial errors / 5xx / retries | lost | dup | unfinished | broken |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for backend, res in out["backends"].items():
        label = STORE_LABEL.get(backend) or "sqlite, pool 5 + " + res["server_env"]["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"]
        for lv in res["levels"]:
            lines.append(
                f"| {label} | {lv['searches']} x {lv['workers']} | {lv['expected']} | {fmt(lv['logged_per_s'])} | "
                f"{fmt(lv['log_call_p50_ms'], '.0f')} / {fmt(lv['log_call_p99_ms'], '.0f')} | "
                f"{fmt(lv['end_to_end_p50_s'])} / {fmt(lv['end_to_end_p99_s'])} | "
                f"{fmt(lv['server_cpu_ms_per_run'], '.0f')} | {lv['log_trial_errors']} / {lv['http_5xx']} / "
                f"{lv['http_retries']} | {lv['lost']} | {lv['duplicated']} | {lv['unfinished']} | "
                f"{'; '.join(lv['broken']) or 'no'} |")
    s = out["summary"]
    lines += ["", "Ratios, PostgreSQL / sqlite at the same load: " + (", ".join(
        f"{n} searches: throughput {fmt(r['throughput_postgres_over_sqlite'], '.2f')}x, log_trial p99 "
        f"{fmt(r['p99_log_call_postgres_over_sqlite'], '.2f')}x" for n, r in s["ratios"].items()) or "-") + "."]
    t = s.get("target_postgres_4x16")
    if t:
        lines.append(f"Target, 4 searches x 16 workers against PostgreSQL: {t['lost']} lost, {t['duplicated']} duplicated: "
                     f"{'met' if t['met'] else 'MISSED'}.")
    bp = s.get("sqlite_breaking_point")
    lines.append("sqlite's breaking point: " + (f"{bp['searches']} concurrent searches ({'; '.join(bp['why'])}); highest "
                                                f"clean level {s['sqlite_highest_clean_level']}" if bp else
                                                f"not reached up to {s['sqlite_highest_clean_level']} searches") + ".")
    pc = s.get("sqlite_pool_check")
    if pc:
        n = pc["searches"]
        lines += ["", f"Why sqlite breaks at {n}: the same {n} searches against a fresh sqlite server whose SQLAlchemy pool "
                  f"may grow to 5 + {pc['server_env']['MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW']} connections (more than the "
                  f"server's 40 request threads) logged at {fmt(pc['logged_per_s'])}/s, p99 "
                  f"{fmt(pc['log_call_p99_ms'], '.0f')} ms, " + ("broken: " + "; ".join(pc["broken"]) if pc["broken"] else
                                                                 "0 lost, 0 duplicated, no errors") +
                  ". MLflow's default pool is 5 + 10 connections and its handlers open a second, nested session while "
                  "holding the first (`log_batch` -> `_log_params`, `create_run` -> `get_experiment`); once 15 requests "
                  "each hold one connection, they all wait for a second one (py-spy of a stalled server, seen while "
                  "writing this benchmark: all 40 AnyIO worker threads in `QueuePool._do_get`). sqlite's slower, "
                  "lock-waiting requests hold their connections longer, so it gets there first. The client times out "
                  "(15 s) and retries (the retries counted above): a run created by a request the client had given up "
                  "on is how a trial ends up twice, or left RUNNING; '-' in the table: no `log_trial` call completed "
                  "before the deadline. PostgreSQL has the same pool: it did not stall at the loads measured here."]
    for backend, res in out["backends"].items():
        if "server_log" in res:
            errs = res.get("server_log_errors") or []
            label = STORE_LABEL.get(backend) or "sqlite (pool check)"
            lines.append(f"{label} server log: " + ", ".join(f"{k!r} x{v}" for k, v in res["server_log"].items()) +
                         (f" ({'; '.join(f'`{e}`' for e in errs)})" if errs else "") +
                         f"; server ready in {res['server_start_s']:.0f} s.")
    lines += ["", "Criteria for 'broken': a lost, duplicated, unfinished or unexpected run, a search still logging at "
              f"the {out['settings']['deadline_s']:.0f} s deadline, a `log_trial` exception or a failed final sync (errors "
              f"that reach our code), or logged/s below {BREAK_COLLAPSE:.0%} of the best lower level. HTTP 5xx answers "
              "and retries that the MLflow client absorbed are counted, not breaking by themselves."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--trials", type=int, default=16, help="trials per search")
    p.add_argument("--trial-s", type=float, default=0.0, help="seconds per trial per worker (0: as fast as possible)")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--sqlite-levels", default="1,2,4,8,16,32")
    p.add_argument("--postgres-levels", default="1,4,8,32")
    p.add_argument("--deadline", type=float, default=60.0,
                   help="seconds a level may log; searches still logging then are cut off (their missing runs: lost)")
    p.add_argument("--pool-check", type=int, default=50, metavar="N",
                   help="once sqlite breaks, run that level again on a fresh sqlite server with "
                        "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=N (0: do not)")
    p.add_argument("--stop-at-break", action="store_true", help="no higher sqlite level once one broke")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server logs, per-search JSON)")
    p.add_argument("--no-write", action="store_true", help="print the table, write no results")
    # the search processes of one level (forked by a zygote process)
    p.add_argument("--zygote", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--configs", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.zygote:
        return zygote(a.zygote, a.prefix, a.uri, a.workers, a.trials, a.trial_s, a.work, a.configs)
    out = bench(a)
    md = markdown(out)
    print(md)
    if not a.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "tracking_load.json").write_text(json.dumps(out, indent=1))
        (RESULTS / "tracking_load.md").write_text(md)
    t = out["summary"].get("target_postgres_4x16")
    return 0 if t is None or t["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
