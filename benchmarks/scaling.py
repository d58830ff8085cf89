"""Scaling of a search over Ray worker nodes, and the searcher's share of the driver's time.

For each worker count W (default 1 and 2), ``cluster/local.sh up W`` starts a head with 0 CPUs for
trials plus W worker nodes with 1 CPU each (network namespaces, token auth), and the search driver
(``run_search``, the code a submitted job runs) is started on the head node (``ip netns exec
<head> ...``) with ``concurrency = W``. The driver is instrumented from the outside (no package
change): wall time of ``Tuner.fit``, the driver process's CPU time, and the time spent inside
``S3Searcher.suggest`` / ``on_trial_complete`` / ``save`` (state snapshots) together with the time
of every trial completion. Needs root (network namespaces); ``--hosts same`` instead runs every node
on this machine's own network stack (Ray's ``cluster_utils.Cluster``) where ``ip netns`` is missing.
Variants: ``fix`` (the driver as shipped), ``ahead`` (``plan_ahead``: the next stage is planned while
the stage's last trials run), ``nofix`` (Tune's default actor cache), ``synclog`` (Tune's loop waits
for each trial's MLflow child run, as before the logger thread), ``tunelogs`` (Tune's default CSV and
TensorBoard loggers on, as before they were turned off). Writes
benchmarks/results/scaling<tag>.{json,md}.

    python benchmarks/scaling.py [--workers 1,2] [--budget 160] [--variants fix,ahead] [--repeats 2]
                                 [--hosts netns|same] [--tag _x]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("S3_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
SCRIPT = ROOT / "cluster" / "local.sh"
CLUSTER = "s3bench"
# Variant 'ahead': trials of a phase that run while the next stage is planned. Those trials count
# only from the stage after: stage 0 here trains on 4 of the 12 seed results (seed_count), so 'ahead' is a
# different search; the variants compare throughput, not search quality.
PLAN_AHEAD = 8


def space(budget: int, samples: int, nfe: int, concurrency: int, plan_ahead: int = 0) -> dict:
    """The smoke space's shape with a bigger budget and the default-sized predictor (digits.yaml)."""
    return {
        "name": "scaling", "model": {"kind": "digits", "noise_schedule": "vp_linear"},
        "metric": {"kind": "fid", "reference": "data", "samples": [samples], "final_samples": 300, "final_seeds": 1},
        "nfe": [nfe], "budget": budget, "stages": 3, "random_init": 6, "final_top_k": 2,
        "baselines": ["ddim", "dpm_solver_pp_2m", "unipc_bh2"], "discretizations": ["logsnr_uniform", "time_quadratic"],
        "predictor": {"hidden": [64, 64], "epochs": 300, "candidates": 400},
        "concurrency": concurrency, "seed": 0, "plan_ahead": plan_ahead,
    }


def seed_count(sp: dict) -> int:
    """Schedules of the seed phase: every baseline on every discretization, plus the random ones."""
    return len(sp["baselines"]) * len(sp["discretizations"]) + sp["random_init"]


# ---- driver (runs inside the head's namespace) ---------------------------------------------------

