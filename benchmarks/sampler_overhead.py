"""Per-step overhead of our sampler vs diffusers' DPMSolverMultistepScheduler.step (2M).

The model returns a fixed tensor, so only solver arithmetic and bookkeeping are timed. Both run
the same DPM-Solver++(2M) schedule, interleaved in one process (repeat r: ours, then diffusers),
and we report medians of per-step time and their ratio. Writes
benchmarks/results/sampler_overhead.{json,md}.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import VPDiscrete
from s3_ray.usf.sampler import SamplerPlan

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 20
REPEATS = 41


def time_shape(shape, plan, sched) -> dict:
    """Median per-step time of ours and diffusers' at one tensor shape, interleaved."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g)
    fixed = torch.randn(shape, generator=g)

    def model(x, t):
        return fixed

    def ours():
        start = time.perf_counter()
        plan.run(model, x_T)
        return (time.perf_counter() - start) / STEPS

    def theirs():
        sched.set_timesteps(STEPS)
        x = x_T
        start = time.perf_counter()
        for t in sched.timesteps:
            x = sched.step(fixed, t, x).prev_sample
        return (time.perf_counter() - start) / STEPS

    for _ in range(3):  # warm-up
        ours(), theirs()
    a, b = [], []
    for _ in range(REPEATS):
        a.append(ours())
        b.append(theirs())
    ours_us, theirs_us = statistics.median(a) * 1e6, statistics.median(b) * 1e6
    return {"shape": "x".join(map(str, shape)), "ours_us_per_step": round(ours_us, 1),
            "diffusers_us_per_step": round(theirs_us, 1), "ratio": round(ours_us / theirs_us, 3)}


def main():
    torch.set_num_threads(1)
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
                                        lower_order_final=False, final_sigmas_type="sigma_min")
    noise = VPDiscrete.from_diffusers_config(sched.config)
    schedule = build_baseline("dpm_solver_pp_2m", noise, STEPS)
    t0 = time.perf_counter()
    plan = SamplerPlan(schedule, noise)
    compile_ms = (time.perf_counter() - t0) * 1e3

    rows = [time_shape(shape, plan, sched) for shape in [(1, 3, 32, 32), (64, 3, 32, 32)]]

    out = {"benchmark": "sampler_overhead", "steps": STEPS, "repeats": REPEATS, "threads": 1,
           "plan_compile_ms": round(compile_ms, 2), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sampler_overhead.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["# Sampler overhead: ours vs diffusers DPMSolverMultistepScheduler.step (2M)", "",
          f"{STEPS} steps, fixed model output, medians of {REPEATS} interleaved repeats, 1 thread. "
          f"Plan compile (once per schedule): {compile_ms:.2f} ms.", "",
          "| shape | ours (µs/step) | diffusers (µs/step) | ratio |", "|---|---|---|---|"]
    md += [f"| {r['shape']} | {r['ours_us_per_step']} | {r['diffusers_us_per_step']} | {r['ratio']} |" for r in rows]
    (RESULTS / "sampler_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
