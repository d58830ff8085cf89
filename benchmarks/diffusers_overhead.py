"""Per-step cost of S3Scheduler.step vs diffusers' DPMSolverMultistepScheduler.step (2M).

Both run DPM-Solver++(2M) on diffusers' own 10-step grid (final_sigmas_type='sigma_min'; our
schedule on the same times, as tests/test_s3_scheduler.py builds it) on the same tensors: a fixed
model output, so only the scheduler's arithmetic and bookkeeping are timed. Repeats are
interleaved in one process (repeat r: ours, then diffusers); we report medians of the per-step
time of a whole 10-step loop after set_timesteps, and their ratio (target <= 0.5). Writes
benchmarks/results/diffusers_overhead.{json,md}.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 10
REPEATS = 41
N_TRAIN = 1000


def schedulers():
    from diffusers import DPMSolverMultistepScheduler

    from s3_ray import S3Scheduler
    from s3_ray.usf.baselines import build_baseline
    from s3_ray.usf.schedule import SolverSchedule

    theirs = DPMSolverMultistepScheduler(num_train_timesteps=N_TRAIN, beta_schedule="scaled_linear", beta_start=0.00085,
                                         beta_end=0.012, final_sigmas_type="sigma_min")
    theirs.set_timesteps(STEPS)
    times = [(int(k) + 1) / N_TRAIN for k in theirs.timesteps] + [1.0 / N_TRAIN]
    noise = S3Scheduler.from_config(theirs.config).noise
    d = build_baseline("dpm_solver_pp_2m", noise, STEPS, lower_order_final=True).model_dump()
    d["t_start"] = times[0]
    for st, t in zip(d["steps"], times[1:]):
        st["t"] = t
    ours = S3Scheduler.from_config(theirs.config, schedules=[SolverSchedule.model_validate(d)])
    return ours, theirs


def time_shape(shape, ours, theirs) -> dict:
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g)
    fixed = torch.randn(shape, generator=g)

    def loop(sched):
        sched.set_timesteps(STEPS)
        x = x_T
        start = time.perf_counter()
        for t in sched.timesteps:
            x = sched.step(fixed, t, x).prev_sample
        return (time.perf_counter() - start) / STEPS, x

    for _ in range(3):  # warm-up
        loop(ours), loop(theirs)
    a, b = [], []
    for _ in range(REPEATS):
        a.append(loop(ours)[0])
        b.append(loop(theirs)[0])
    mine, ref = loop(ours)[1], loop(theirs)[1]
    ours_us, theirs_us = statistics.median(a) * 1e6, statistics.median(b) * 1e6
    return {"shape": "x".join(map(str, shape)), "ours_us_per_step": round(ours_us, 1),
            "diffusers_us_per_step": round(theirs_us, 1), "ratio": round(ours_us / theirs_us, 3),
            "max_relative_difference": float((mine - ref).abs().max() / ref.abs().max())}


def main():
    torch.set_num_threads(1)
    ours, theirs = schedulers()
    rows = [time_shape(shape, ours, theirs) for shape in [(4, 4, 64, 64), (1, 4, 64, 64)]]
    out = {"benchmark": "diffusers_overhead", "steps": STEPS, "repeats": REPEATS, "threads": 1,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "diffusers_overhead.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["# S3Scheduler.step vs DPMSolverMultistepScheduler.step (DPM-Solver++(2M))", "",
          f"{STEPS}-step loops on diffusers' grid, fixed model output, medians of {REPEATS} interleaved repeats, "
          "1 thread, float32. Target ratio <= 0.5.", "",
          "| latents | S3Scheduler (µs/step) | diffusers (µs/step) | ratio | max relative difference |", "|---|---|---|---|---|"]
    md += [f"| {r['shape']} | {r['ours_us_per_step']} | {r['diffusers_us_per_step']} | {r['ratio']} | "
           f"{r['max_relative_difference']:.1e} |" for r in rows]
    (RESULTS / "diffusers_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
