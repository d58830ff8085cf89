"""Scale of the S3 searcher past one machine, measured: worker utilisation of real-Ray searches with
synthetic trials (``synthetic:`` in the space: trials sleep ~2 s and score on the gmm model, so 64
run concurrently on 2 cores), the discrete-event simulation of the same searcher (``s3_ray/search/
simulate.py``) validated against them and run up to 1024 workers, and the searcher's decision
latency with 10,000 results in its pool. Writes benchmarks/results/scale_sim{tag}.{json,md}.

    python benchmarks/scale.py [--real 8,16,32,64] [--sim 8,16,32,64,128,256,512,1024]
                               [--per-worker 20] [--latency 10000] [--tag _x]

Utilisation = busy slot-seconds / (workers x window), the window running from the moment every
slot has started a trial to the start of the last trial (``simulate.utilisation``: start-up and the
final drain are outside it). Each real run is its own process: ``run_search`` (the code ``s3
search`` runs, local Ray on 127.0.0.1, local MLflow store) with the searcher's and the MLflow
callback's methods wrapped from outside to log a timeline."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("S3_BENCH_RESULTS", ROOT / "benchmarks" / "results"))


def space(workers: int, per_worker: int, plan_workers: int = 1, lag: float = 0.0, refit: int = 0) -> dict:
    """The benchmark's search: S3 with asynchronous stages (plan_ahead >= a stage: each stage trains
    on every result before the previous one), synthetic 2-s trials with a 2 % tail of 5x stragglers."""
    budget = workers * per_worker
    return {
        "name": f"scale{workers}", "model": {"kind": "gmm", "noise_schedule": "vp_linear"},
        "metric": {"kind": "rmse", "samples": [64], "final_samples": 64, "final_seeds": 1},
        "nfe": [4, 5], "budget": budget, "stages": 3, "plan_ahead": budget, "concurrency": workers,
        "resources": {"cpu": round(2 / workers, 6)}, "final_top_k": 1, "seed": 0, "plan_workers": plan_workers,
        "plan_lag": round(lag * workers), "predictor": {"refit_epochs": refit or None},
        "synthetic": {"median_s": 2.0, "sigma": 0.25, "straggler_prob": 0.02, "straggler_factor": 5.0},
    }


# ---- one real run (a child process) ----------------------------------------------------------------
def real_child(workers: int, per_worker: int, out: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="s3scale-", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(tmp / "ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from s3_ray.config import parse_config
    from s3_ray.search import searcher as searcher_mod
    from s3_ray.search.driver import run_search
    from s3_ray.tracking import mlflow_tracking

    log = {"trials": [], "suggests": [], "decision_s": [], "mlflow_s": [], "plan": []}
    cls = searcher_mod.S3Searcher
    suggest, complete = cls.suggest, cls.on_trial_complete
    fit_stage, chunk = cls._fit_stage, searcher_mod.plan_chunk

    def timed_suggest(self, trial_id):
        t0 = time.perf_counter()
        r = suggest(self, trial_id)
        log["decision_s"].append(time.perf_counter() - t0)
        log["suggests"].append((time.time(), self.waiting_for if r is None else None))
        return r

    def timed_complete(self, trial_id, result=None, error=False):
        t0 = time.perf_counter()
        complete(self, trial_id, result, error)
        log["decision_s"].append(time.perf_counter() - t0)
        if result and "started_at" in result:
            log["trials"].append((result["started_at"], result["ended_at"]))

    def timed(fn):
        def wrapper(*args):
            t0 = time.perf_counter()
            r = fn(*args)
            log["plan"].append(time.perf_counter() - t0)
            return r
        return wrapper

    cls.suggest, cls.on_trial_complete, cls._fit_stage = timed_suggest, timed_complete, timed(fit_stage)
    searcher_mod.plan_chunk = timed(chunk)  # (plan_workers 1: chunks run on the planning thread)
    cb = mlflow_tracking.MlflowTrialCallback
    cb_complete = cb.on_trial_complete

    def timed_cb(self, *a, **k):
        t0 = time.perf_counter()
        r = cb_complete(self, *a, **k)
        log["mlflow_s"].append(time.perf_counter() - t0)
        return r

    cb.on_trial_complete = timed_cb
    cfg = parse_config(space(workers, per_worker))
    t0 = time.time()
    summary = run_search(cfg, runs_root=tmp / "runs", out=open(os.devnull, "w"))
    log["wall_s"] = time.time() - t0
    log["n_trials"] = summary.get("n_trials", len(log["trials"]))
    log["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps(log))


def waits_from_suggests(suggests: list) -> list:
    """Wait intervals (start, end, why) from the per-call reasons of suggest (None: it proposed)."""
    from s3_ray.search.simulate import WaitLog

    out = []
    log = WaitLog(out)
    for t, why in suggests:
        log.saw(t, why)
    return out


def real_run(workers: int, per_worker: int) -> dict:
    from s3_ray.search.simulate import Timeline, utilisation

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "log.json"
        t0 = time.time()
        mem = _MemorySampler()
        proc = subprocess.run([sys.executable, __file__, "--child", str(workers), str(per_worker), str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=1800)
        peak = mem.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"real run with {workers} workers failed:\n{proc.stderr[-3000:]}")
        log = json.loads(out.read_text())
    tl = Timeline(workers, trials=[tuple(t) for t in log["trials"]], waits=waits_from_suggests(log["suggests"]),
                  decision_s=log["decision_s"])
    u = utilisation(tl)
    idle_turn = u["idle_share"].get("turnaround", 0.0) * workers * u["window_s"]
    ends = sorted(e for _, e in tl.trials)
    return {"workers": workers, "trials": len(tl.trials), "fit_wall_s": log["wall_s"], "run_wall_s": time.time() - t0,
            **u, "turnaround_s_per_trial": idle_turn / max(u["trials_in_window"], 1),
            "trials_per_s": (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else float("nan"),
            "decision_p99_ms": _p(log["decision_s"], 99) * 1e3, "planning_s": sum(log["plan"]),
            "mlflow_callback_s": sum(log["mlflow_s"]), "memory_peak_gb": peak}


class _MemorySampler:
    """Peak of the machine's used memory (MemTotal - MemAvailable) while a run goes on."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.5):
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            used = (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 2**20
            self.peak = max(self.peak, used)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak


def _p(values, q) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


# ---- simulation and latency ------------------------------------------------------------------------
def sim_run(workers: int, per_worker: int, turnaround_s: float, plan_workers: int = 1, lag: float = 0.0,
            refit: int = 0) -> dict:
    from s3_ray.config import parse_config
    from s3_ray.search.simulate import simulate, utilisation

    t0 = time.time()
    tl = simulate(parse_config(space(workers, per_worker, plan_workers, lag, refit)), workers, turnaround_s=turnaround_s)
    return {"workers": workers, "plan_workers": plan_workers, "plan_lag": round(lag * workers), "refit_epochs": refit,
            "trials": len(tl.trials), **utilisation(tl), "sim_span_s": max(e for _, e in tl.trials), "best": tl.best,
            "planning_s": tl.planning_s, "decision_p99_ms": _p(tl.decision_s, 99) * 1e3,
            "decision_max_ms": max(tl.decision_s) * 1e3, "real_s": time.time() - t0}


def latency(n_results: int) -> dict:
    """Decision latency (suggest + on_trial_complete, the driver's loop waits meanwhile) of a searcher
    whose pool already holds ``n_results`` results, over the next stage of 1,000 trials."""
    from s3_ray.config import parse_config
    from s3_ray.search.simulate import simulate

    workers = 64
    sp = space(workers, 1)
    sp.update(budget=n_results + 1000, stages=2, random_init=(n_results // 2))  # a seed phase of n_results
    tl = simulate(parse_config(sp), workers, turnaround_s=0.0)
    late = tl.decision_s[2 * n_results:]  # the calls after the pool holds n_results
    return {"results_in_pool": n_results, "calls": len(late), "p50_ms": _p(late, 50) * 1e3,
            "p99_ms": _p(late, 99) * 1e3, "max_ms": max(late) * 1e3}


# ---- report ----------------------------------------------------------------------------------------
def report(res: dict, tag: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"scale_sim{tag}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Searcher at scale ({res['date']}, {res['machine']})", "",
             "S3 with asynchronous stages, synthetic trials (lognormal median 2 s, sigma 0.25, 2 % stragglers x5), "
             f"{res['per_worker']} trials per worker, NFE 4 and 5, 3 stages; utilisation in the steady window "
             "(every slot started -> last trial started). Idle shares are of workers x window.", ""]
    if res.get("real"):
        lines += ["## Real Ray (one node, 2 cores, local MLflow store)", "",
                  "| workers | trials | utilisation | barrier | planning | turnaround | s/trial turnaround | trials/s "
                  "| decision p99 ms | planning s | MLflow callback s | fit s | memory peak GB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["real"]:
            i = r["idle_share"]
            lines.append(f"| {r['workers']} | {r['trials']} | {r['utilisation']:.3f} | {i.get('stage barrier', 0):.3f} "
                         f"| {i.get('planning', 0):.3f} | {i.get('turnaround', 0):.3f} | {r['turnaround_s_per_trial']:.3f} "
                         f"| {r['trials_per_s']:.1f} | {r['decision_p99_ms']:.2f} | {r['planning_s']:.1f} "
                         f"| {r['mlflow_callback_s']:.1f} | {r['fit_wall_s']:.0f} | {r['memory_peak_gb']:.1f} |")
        lines.append("")
    if res.get("sim"):
        source = "assumed" if res.get("turnaround_given") else "from the real runs"
        lines += [f"## Simulation (turnaround {res['sim_turnaround_s']:.3f} s per trial, {source})", "",
                  "Stages are planned in chunks (`plan_chunk` 256: sizes 32, 64, 128, then 256), queued as each is ready; "
                  "`plan_workers` planning processes make the chunks (the simulation charges each chunk its "
                  "measured CPU time on the first free one: a head with that many spare cores; the searcher's "
                  "decisions, too, cost their CPU time); `plan_lag` lets "
                  "a stage's planning start before the previous stage's last stragglers are in.", "",
                  "`refit`: `predictor.refit_epochs` (incremental fits from the previous stage's predictor; "
                  "-: from scratch, 300 epochs). `best RMSE`: the search's best score per NFE (the "
                  "Gaussian-mixture objective), to see what a setting costs in search quality.", "",
                  "| workers | plan workers | plan lag | refit | trials | utilisation | real-Ray utilisation | barrier "
                  "| planning | turnaround | planning s | decision p99 ms | simulated span s | wall s | best RMSE |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        real = {r["workers"]: r["utilisation"] for r in res.get("real", [])}
        for r in res["sim"]:
            i = r["idle_share"]
            rr = f"{real[r['workers']]:.3f}" if r["workers"] in real else "-"
            best = " / ".join(f"{v:.4f}" for _, v in sorted(r.get("best", {}).items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {r['workers']} | {r.get('plan_workers', 1)} | {r.get('plan_lag', 0)} | {r.get('refit_epochs') or '-'} "
                         f"| {r['trials']} | {r['utilisation']:.3f} | {rr} "
                         f"| {i.get('stage barrier', 0):.3f} "
                         f"| {i.get('planning', 0):.3f} | {i.get('turnaround', 0):.3f} | {r['planning_s']:.1f} "
                         f"| {r['decision_p99_ms']:.2f} | {r['sim_span_s']:.0f} | {r['real_s']:.0f} | {best or '-'} |")
        lines.append("")
    if res.get("latency"):
        lat = res["latency"]
        lines += [f"Decision latency with {lat['results_in_pool']} results in the pool ({lat['calls']} calls): "
                  f"p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms, max {lat['max_ms']:.2f} ms.", ""]
    (RESULTS / f"scale_sim{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--real", default="8,16,32,64")
    ap.add_argument("--sim", default="8,16,32,64,128,256,512,1024")
    ap.add_argument("--per-worker", type=int, default=20)
    ap.add_argument("--latency", type=int, default=10000)
    ap.add_argument("--turnaround", type=float, default=None, help="seconds per trial (default: measured)")
    ap.add_argument("--plan-workers", default="1", help="planning processes, one sweep each (e.g. 1,4,8)")
    ap.add_argument("--lag", default="0", help="plan_lag in multiples of the worker count, one sweep each (e.g. 0,1)")
    ap.add_argument("--refit", default="0", help="predictor.refit_epochs (0: fits from scratch), one sweep each")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    if a.child:
        return real_child(int(a.child[0]), int(a.child[1]), Path(a.child[2]))
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
           "per_worker": a.per_worker, "real": [], "sim": []}
    for w in ints(a.real):
        res["real"].append(real_run(w, a.per_worker))
        print(json.dumps(res["real"][-1]), flush=True)
    measured = [r["turnaround_s_per_trial"] for r in res["real"]]
    res["turnaround_given"] = a.turnaround is not None
    res["sim_turnaround_s"] = a.turnaround if a.turnaround is not None else (
        statistics.median(measured) if measured else 0.05)
    for pw in ints(a.plan_workers):
        for lag in [float(x) for x in a.lag.split(",") if x]:
            for refit in ints(a.refit):
                for w in ints(a.sim):
                    res["sim"].append(sim_run(w, a.per_worker, res["sim_turnaround_s"], pw, lag, refit))
                    print(json.dumps(res["sim"][-1]), flush=True)
    if a.latency:
        res["latency"] = latency(a.latency)
    report(res, a.tag)


if __name__ == "__main__":
    sys.exit(main())