def driver(a) -> None:
    from collections import defaultdict

    from ray import tune

    from s3_ray.config import parse_config
    from s3_ray.search import searcher as smod
    from s3_ray.search.driver import run_search

    spent, calls, completions, suggestions = defaultdict(float), defaultdict(int), [], []

    def timed(name):
        orig = getattr(smod.S3Searcher, name)

        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = orig(self, *args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
            if name == "on_trial_complete":
                result = args[1] if len(args) > 1 else kwargs.get("result") or {}
                result = result or {}
                completions.append((time.time(), result.get("node_id"), result.get("seconds"),
                                    result.get("time_total_s"), result.get("cached")))
            elif name == "suggest" and isinstance(out, dict):
                suggestions.append(time.time())
            return out

        setattr(smod.S3Searcher, name, wrapper)

    for name in ("suggest", "on_trial_complete", "save"):
        timed(name)
    # breakdown of suggest: stage planning = held-out tau + predictor fit + mutants + ranking
    from s3_ray.search import predictor as pmod

    def timed_inner(owner, name, key):
        orig = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                inner[key] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    inner = defaultdict(float)
    timed_inner(smod.S3Searcher, "_fit_stage", "plan_stage")  # in suggest, or beside it (plan_ahead)
    timed_inner(smod, "plan_chunk", "plan_stage")
    timed_inner(pmod.Predictor, "fit", "predictor_fit")
    timed_inner(smod, "predictor_quality", "quality_after_search")  # the driver's, after Tuner.fit
    timed_inner(smod, "breed", "mutants")
    fit_info = {}
    orig_fit = tune.Tuner.fit

    def fit(self):
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
        try:
            return orig_fit(self)
        finally:
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            fit_info.update(start=t0, end=time.time(),
                            driver_cpu_s=(ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime))

    tune.Tuner.fit = fit
    if os.environ.get("S3_BENCH_SYNC_LOG") == "1":  # variant 'synclog': Tune's loop waits for each child run
        from s3_ray.tracking.mlflow_tracking import MlflowTrialCallback

        logged = MlflowTrialCallback.on_trial_complete

        def log_and_wait(self, *args, **kwargs):
            logged(self, *args, **kwargs)
            self.wait()

        MlflowTrialCallback.on_trial_complete = log_and_wait
    cfg = parse_config(json.loads(a.space_json), "benchmark space")
    t0 = time.time()
    with open(os.devnull, "w") as devnull:
        run_search(cfg, address=a.address, runs_root=a.runs, fresh=True, out=devnull)
    out = {"fit": fit_info, "total_s": time.time() - t0, "searcher_s": dict(spent), "searcher_calls": dict(calls),
           "suggest_breakdown_s": dict(inner),
           "completions": completions, "suggestions": suggestions}
    Path(a.out).write_text(json.dumps(out))


# ---- orchestration (root namespace) ----------------------------------------------------------------

def local_sh(env: dict, *args, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"local.sh {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def namespace_pids(namespaces) -> list[str]:
    return [pid for ns in namespaces
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]


def descendant_pids() -> list[str]:
    """Every process below this one (a same-host cluster's nodes, their workers, the driver)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[d.name] = (d / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                pass
    ours, frontier = set(), {str(os.getpid())}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - ours
        ours |= frontier
    return sorted(ours)


class ClusterCpu:
    """CPU seconds used by the cluster's processes (``list_pids()``) during a window, sampled every
    0.25 s in a thread: processes that exit in between (trial actors at the end of a fit; Ray reaps
    its workers without adding their times to its own) count up to their last sample. ``marks``
    holds (time, cluster CPU s so far, machine busy s so far) per sample, for sub-windows (``between``)."""

    def __init__(self, list_pids):
        import threading

        self.list_pids, self.first, self.last, self.kind = list_pids, {}, {}, {}
        self.first = self._sample()
        self.last = dict(self.first)
        self.marks = [(time.time(), 0.0, machine_busy_s())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> dict[int, int]:
        out = {}
        for pid in self.list_pids():
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(pid)] = int(f[11]) + int(f[12])  # utime + stime of the process (all its threads)
                if int(pid) not in self.kind or self.kind[int(pid)] == "other":
                    self.kind[int(pid)] = process_kind(Path(f"/proc/{pid}/cmdline").read_bytes())
            except (OSError, IndexError, ValueError):
                pass
        return out

    def _run(self):
        while not self._stop.wait(0.25):
            self.last.update(self._sample())
            self.marks.append((time.time(), self._used_s(), machine_busy_s()))

    def _used_s(self) -> float:
        return sum(v - self.first.get(pid, 0) for pid, v in self.last.items()) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.last.update(self._sample())
        return self._used_s()

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        """(cluster CPU s, whole machine busy s) from the last sample before ``t0`` to the first after ``t1``."""
        a = max((m for m in self.marks if m[0] <= t0), default=self.marks[0])
        b = min((m for m in self.marks if m[0] >= t1), default=self.marks[-1])
        return b[1] - a[1], b[2] - a[2]

    def by_kind(self) -> dict[str, float]:
        """CPU seconds per kind of process (``process_kind``), after ``stop``."""
        out: dict[str, float] = {}
        for pid, v in self.last.items():
            k = self.kind.get(pid, "other")
            out[k] = out.get(k, 0.0) + (v - self.first.get(pid, 0)) / os.sysconf("SC_CLK_TCK")
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# Ray's own binaries by name; Python processes by a substring of their command line (the first match
# wins). Ray's workers retitle themselves "ray::<task>"; before that they run default_worker.py.
BINARY_KINDS = {"gcs_server": "GCS", "raylet": "raylets"}
PROCESS_KINDS = (("_driver", "driver"), ("ray::", "trial workers"), ("default_worker.py", "trial workers"),
                 ("dashboard/dashboard.py", "dashboard (head)"), ("dashboard/agent.py", "dashboard agents"),
                 ("runtime_env/agent", "runtime-env agents"), ("log_monitor.py", "log monitors"),
                 ("monitor.py", "autoscaler monitor"))


def process_kind(cmdline: bytes) -> str:
    argv = cmdline.decode(errors="replace").split("\0")
    if Path(argv[0]).name in BINARY_KINDS:
        return BINARY_KINDS[Path(argv[0]).name]
    text = " ".join(argv)
    return next((kind for key, kind in PROCESS_KINDS if key in text), "other")


def cluster_settings(env: dict) -> dict:
    out = {}
    for line in local_sh(env, "env").stdout.splitlines():
        k, _, v = line.partition("=")
        out[k] = v.strip('"')
    return out


def run_one(workers: int, a, tmp: Path, variant: str = "fix") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(S3C_NAME=CLUSTER, S3C_HEAD_CPUS="0", S3C_WORKER_CPUS="1", OMP_NUM_THREADS="1")
    local_sh(env, "down")  # a leftover of an interrupted run
    t0 = time.time()
    try:
        local_sh(env, "up", str(workers))
        up_s = time.time() - t0
        s = cluster_settings(env)
        denv = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": s["S3C_TOKEN_PATH"],
                "RAY_TMPDIR": f"{s['S3C_STATE']}/d", "RAY_USAGE_STATS_ENABLED": "0"}
        Path(denv["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
        nss = [s["S3C_HEAD_NS"], *s["S3C_WORKER_NS"].split()]
        # the driver runs in the head's namespace too
        return run_driver(["ip", "netns", "exec", s["S3C_HEAD_NS"]], s["S3C_GCS_ADDRESS"], denv,
                          lambda: namespace_pids(nss), a, tmp, workers, variant, up_s)
    finally:
        local_sh(env, "down")


def run_one_same_host(workers: int, a, tmp: Path, variant: str = "fix") -> dict:
    """Like ``run_one`` on a cluster whose nodes share this machine's network stack (Ray's own
    ``cluster_utils.Cluster``: one raylet per node, no token auth), for machines without ``ip netns``."""
    from ray.cluster_utils import Cluster

    os.environ.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")  # the nodes' environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        return run_driver([], cluster.address, env, descendant_pids, a, tmp, workers, variant, time.time() - t0)
    finally:
        cluster.shutdown()


def run_driver(prefix: list[str], address: str, env: dict, list_pids, a, tmp: Path, workers: int, variant: str,
               up_s: float) -> dict:
    """Run the search driver (``prefix`` + this script's ``_driver``) against the cluster at
    ``address``, measuring the CPU of the cluster's processes (``list_pids``) and of everything else."""
    out = tmp / f"w{workers}-{time.time_ns()}.json"
    env = {**env, "S3_TUNE_KEEP_IDLE_ACTORS": "0" if variant == "nofix" else "1",
           "S3_BENCH_SYNC_LOG": "1" if variant == "synclog" else "0"}
    if variant == "tunelogs":
        env["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"
    plan_ahead = PLAN_AHEAD if variant == "ahead" else 0
    cmd = [*prefix, sys.executable, str(Path(__file__).resolve()), "_driver", "--address", address,
           "--runs", str(tmp / "runs"), "--out", str(out),
           "--space-json", json.dumps(space(a.budget, a.samples, a.nfe, workers, plan_ahead))]
    load0, busy0, w0 = os.getloadavg(), machine_busy_s(), time.time()
    sampler = ClusterCpu(list_pids)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    window, ours = time.time() - w0, sampler.stop()
    by_kind = sampler.by_kind()
    other = max(0.0, machine_busy_s() - busy0 - ours)
    if r.returncode != 0:
        raise RuntimeError(f"driver failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    d = json.loads(out.read_text())
    fit_cluster_s, fit_machine_s = sampler.between(d["fit"]["start"], d["fit"]["end"])
    d["fit"].update(cluster_cpu_s=fit_cluster_s, machine_busy_s=fit_machine_s)
    d.update(workers=workers, variant=variant, up_s=up_s, loadavg_before=load0, loadavg_after=os.getloadavg(),
             other_cpu_cores=other / window, our_cpu_cores=ours / window,
             cpu_s_by_process_kind={k: round(v, 2) for k, v in by_kind.items()}, window_s=window)
    return summarize(d)


def summarize(d: dict) -> dict:
    fit = d["fit"]
    wall = fit["end"] - fit["start"]
    done = sorted(c[0] for c in d["completions"])
    n = len(done)
    searcher = sum(d["searcher_s"].values())
    # steady state: completions after the first one per node (model loading, actor start-up)
    k = min(d["workers"], n - 1)
    steady = (n - 1 - k) / (done[-1] - done[k]) * 60 if n - 1 - k > 0 and done[-1] > done[k] else None
    nodes = {}
    for c in d["completions"]:
        nodes[c[1]] = nodes.get(c[1], 0) + 1
    return {
        "workers": d["workers"], "variant": d["variant"], "trials": n, "fit_wall_s": wall, "trials_per_min": n / wall * 60,
        "steady_trials_per_min": steady, "first_completion_s": done[0] - fit["start"] if done else None,
        "driver_cpu_s": fit["driver_cpu_s"], "driver_cpu_share": fit["driver_cpu_s"] / wall,
        "fit_cluster_cpu_s_per_trial": fit["cluster_cpu_s"] / n if "cluster_cpu_s" in fit else None,
        "fit_cluster_cores": fit["cluster_cpu_s"] / wall if "cluster_cpu_s" in fit else None,
        "fit_machine_cores": fit["machine_busy_s"] / wall if "machine_busy_s" in fit else None,
        "planning_s": d.get("suggest_breakdown_s", {}).get("plan_stage"),
        "searcher_s": searcher, "searcher_share": searcher / wall, "searcher_share_of_driver_cpu": searcher / fit["driver_cpu_s"],
        "searcher_by_method_s": d["searcher_s"], "searcher_calls": d["searcher_calls"],
        "suggest_breakdown_s": d.get("suggest_breakdown_s", {}),
        "idle_share": idle_share(d, wall), "worker_idle_share": worker_idle_share(d, fit, d["workers"]),
        "trials_per_node": sorted(nodes.values(), reverse=True), "cluster_up_s": d["up_s"],
        "total_with_final_eval_s": d["total_s"], "loadavg_before": d["loadavg_before"],
        "our_cpu_cores": d["our_cpu_cores"], "other_cpu_cores": d["other_cpu_cores"],
        "cpu_s_by_process_kind": d["cpu_s_by_process_kind"], "cpu_window_s": d["window_s"],
        "trial_log": [[round(c[0] - fit["start"], 3), c[1][:8] if c[1] else None, c[2], c[3], c[4]]
                      for c in sorted(d["completions"])],
        "suggest_log": [round(t - fit["start"], 3) for t in d["suggestions"]],
        "loadavg_after": d["loadavg_after"],
    }


def idle_share(d: dict, wall: float) -> float | None:
    """Share of the fit's wall time during which no trial was running on the cluster: between the
    last completion of a stage and the next suggestion (the searcher plans while workers wait)."""
    if not d["completions"] or not d["suggestions"]:
        return None
    events = sorted([(c[0], -1) for c in d["completions"]] + [(t, +1) for t in d["suggestions"]])
    running, idle, last = 0, 0.0, events[0][0]
    for t, delta in events:
        if running == 0:
            idle += t - last
        running += delta
        last = t
    return idle / wall


def turnaround(r: dict) -> float | None:
    """Median time from a trial's completion to the suggestion that refills its slot: with W slots,
    suggestion W + i can only follow completion i (stage boundaries included; the median hides them)."""
    sug, done, w = sorted(r["suggest_log"]), sorted(c[0] for c in r["trial_log"]), r["workers"]
    gaps = [sug[w + i] - t for i, t in enumerate(done) if w + i < len(sug)]
    return statistics.median(gaps) if gaps else None


def worker_idle_share(d: dict, fit: dict, workers: int) -> float | None:
    """Share of the workers' slots (workers x wall time of the fit) with no trial, a trial counting
    from its suggestion to its completion in the driver: stage boundaries, the time from a completion
    to the next suggestion, the last stage's tail (starting a trial on its actor counts as busy)."""
    if not d["suggestions"]:
        return None
    events = sorted([(c[0], -1) for c in d["completions"]] + [(t, +1) for t in d["suggestions"]])
    running, idle, last = 0, 0.0, fit["start"]
    for t, delta in events:
        idle += (workers - running) * (t - last)
        running, last = running + delta, t
    idle += (workers - running) * max(fit["end"] - last, 0.0)
    return idle / (workers * (fit["end"] - fit["start"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    dp = sub.add_parser("_driver")
    dp.add_argument("--address", required=True)
    dp.add_argument("--runs", required=True)
    dp.add_argument("--out", required=True)
    dp.add_argument("--space-json", required=True)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--budget", type=int, default=160)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--nfe", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="fix,ahead", help="fix: the driver as shipped (plan_ahead 0); ahead: "
                   f"plan_ahead {PLAN_AHEAD}; nofix: with S3_TUNE_KEEP_IDLE_ACTORS=0 (Tune's default actor cache, see "
                   "s3_ray/search/actor_cache.py); synclog: as fix, Tune's loop waiting for each MLflow child run; "
                   "tunelogs: as fix, with Tune's default CSV and TensorBoard loggers")
    p.add_argument("--hosts", choices=("netns", "same"), default="netns",
                   help="netns: cluster/local.sh (one network namespace per node, token auth); same: every node "
                   "on this machine's network stack (ray.cluster_utils), where ip netns is unavailable")
    p.add_argument("--report-only", action="store_true", help="rewrite scaling.md from scaling.json")
    p.add_argument("--tag", default="", help="suffix of the result files (scaling<tag>.json/.md)")
    a = p.parse_args(argv)
    if a.cmd == "_driver":
        return driver(a)
    if a.report_only:
        old = json.loads((RESULTS / f"scaling{a.tag}.json").read_text())
        cfg = old["config"]
        a.budget, a.samples, a.nfe = cfg["budget"], cfg["metric"]["samples"][0], cfg["nfe"][0]
        a.repeats = 1 + max(r["repeat"] for r in old["runs"])
        missed = report(old["runs"], a, sorted({r["workers"] for r in old["runs"]}),
                        list(dict.fromkeys(r["variant"] for r in old["runs"])), machine=old["machine"])
        return exit_code(missed)
    if a.hosts == "netns" and os.geteuid() != 0:
        sys.exit("scaling.py needs root (cluster/local.sh uses network namespaces); or use --hosts same")
    workers = [int(w) for w in a.workers.split(",")]
    variants = a.variants.split(",")
    runs = []
    with tempfile.TemporaryDirectory(prefix="s3scal-") as tmp:
        for rep in range(a.repeats):
            for v in variants:
                for w in workers:  # interleaved, so slow phases of the machine hit every setting
                    r = (run_one if a.hosts == "netns" else run_one_same_host)(w, a, Path(tmp), v)
                    r["repeat"] = rep
                    runs.append(r)
                    print(f"{v} W={w} rep {rep}: {r['trials']} trials, {r['trials_per_min']:.1f}/min "
                          f"(steady {r['steady_trials_per_min'] or 0:.1f}/min), searcher "
                          f"{100 * r['searcher_share']:.1f}% of wall, per node {r['trials_per_node']}, "
                          f"idle {100 * (r['idle_share'] or 0):.0f}%, CPU cores: ours {r['our_cpu_cores']:.2f} "
                          f"other {r['other_cpu_cores']:.2f}", flush=True)
    return exit_code(report(runs, a, workers, variants))


def exit_code(missed: list[str]) -> int:
    """1 if the report marked a target missed (``make bench`` fails then), else 0."""
    if missed:
        print(f"scaling.py: target(s) missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


KEYS = ("trials_per_min", "steady_trials_per_min", "fit_wall_s", "searcher_s", "searcher_share", "idle_share",
        "worker_idle_share", "planning_s", "median_turnaround_s", "first_completion_s",
        "driver_cpu_share", "searcher_share_of_driver_cpu", "median_trial_eval_s", "our_cpu_cores", "other_cpu_cores",
        "driver_fit_cpu_ms_per_trial", "fit_cluster_cpu_s_per_trial", "fit_cluster_cores", "fit_machine_cores")


def report(runs, a, workers, variants, machine=None):
    for r in runs:
        r["median_trial_eval_s"] = statistics.median(x[2] for x in r["trial_log"] if x[2] is not None)
        r["median_turnaround_s"] = turnaround(r)
        r["driver_fit_cpu_ms_per_trial"] = 1000 * r["driver_cpu_s"] / r["trials"]
    agg = {}
    for v in variants:
        for w in workers:
            rs = [r for r in runs if r["workers"] == w and r["variant"] == v]
            agg[f"{v}/{w}"] = {k: statistics.median(r[k] for r in rs if r.get(k) is not None) for k in KEYS
                               if any(r.get(k) is not None for r in rs)}
    speedup = {v: {k: agg[f"{v}/{workers[-1]}"][k] / agg[f"{v}/{workers[0]}"][k]
                   for k in ("trials_per_min", "steady_trials_per_min")} for v in variants if len(workers) > 1}
    if machine is None:
        import platform

        import ray
        import torch

        machine = {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg(), "python": platform.python_version(),
                   "torch": torch.__version__, "ray": ray.__version__, "hosts": a.hosts}
    hosts = machine.get("hosts", "netns")
    out = {"config": {**space(a.budget, a.samples, a.nfe, 0), "concurrency": "= workers"}, "machine": machine,
           "variants": {"fix": "driver as shipped (s3_ray/search/actor_cache.py keeps idle trial actors), plan_ahead 0",
                        "ahead": f"as fix, with plan_ahead {PLAN_AHEAD}: the next stage is planned in the background "
                                 "while the stage's last trials run",
                        "nofix": "S3_TUNE_KEEP_IDLE_ACTORS=0: Tune's default actor cache",
                        "synclog": "as fix, but Tune's loop waits for each trial's MLflow child run (the logging "
                                   "before it moved to a background thread)",
                        "tunelogs": "as fix, with Tune's default CSV and TensorBoard trial loggers (as before they "
                                    "were turned off)"},
           "median": agg, "speedup": speedup, "targets": {"speedup_1_to_2": 1.8, "searcher_share_max": 0.05},
           "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"scaling{a.tag}.json").write_text(json.dumps(out, indent=1) + "\n")
    sp = space(a.budget, a.samples, a.nfe, 0)
    seeds = seed_count(sp)
    md = [f"# Scaling over Ray worker nodes ({' / '.join(map(str, workers))} workers, 1 CPU each)", "",
          ("Cluster from `cluster/local.sh` (network namespaces, token auth" if hosts == "netns" else
           "Cluster of Ray nodes on one network stack (`--hosts same`: `ray.cluster_utils.Cluster`, no token auth")
          + "; the head has 0 CPUs for trials, so trials run on the worker nodes only), the search driver on the "
          f"head node. Embedded digits model, "
          f"NFE {a.nfe}, {a.samples} samples per trial, budget {a.budget} ({seeds} seed schedules + {sp['stages']} "
          f"stages), "
          f"predictor 300 epochs / 400 candidates, concurrency = workers. {a.repeats} interleaved repeats, "
          f"medians. Machine: {machine['cpus']} CPU cores shared by the head (GCS, dashboard, driver), the "
          f"workers and any other process"
          + (f"; Python {machine['python']}, torch {machine['torch']}, Ray {machine['ray']}." if "torch" in machine
             else "."), "",
          "| variant | workers | trials/min | steady trials/min | fit wall (s) | searcher (s) | searcher / wall | "
          "searcher / driver CPU | planning (s) | no trial in flight | worker slots idle | median trial eval (s) | "
          "CPU cores: cluster / other |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        for w in workers:
            m = agg[f"{v}/{w}"]
            md.append(f"| {v} | {w} | {m['trials_per_min']:.1f} | {m.get('steady_trials_per_min', float('nan')):.1f} | "
                      f"{m['fit_wall_s']:.1f} | {m['searcher_s']:.2f} | {100 * m['searcher_share']:.1f} % | "
                      f"{100 * m['searcher_share_of_driver_cpu']:.0f} % | {m.get('planning_s', float('nan')):.2f} | "
                      f"{100 * m.get('idle_share', float('nan')):.0f} % | "
                      f"{100 * m.get('worker_idle_share', float('nan')):.0f} % | "
                      f"{m['median_trial_eval_s']:.2f} | {m['our_cpu_cores']:.2f} / {m['other_cpu_cores']:.2f} |")
    md += [""] + [f"Speed-up {workers[0]} -> {workers[-1]} workers ({v}): {sp['trials_per_min']:.2f}x over the whole "
                  f"fit, {sp['steady_trials_per_min']:.2f}x in steady state (target >= 1.8x)." for v, sp in speedup.items()]
    md += diagnosis(agg, speedup, workers, variants, machine, (a.budget - seeds) / sp["stages"])
    md += cpu_by_process_table(runs, variants, workers)
    md += ["", "trials/min = trials / wall time of `Tuner.fit` (start-up, every stage boundary included); steady = "
           "completions after the first one per node / the time they took. Searcher = time inside "
           "`S3Searcher.suggest`, `on_trial_complete` and `save` (the driver's loop waits meanwhile); with "
           "plan_ahead 0 nearly all of it is stage planning (predictor fit + generating and ranking mutants), "
           "during which no trial runs. Planning = time spent planning stages, in `suggest` or (plan_ahead > 0) in "
           "a background thread beside it. Worker slots idle = share of workers x fit wall time with no trial "
           "between its suggestion and its completion (stage boundaries, the time from a completion to the next "
           "suggestion, the last stage's tail). The predictor's quality (held-out "
           "Kendall tau per stage) is measured by the driver after `Tuner.fit` (last planning column; not in the "
           "searcher time). CPU cores: average over the run "
           "(final evaluation included) of the cluster's processes, sampled per process, and of everything else "
           "on the machine.", "",
           "Per run:", "",
           "| variant | workers | repeat | fit wall s | trials/min | steady | searcher s (suggest / complete / save) | "
           "planning s (fit / mutants) | tau after the search s | trials per node | CPU cores used: cluster / other processes |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        by, br = r["searcher_by_method_s"], r.get("suggest_breakdown_s", {})
        md.append(f"| {r['variant']} | {r['workers']} | {r['repeat']} | {r['fit_wall_s']:.1f} | {r['trials_per_min']:.1f} | "
                  f"{r['steady_trials_per_min'] or 0:.1f} | {r['searcher_s']:.2f} ({by.get('suggest', 0):.2f} / "
                  f"{by.get('on_trial_complete', 0):.3f} / {by.get('save', 0):.2f}) | {br.get('plan_stage', 0):.2f} "
                  f"({br.get('predictor_fit', 0):.2f} / {br.get('mutants', 0):.2f}) | "
                  f"{br.get('quality_after_search', 0):.2f} | "
                  f"{r['trials_per_node']} | {r['our_cpu_cores']:.2f} / {r['other_cpu_cores']:.2f} |")
    (RESULTS / f"scaling{a.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return [name for name, ok in target_checks(agg, speedup, workers, variants).items() if not ok]


def cpu_by_process_table(runs, variants, workers) -> list[str]:
    """Median CPU ms per trial by kind of process (whole driver run: start-up and final evaluation too)."""
    runs = [r for r in runs if "cpu_s_by_process_kind" in r]
    if not runs:
        return []
    kinds = ["trial workers", "driver", "raylets", "GCS", "dashboard (head)", "log monitors", "autoscaler monitor",
             "other"]
    lines = ["", "CPU per trial by process (ms; median over repeats; from the driver's start to its exit, so "
             "start-up and the final evaluation are in it; the driver's CPU inside `Tuner.fit` alone in the "
             "last column):", "", "| variant | workers | " + " | ".join(kinds) + " | driver in fit |",
             "|---|---|" + "---|" * (len(kinds) + 1)]
    for v in variants:
        for w in workers:
            rs = [r for r in runs if r["workers"] == w and r["variant"] == v]
            if not rs:
                continue
            cells = [statistics.median(1000 * r["cpu_s_by_process_kind"].get(k, 0.0) / r["trials"] for r in rs)
                     for k in kinds]
            fit_ms = statistics.median(r["driver_fit_cpu_ms_per_trial"] for r in rs)
            lines.append(f"| {v} | {w} | " + " | ".join(f"{c:.0f}" for c in cells) + f" | {fit_ms:.0f} |")
    return lines


def cpu_bound(one: dict, two: dict, workers, machine) -> list[str]:
    """The trials/min the machine's cores allow at the CPU per trial measured during the fit."""
    if two.get("fit_cluster_cpu_s_per_trial") is None:
        return []
    per_trial = two["fit_cluster_cpu_s_per_trial"]
    bound = 60 * machine["cpus"] / per_trial
    return [f"- CPU bound: during `Tuner.fit` with {workers[-1]} workers the cluster's processes (trials, driver, "
            f"Ray) used {per_trial:.2f} CPU-s per trial and {two['fit_cluster_cores']:.2f} cores on average (the "
            f"whole machine {two['fit_machine_cores']:.2f}); at that cost {machine['cpus']} cores allow at most "
            f"{bound:.0f} trials/min (measured {two['trials_per_min']:.0f}, {100 * two['trials_per_min'] / bound:.0f} "
            f"% of it), i.e. a speed-up of at most {bound / one['trials_per_min']:.2f}x over the "
            f"{one['trials_per_min']:.0f} trials/min of {workers[0]} worker ({one['fit_cluster_cpu_s_per_trial']:.2f} "
            f"CPU-s per trial, {one['fit_cluster_cores']:.2f} cores)."]


def versus_fix(label: str, v: str, agg, speedup, workers) -> str:
    """One diagnosis line: variant ``v`` against fix (driver CPU, turnaround, trials/min)."""
    w0, w1 = workers[0], workers[-1]
    f1, f2, x1, x2 = agg[f"fix/{w0}"], agg[f"fix/{w1}"], agg[f"{v}/{w0}"], agg[f"{v}/{w1}"]
    return (f"- {label}: the driver's CPU in `Tuner.fit` {f1['driver_fit_cpu_ms_per_trial']:.0f} / "
            f"{f2['driver_fit_cpu_ms_per_trial']:.0f} ms per trial against {x1['driver_fit_cpu_ms_per_trial']:.0f} / "
            f"{x2['driver_fit_cpu_ms_per_trial']:.0f} ms ({w0} / {w1} workers); median turnaround from a result to "
            f"the next trial {1000 * f1['median_turnaround_s']:.0f} / {1000 * f2['median_turnaround_s']:.0f} ms "
            f"against {1000 * x1['median_turnaround_s']:.0f} / {1000 * x2['median_turnaround_s']:.0f} ms; trials/min "
            f"fix vs {v}: {f1['trials_per_min'] / x1['trials_per_min']:.2f}x with {w0}, "
            f"{f2['trials_per_min'] / x2['trials_per_min']:.2f}x with {w1} workers; speed-up of {v} "
            f"{speedup[v]['trials_per_min']:.2f}x.")


def target_checks(agg, speedup, workers, variants) -> dict[str, bool]:
    """The targets the diagnosis reports, True where met: a speed-up of >= 1.8x from the first to the last
    worker count, and the searcher < 5 % of the fit's wall time (with the last worker count as shipped, with
    either worker count for plan_ahead), for the driver as shipped (fix) and with plan_ahead (ahead)."""
    if len(workers) < 2 or "fix" not in variants:
        return {}
    shares = {v: [agg[f"{v}/{w}"]["searcher_share"] for w in (workers[0], workers[-1])] for v in ("fix", "ahead")
              if v in variants}
    checks = {"fix: speed-up": speedup["fix"]["trials_per_min"] >= 1.8, "fix: searcher share": shares["fix"][1] < 0.05}
    if "ahead" in variants:
        checks["ahead: speed-up"] = speedup["ahead"]["trials_per_min"] >= 1.8
        checks["ahead: searcher share"] = max(shares["ahead"]) < 0.05
    return checks


def diagnosis(agg, speedup, workers, variants, machine, per_stage: float) -> list[str]:
    """Where the time goes, from the medians (the targets: >= 1.8x from 1 to 2 workers, searcher < 5 %)."""
    if len(workers) < 2 or "fix" not in variants:
        return []
    one, two = agg[f"fix/{workers[0]}"], agg[f"fix/{workers[-1]}"]
    k = workers[-1] / workers[0]
    serial = one["idle_share"]
    bound = 1 / (serial + (1 - serial) / k)
    met = {name: "met" if ok else "missed" for name, ok in target_checks(agg, speedup, workers, variants).items()}
    lines = ["", "## Diagnosis", "",
             f"- Targets: speed-up {speedup['fix']['trials_per_min']:.2f}x (target 1.8x: "
             f"{met['fix: speed-up']}); searcher "
             f"{100 * one['searcher_share']:.0f}-{100 * two['searcher_share']:.0f} % of wall (target < 5 %: "
             f"{met['fix: searcher share']}).",
             f"- Serial part: with 1 worker no trial is in flight {100 * serial:.0f} % of the fit (stage planning "
             f"{one.get('planning_s', one['searcher_s']):.1f} s at 3 stage boundaries, Tune's turnaround of "
             f"{1000 * one.get('median_turnaround_s', float('nan')):.0f} ms (median) from a result to the next "
             f"trial); it does not shrink with workers, so Amdahl bounds the speed-up at {bound:.2f}x before any "
             f"other cost. Start-up: the first result comes {one.get('first_completion_s', float('nan')):.1f} s "
             f"after the fit starts.",
             f"- CPU: {machine['cpus']} cores for everything; with {workers[-1]} workers the cluster used "
             f"{two['our_cpu_cores']:.2f} cores on average (head services + driver + trials) and the median trial "
             f"evaluation took {two['median_trial_eval_s']:.2f} s instead of {one['median_trial_eval_s']:.2f} s.",
             *cpu_bound(one, two, workers, machine),
             f"- Searcher time is stage planning: the predictor fit and generating, encoding and ranking mutants, "
             f"all while the workers wait; it is "
             f"{100 * one['searcher_share_of_driver_cpu']:.0f} % of the driver's CPU time. It is a fixed cost per "
             f"stage, so its share falls with the budget per stage (here {per_stage:.0f} trials per stage)."]
    if "ahead" in variants:
        a1, a2 = agg[f"ahead/{workers[0]}"], agg[f"ahead/{workers[-1]}"]
        sp = speedup["ahead"]
        lines.append(f"- Planning ahead (plan_ahead {PLAN_AHEAD}; a different search: each stage trains without the "
                     f"previous phase's last {PLAN_AHEAD} results): speed-up {sp['trials_per_min']:.2f}x over the whole fit, "
                     f"{sp['steady_trials_per_min']:.2f}x steady (target 1.8x: "
                     f"{met['ahead: speed-up']}); the searcher's time in the driver's "
                     f"loop {100 * a1['searcher_share']:.1f}-{100 * a2['searcher_share']:.1f} % of wall (target < 5 %: "
                     f"{met['ahead: searcher share']}), planning "
                     f"{a1.get('planning_s', float('nan')):.1f} s beside the trials; no trial in flight "
                     f"{100 * a1['idle_share']:.0f} % / {100 * a2['idle_share']:.0f} % of the fit (fix: "
                     f"{100 * one['idle_share']:.0f} % / {100 * two['idle_share']:.0f} %); trials/min vs fix: "
                     f"{a1['trials_per_min'] / one['trials_per_min']:.2f}x with {workers[0]}, "
                     f"{a2['trials_per_min'] / two['trials_per_min']:.2f}x with {workers[-1]} workers.")
    labels = {"synclog": "MLflow logging in a background thread (fix) against logging in Tune's loop (synclog)",
              "tunelogs": "Tune's CSV and TensorBoard trial loggers off (fix) against on (tunelogs)"}
    lines += [versus_fix(label, v, agg, speedup, workers) for v, label in labels.items() if v in variants]
    if "nofix" in variants:
        lines.append(f"- Without the actor-cache fix (Tune keeps one idle actor at a stage boundary) the speed-up is "
                     f"{speedup['nofix']['trials_per_min']:.2f}x: after the first boundary every trial ran on one "
                     f"node (trials per node in the runs below).")
    return lines


if __name__ == "__main__":
    sys.exit(main())
