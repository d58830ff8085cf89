"""Search efficiency: S3 vs evolution vs random vs Optuna TPE on the embedded digits model.

Each (algorithm, seed) runs the searcher's suggest/complete loop in-process (no Ray: the same
searcher class Tune drives) at one NFE up to the largest budget; the best schedule found within each
budget is then re-evaluated on fresh seeds with more samples. Also measures the best tuned baseline
(every builder x discretisation, same fresh-seed protocol). Writes
benchmarks/results/search_efficiency.{json,md,png}.

    python benchmarks/search_efficiency.py [--nfe 5] [--budgets 100,200,400] [--seeds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ALGOS = ("s3", "evolution", "random", "optuna-tpe")


def _config(nfe: int, budget: int, seed: int, samples: int):
    from s3_ray.config import parse_config

    return parse_config({
        "name": f"eff-{nfe}", "nfe": [nfe], "budget": budget, "stages": 4, "random_init": 10, "seed": seed,
        "metric": {"kind": "fid", "samples": [samples]},
        "baselines": ["ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh2", "dpm_solver_3s"],
        "discretizations": ["logsnr_uniform", "time_uniform", "time_quadratic", "edm"],
    })


def run_one(args) -> dict:
    """One search run; returns the best (score, schedule) after each evaluation."""
    algo, seed, nfe, budget, samples = args
    import torch

    torch.set_num_threads(1)
    from ray.tune.search import Searcher

    from s3_ray.metrics.evaluate import evaluate, get_target
    from s3_ray.search.searcher import S3Searcher, predictor_quality
    from s3_ray.usf.schedule import SolverSchedule

    cfg = _config(nfe, budget, seed, samples)
    searcher = S3Searcher(cfg, algo=algo)
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    best, trace, start = (float("inf"), None), [], time.time()
    while True:
        tid = f"t{searcher.n_suggested}"
        c = searcher.suggest(tid)
        if c == Searcher.FINISHED or c is None:
            break
        s = SolverSchedule.from_json(c["schedule"])
        r = evaluate(s, target, n=c["samples"], seed=c["seed"])
        searcher.on_trial_complete(tid, r)
        if r["score"] < best[0]:
            best = (r["score"], c["schedule"])
        trace.append(best)
    return {"algo": algo, "seed": seed, "trace": trace, "seconds": time.time() - start,
            "taus": predictor_quality(searcher.get_state())}


def fresh_score(args) -> float:
    schedule_json, samples, seeds = args
    import torch

    torch.set_num_threads(1)
    from s3_ray.config import MetricConfig, ModelConfig
    from s3_ray.metrics.evaluate import evaluate, get_target
    from s3_ray.usf.schedule import SolverSchedule

    target = get_target(ModelConfig().model_dump_json(), MetricConfig().model_dump_json())
    s = SolverSchedule.from_json(schedule_json)
    return float(np.mean([evaluate(s, target, n=samples, seed=sd)["score"] for sd in seeds]))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--budgets", default="100,200,400")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--final-samples", type=int, default=2000)
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    budgets = [int(b) for b in a.budgets.split(",")]
    algos = a.algos.split(",")
    fresh_seeds = [50_000 + i for i in range(2)]
    start = time.time()
    jobs = [(algo, seed, a.nfe, max(budgets), a.samples) for algo in algos for seed in range(a.seeds)]
    with ProcessPoolExecutor(a.workers) as pool:
        runs = list(pool.map(run_one, jobs))
        # best found within each budget, re-scored on fresh seeds
        fresh_jobs = [(r["trace"][min(b, len(r["trace"])) - 1][1], a.final_samples, fresh_seeds) for r in runs for b in budgets]
        fresh = list(pool.map(fresh_score, fresh_jobs))
        from s3_ray.usf.baselines import BASELINES, DISCRETIZATIONS, build_baseline
        from s3_ray.usf.noise import VPLinear

        base = [(n, d, build_baseline(n, VPLinear(), a.nfe, discretization=d).to_json())
                for n in BASELINES for d in DISCRETIZATIONS]
        base_scores = list(pool.map(fresh_score, [(sj, a.final_samples, fresh_seeds) for *_, sj in base]))
    k = 0
    rows = []
    for r in runs:
        for b in budgets:
            rows.append({"algo": r["algo"], "seed": r["seed"], "budget": b, "search_best": r["trace"][min(b, len(r["trace"])) - 1][0],
                         "fresh": fresh[k], "seconds": r["seconds"]})
            k += 1
    ib = int(np.argmin(base_scores))
    best_baseline = {"name": f"{base[ib][0]}/{base[ib][1]}", "fresh": base_scores[ib]}
    summary = {}
    for algo in algos:
        for b in budgets:
            v = [x["fresh"] for x in rows if x["algo"] == algo and x["budget"] == b]
            summary[f"{algo}/{b}"] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v}
    checks = {}
    if "s3" in algos and "evolution" in algos and 200 in budgets and 400 in budgets:
        checks["s3@200 <= evolution@400"] = summary["s3/200"]["mean"] <= summary["evolution/400"]["mean"]
    if "s3" in algos:
        s3_best = summary[f"s3/{max(budgets)}"]["mean"]
        checks["s3 <= 1/2 best baseline"] = s3_best <= 0.5 * best_baseline["fresh"]
        checks["ratio s3 / best baseline"] = s3_best / best_baseline["fresh"]
    out = {"benchmark": "search_efficiency", "nfe": a.nfe, "budgets": budgets, "seeds": a.seeds, "samples": a.samples,
           "final_samples": a.final_samples, "fresh_seeds": fresh_seeds, "best_baseline": best_baseline,
           "summary": summary, "checks": checks, "rows": rows, "taus": {f"{r['algo']}/{r['seed']}": r["taus"] for r in runs},
           "seconds": time.time() - start}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"search_efficiency{a.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [f"# Search efficiency at NFE {a.nfe} (embedded digits model)", "",
          f"Best schedule found within each budget, re-scored with {a.final_samples} samples on fresh seeds "
          f"{fresh_seeds} (mean ± std over {a.seeds} search seeds; search used {a.samples} samples). "
          f"Best tuned baseline: {best_baseline['name']} FID {best_baseline['fresh']:.4f}.", "",
          "| algorithm | " + " | ".join(f"{b} evals" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for algo in algos:
        md.append(f"| {algo} | " + " | ".join(f"{summary[f'{algo}/{b}']['mean']:.4f} ± {summary[f'{algo}/{b}']['std']:.4f}"
                                            for b in budgets) + " |")
    md += ["", "Checks: " + ", ".join(f"{k}: {v if isinstance(v, bool) else round(v, 3)}" for k, v in checks.items()),
           f"Wall time {out['seconds']:.0f} s."]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    _plot(out, algos, budgets, RESULTS / f"{stem}.png")
    print("\n".join(md))
    missed = [k for k, v in checks.items() if v is False]
    if missed:  # make bench fails
        print(f"search_efficiency.py: target(s) missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


def _plot(out, algos, budgets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for algo in algos:
        m = [out["summary"][f"{algo}/{b}"]["mean"] for b in budgets]
        s = [out["summary"][f"{algo}/{b}"]["std"] for b in budgets]
        ax.errorbar(budgets, m, yerr=s, marker="o", capsize=3, label=algo)
    ax.axhline(out["best_baseline"]["fresh"], color="gray", ls="--", label="best tuned baseline")
    ax.set_xlabel("true evaluations")
    ax.set_ylabel(f"fresh-seed FID at NFE {out['nfe']}")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
