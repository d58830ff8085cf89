"""How many trials per second this machine runs with 1 and 2 trial processes, without Ray.

The ceiling for any 1 -> 2 worker speed-up: P bare processes (P = 1, 2) each evaluate the
scaling benchmark's trials (embedded digits model, NFE 4, 1,000 samples, FID) in a loop for a fixed
time, all starting together once every one has warmed up, one torch thread each. Repeated for several sampling
chunk sizes (``Target.sample(chunk=...)``). A pure-Python loop, run the same way, tells whether
the cores themselves scale. Rounds are interleaved (P = 1 then P = 2 for every chunk size, per
repeat). Writes benchmarks/results/trial_throughput.{json,md}.

    python benchmarks/trial_throughput.py [--seconds 15] [--repeats 2] [--chunks 1000,500,256,128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("S3_BENCH_RESULTS", ROOT / "benchmarks" / "results"))


def worker(kind: str, chunk: int, seconds: float) -> None:
    """One process: warm up, say ready, wait for the go line, count completed work items for ``seconds``."""
    if kind == "trial":
        import torch

        torch.set_num_threads(1)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from scaling import space

        from s3_ray.config import SearchConfig
        from s3_ray.metrics import evaluate as ev
        from s3_ray.search.searcher import S3Searcher
        from s3_ray.usf.schedule import SolverSchedule

        searcher = S3Searcher(SearchConfig.model_validate(space(40, 1000, 4, 1)))
        configs = [searcher.suggest(str(i)) for i in range(12)]  # the seed schedules of a search
        target = ev.get_target(configs[0]["model"], configs[0]["metric"])
        schedules = [SolverSchedule.from_json(c["schedule"]) for c in configs]
        ev.SAMPLE_CHUNK = chunk  # what every trial's Target.sample uses

        def item(i):
            ev.evaluate(schedules[i % len(schedules)], target, n=1000, seed=0)

        item(0)
    else:
        def item(i):
            x = 0
            for k in range(200_000):
                x += k
    print("ready", flush=True)
    sys.stdin.readline()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        item(n)
        n += 1
    print(json.dumps({"items": n, "seconds": time.perf_counter() - t0}))


def run_round(kind: str, chunk: int, procs: int, seconds: float) -> float:
    """Items per second of ``procs`` concurrent processes together."""
    cmd = [sys.executable, __file__, "--worker", kind, "--chunk", str(chunk), "--seconds", str(seconds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ps = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env=env) for _ in range(procs)]
    for p in ps:  # every process has loaded the model and run one trial
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a {kind} process failed to start (exit {p.wait()})")
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
    return sum(o["items"] / o["seconds"] for o in outs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunks", default="1000,500,256,128")
    ap.add_argument("--worker"), ap.add_argument("--chunk", type=int)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.chunk, a.seconds)
    chunks = [int(c) for c in a.chunks.split(",")]
    rates: dict = {}
    for _ in range(a.repeats):
        for kind, chunk in [("python", 0)] + [("trial", c) for c in chunks]:
            for procs in (1, 2):
                rates.setdefault(f"{kind}/{chunk}/{procs}", []).append(run_round(kind, chunk, procs, a.seconds))
    rows = []
    for kind, chunk in [("python", 0)] + [("trial", c) for c in chunks]:
        one = statistics.median(rates[f"{kind}/{chunk}/1"])
        two = statistics.median(rates[f"{kind}/{chunk}/2"])
        rows.append({"kind": kind, "chunk": chunk, "rate_1": one, "rate_2": two, "speedup": two / one,
                     "runs_1": rates[f"{kind}/{chunk}/1"], "runs_2": rates[f"{kind}/{chunk}/2"]})
    base = next(r for r in rows if r["kind"] == "trial" and r["chunk"] == max(chunks))
    for r in rows:
        if r["kind"] == "trial":
            r["rate_1_vs_whole"], r["rate_2_vs_whole"] = r["rate_1"] / base["rate_1"], r["rate_2"] / base["rate_2"]
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "seconds": a.seconds,
           "repeats": a.repeats, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trial_throughput.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["# Trial throughput with 1 and 2 bare processes (no Ray)", "",
          f"{os.cpu_count()} CPUs. Each process evaluates the scaling benchmark's trials (digits model, NFE 4, "
          f"1,000 samples + FID) in a loop for {a.seconds:g} s, all processes starting together, one torch "
          f"thread each; medians of {a.repeats} interleaved repeats. `chunk` = samples per network batch "
          "(`Target.sample`); `python` = a pure-Python loop (the cores alone).", "",
          "| work | chunk | items/s, 1 process | items/s, 2 processes | 2 / 1 | vs chunk 1000: 1 proc | 2 procs |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = (f"{r['rate_1_vs_whole']:.2f}x | {r['rate_2_vs_whole']:.2f}x" if r["kind"] == "trial" else "- | -")
        md.append(f"| {r['kind']} | {r['chunk'] or '-'} | {r['rate_1']:.3f} | {r['rate_2']:.3f} | "
                  f"{r['speedup']:.2f}x | {rel} |")
    (RESULTS / "trial_throughput.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
