"""How well each evaluation fidelity ranks schedules, and why the predictor's tau is low (issue 14).

For each embedded target (``search_spaces/digits.yaml``, ``digits_cfg.yaml``) and NFE, a set of
schedules like those a search evaluates: every seed baseline (builder x discretisation) plus
evolutionary mutants bred from them (the search's own operators, parents scored at the search
fidelity). Each schedule is scored at:

- ``fid_search``: FID at the search's sample count and noise seed (what every trial measures);
- ``fid_search_b``: the same at another noise seed (an independent draw of the same fidelity);
- ``truth``: mean FID over 2,000 samples x 2 fresh seeds (what the final table reports);
- ``fid_250``: FID at 250 samples on the screening noise seed (``screen.fidelity: metric``, which
  draws from ``seed + SCREEN_SEED_OFFSET`` so that survivors' luck does not carry into their full score);
- ``rmse_64`` / ``rmse_256``: RMSE of the few-step samples against the converged 100-NFE solve from
  the same noise (common random numbers), on 64 / 256 samples.

Reported per target and NFE: Kendall tau of each fidelity against ``truth`` (all schedules, and the
best half by truth, where the search's decisions are made), tau between the two search-fidelity
draws (the ceiling any predictor trained on search scores can reach), the search fidelity's noise
(std of a score's seed-to-seed difference / sqrt 2) against the spread of truth among the best
quarter, and each fidelity's median time relative to one search evaluation.

Writes ``benchmarks/results/fidelity.{json,md}``. ``--quick``: one target, NFE 5, few schedules.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("digits", "digits_cfg")
TRUTH_SEEDS = (20_001, 20_002)  # fresh: neither a search seed nor a reference seed
TRUTH_SAMPLES = 2000


def _tau(a, b) -> float:
    from s3_ray.search.predictor import kendall_tau

    return float(kendall_tau(np.asarray(a, float), np.asarray(b, float)))


def measure(target_name: str, nfes: list[int], mutants: int, truth_samples: int) -> dict:
    """Every fidelity of every schedule of one target, and the rank statistics per NFE."""
    import torch

    torch.set_num_threads(1)
    from s3_ray.config import MetricConfig, load_config
    from s3_ray.metrics.evaluate import Target, evaluate
    from s3_ray.search.searcher import SCREEN_SEED_OFFSET
    from s3_ray.search.seed_baselines import baseline_schedules
    from s3_ray.search.space import propose

    cfg = load_config(ROOT / "search_spaces" / f"{target_name}.yaml")
    cfg = cfg.model_copy(update={"nfe": tuple(nfes)})
    target = Target(cfg.model, cfg.metric)
    target.reference_images()
    rmse = MetricConfig(kind="rmse")
    n_search, seed = cfg.metric.samples[0], cfg.seed
    rng = np.random.default_rng(12345)
    per_nfe = {}
    for nfe in nfes:
        rows = []
        baselines = [(name, s) for k, name, s in baseline_schedules(cfg, target.noise, {}) if k == nfe]

        def score_all(name, s):
            r = {"name": name, "schedule_hash": s.schedule_hash(), "seconds": {}}
            for key, metric, n, sd in (("fid_search", None, n_search, seed), ("fid_search_b", None, n_search, seed + 1),
                                       ("fid_250", None, 250, seed + SCREEN_SEED_OFFSET), ("rmse_64", rmse, 64, seed), ("rmse_256", rmse, 256, seed)):
                if metric is not None:
                    target.reference_solution(n, sd)  # the converged solve is cached per process, not timed
                e = evaluate(s, target, metric, n=n, seed=sd)
                r[key], r["seconds"][key] = e["score"], e["seconds"]
            truth = [evaluate(s, target, n=truth_samples, seed=sd) for sd in TRUTH_SEEDS]
            r["truth"] = statistics.mean(e["score"] for e in truth)
            r["failed"] = any(e["failed"] for e in truth)
            return r

        for name, s in baselines:
            rows.append(score_all(name, s))
        pool = {nfe: [(s, r["fid_search"]) for (_, s), r in zip(baselines, rows)]}
        seen = {r["schedule_hash"] for r in rows}
        while len(rows) < len(baselines) + mutants:
            s = propose(rng, pool, nfe, target.noise, cfg.decisions, cfg.operators, {nfe})
            if s.schedule_hash() in seen:
                continue
            seen.add(s.schedule_hash())
            rows.append(score_all("mutant", s))
        per_nfe[nfe] = {"rows": rows, **_stats(rows)}
        print(f"{target_name} NFE {nfe}: {json.dumps({k: v for k, v in per_nfe[nfe].items() if k != 'rows'})}",
              flush=True)
    return {"target": target_name, "search_samples": n_search, "search_seed": seed, "per_nfe": per_nfe}


FIDELITIES = ("fid_search", "fid_250", "rmse_64", "rmse_256")


def _stats(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r["failed"]]
    truth = np.array([r["truth"] for r in ok])
    best = [r for r in ok if r["truth"] <= np.median(truth)]
    quarter = np.sort(truth)[: max(2, len(truth) // 4)]
    diffs = np.array([r["fid_search"] - r["fid_search_b"] for r in ok])
    cut = np.sort(truth)[max(2, len(truth) // 4) - 1]
    diffs_best = np.array([r["fid_search"] - r["fid_search_b"] for r in ok if r["truth"] <= cut])
    search_time = statistics.median(r["seconds"]["fid_search"] for r in ok)
    return {
        "n_schedules": len(rows), "n_failed": len(rows) - len(ok),
        "tau_vs_truth": {f: _tau([r[f] for r in ok], truth) for f in FIDELITIES},
        "tau_vs_truth_best_half": {f: _tau([r[f] for r in best], [r["truth"] for r in best]) for f in FIDELITIES},
        "tau_search_draws": _tau([r["fid_search"] for r in ok], [r["fid_search_b"] for r in ok]),
        "tau_search_draws_best_half": _tau([r["fid_search"] for r in best], [r["fid_search_b"] for r in best]),
        "search_noise_sd": float(diffs.std(ddof=1) / np.sqrt(2)),
        "search_noise_sd_best_quarter": float(diffs_best.std(ddof=1) / np.sqrt(2)),  # the noise grows with FID
        "truth_best_quarter_sd": float(quarter.std(ddof=1)),
        "truth_best_quarter_range": [float(quarter.min()), float(quarter.max())],
        "relative_cost": {f: statistics.median(r["seconds"][f] for r in ok) / search_time for f in FIDELITIES},
        "search_eval_seconds": search_time,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS))
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5])
    p.add_argument("--mutants", type=int, default=16, help="mutants per NFE besides the seed baselines")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--from-json", type=Path, help="recompute the statistics and tables from an earlier run's JSON")
    a = p.parse_args(argv)
    if a.from_json:
        out = json.loads(a.from_json.read_text())
        for t in out["targets"]:
            t["per_nfe"] = {nfe: {"rows": v["rows"], **_stats(v["rows"])} for nfe, v in t["per_nfe"].items()}
        a.from_json.write_text(json.dumps(out, indent=1))
        a.from_json.with_suffix(".md").write_text(_markdown(out))
        print(_markdown(out))
        return 0
    targets, nfes, mutants, truth_n = (a.targets, a.nfe, a.mutants, TRUTH_SAMPLES)
    if a.quick:
        targets, nfes, mutants, truth_n = targets[:1], [5], 2, 500
    started = time.time()
    with ProcessPoolExecutor(max_workers=min(2, len(targets))) as pool:  # one target per core
        results = list(pool.map(measure, targets, [nfes] * len(targets), [mutants] * len(targets),
                                [truth_n] * len(targets)))
    out = {"benchmark": "fidelity", "machine": platform.node(), "cpus": os.cpu_count(), "truth_samples": truth_n,
           "truth_seeds": TRUTH_SEEDS, "wall_seconds": time.time() - started, "targets": results}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "fidelity_quick" if a.quick else "fidelity"
    (a.out / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (a.out / f"{stem}.md").write_text(_markdown(out))
    print(_markdown(out))
    return 0


def _markdown(out: dict) -> str:
    lines = ["# Evaluation fidelities: how well each ranks schedules (`benchmarks/fidelity.py`)", "",
             f"Truth: mean FID over {out['truth_samples']} samples x seeds {list(out['truth_seeds'])}. "
             "Schedules: every seed baseline plus mutants bred from them. Kendall tau against truth over all "
             "schedules / the best half by truth; `draws`: tau between two seeds of the search fidelity; "
             "noise: seed-to-seed sd of one search score, over all schedules / the best quarter by truth (it "
             "grows with the FID); spread: sd of truth over the best quarter. "
             "Cost: median seconds relative to one search evaluation.", "",
             "| target | NFE | schedules | tau fid_search | tau fid_250 | tau rmse_64 | tau rmse_256 | tau draws | "
             "noise sd | best-quarter sd | cost fid_250 | cost rmse_64 | cost rmse_256 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in out["targets"]:
        for nfe, s in t["per_nfe"].items():
            a, b = s["tau_vs_truth"], s["tau_vs_truth_best_half"]
            lines.append(
                f"| {t['target']} (search: FID@{t['search_samples']}) | {nfe} | {s['n_schedules']} ({s['n_failed']} failed) | "
                f"{a['fid_search']:.2f} / {b['fid_search']:.2f} | {a['fid_250']:.2f} / {b['fid_250']:.2f} | "
                f"{a['rmse_64']:.2f} / {b['rmse_64']:.2f} | "
                f"{a['rmse_256']:.2f} / {b['rmse_256']:.2f} | {s['tau_search_draws']:.2f} / "
                f"{s['tau_search_draws_best_half']:.2f} | {s['search_noise_sd']:.4f} / {s['search_noise_sd_best_quarter']:.4f} | "
                f"{s['truth_best_quarter_sd']:.4f} | "
                f"{s['relative_cost']['fid_250']:.3f} | {s['relative_cost']['rmse_64']:.3f} | "
                f"{s['relative_cost']['rmse_256']:.3f} |")
    lines += ["", f"Wall time {out['wall_seconds']:.0f} s on {out['cpus']} CPUs (one target per process, one thread)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
