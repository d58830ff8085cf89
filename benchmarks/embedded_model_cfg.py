"""Acceptance numbers of the guided embedded model ``digits_cfg`` (issue 14, item 1).

Measured, one process, one thread (``torch.set_num_threads(1)``), metric FID/KID with the digits
feature extractor against the model's own converged guided samples (``reference: model``: the
100-NFE exact third-order solve of 2,000 samples from the reference noise seed):

1. converged floor: FID of converged samples (the same 100-NFE solve) from fresh noise seeds against
   the reference set, at the same N (2,000) — two independent converged sets;
2. few-step gap: for each NFE, the best tuned baseline (DDIM, DPM-Solver++(2M), UniPC bh2 ×
   time-quadratic, logSNR-uniform; mean over the same fresh seeds) over the floor. Requirement:
   >= 5x at NFE 5;
3. label accuracy of those samples (the digits classifier's argmax vs the intended class);
4. speed: ``evaluate()`` of DDIM time-quadratic at NFE 5 with 1,000 samples, FID included, median over
   >= 10 timed runs after one warm-up. Requirement: >= 40 evaluations / minute / core;
5. the shipped weights' size. Requirement: <= 2 MB.

Writes ``benchmarks/results/embedded_model_cfg.{json,md}``. ``--quick``: a reduced smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("ddim", "dpm_solver_pp_2m", "unipc_bh2")
DISCRETIZATIONS = ("time_quadratic", "logsnr_uniform")
SEEDS = (20_001, 20_002)  # fresh: neither a search seed nor the reference set's


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6, 8])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="NFE 5 only, 500 samples, 3 timed runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from s3_ray.config import MetricConfig, ModelConfig
    from s3_ray.metrics.evaluate import REFERENCE_SOLVER, Target, evaluate
    from s3_ray.models.digits import CFG_UNET_PATH
    from s3_ray.usf.baselines import build_baseline

    nfes, n, runs = ([5], 500, 3) if a.quick else (a.nfe, a.samples, 10)
    target = Target(ModelConfig(kind="digits_cfg", guidance_scale=a.guidance),
                    MetricConfig(reference="model", reference_samples=n))
    target.reference_images()  # generated (or loaded) before anything is timed

    converged = build_baseline(REFERENCE_SOLVER[0], target.noise, REFERENCE_SOLVER[1])
    floor_runs = [evaluate(converged, target, n=n, seed=s) for s in SEEDS]
    floor = statistics.mean(r["fid"] for r in floor_runs)

    rows = []
    for nfe in nfes:
        for name in BASELINES:
            for disc in DISCRETIZATIONS:
                rs = [evaluate(build_baseline(name, target.noise, nfe, discretization=disc), target, n=n, seed=s)
                      for s in SEEDS]
                rows.append({"nfe": nfe, "baseline": name, "discretization": disc,
                             "fid": [r["fid"] for r in rs], "fid_mean": statistics.mean(r["fid"] for r in rs),
                             "label_accuracy": statistics.mean(r["label_accuracy"] for r in rs)})
    best = {}
    for nfe in nfes:
        b = min((r for r in rows if r["nfe"] == nfe), key=lambda r: r["fid_mean"])
        best[nfe] = {**b, "over_floor": b["fid_mean"] / floor}

    speed_schedule = build_baseline("ddim", target.noise, 5, discretization="time_quadratic")
    evaluate(speed_schedule, target, n=1000, seed=1)  # warm-up
    secs = []
    for i in range(runs):
        t0 = time.perf_counter()
        evaluate(speed_schedule, target, n=1000, seed=1 + i)
        secs.append(time.perf_counter() - t0)
    per_min = 60.0 / statistics.median(secs)
    weights_mb = CFG_UNET_PATH.stat().st_size / 1e6

    result = {
        "guidance_scale": a.guidance, "samples": n, "seeds": list(SEEDS), "quick": a.quick,
        "floor": {"fid": [r["fid"] for r in floor_runs], "fid_mean": floor,
                  "label_accuracy": statistics.mean(r["label_accuracy"] for r in floor_runs)},
        "rows": rows, "best": {str(k): v for k, v in best.items()},
        "speed": {"seconds": secs, "median_s": statistics.median(secs), "evaluations_per_min_per_core": per_min},
        "weights_mb": weights_mb,
        "acceptance": {"gap_at_nfe5_ge_5x": best.get(5, {}).get("over_floor", float("nan")) >= 5.0,
                       "evals_per_min_ge_40": per_min >= 40.0, "weights_le_2mb": weights_mb <= 2.0},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "date": time.strftime("%Y-%m-%d")},
    }
    md = [f"# Guided embedded model (digits_cfg, guidance {a.guidance:g})", "",
          f"FID vs the model's own converged guided samples, {n} samples, mean of seeds {list(SEEDS)}.", "",
          f"Converged floor (two independent 100-NFE sets): FID {floor:.4f} "
          f"({', '.join(format(r['fid'], '.4f') for r in floor_runs)}), label accuracy "
          f"{result['floor']['label_accuracy']:.3f}", "",
          "| NFE | best tuned baseline | FID | × floor | label acc. |", "|---|---|---|---|---|"]
    for nfe, b in best.items():
        md.append(f"| {nfe} | {b['baseline']} / {b['discretization']} | {b['fid_mean']:.4f} | {b['over_floor']:.1f}× "
                  f"| {b['label_accuracy']:.3f} |")
    md += ["", "All baselines (FID mean over seeds):", "", "| NFE | " + " | ".join(
        f"{b} / {d}" for b in BASELINES for d in DISCRETIZATIONS) + " |", "|---" * (1 + len(BASELINES) * len(DISCRETIZATIONS)) + "|"]
    for nfe in nfes:
        md.append(f"| {nfe} | " + " | ".join(f"{r['fid_mean']:.4f}" for r in rows if r["nfe"] == nfe) + " |")
    md += ["", f"Speed: {per_min:.1f} evaluations/min/core (DDIM NFE 5, 1,000 samples, FID included; median "
           f"{statistics.median(secs):.2f} s of {runs}). Weights: {weights_mb:.2f} MB.", "",
           "Acceptance: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["acceptance"].items()), ""]
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "embedded_model_cfg" + ("_quick" if a.quick else "")
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
