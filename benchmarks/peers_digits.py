"""S3's exported schedules against the best configuration of each peer on the embedded digits model.

Peers (README "Peers"): DDIM, DPM-Solver++(2M), DPM-Solver++(3M), UniPC bh2, iPNDM, each on the four
fixed discretisations and on its GITS grid; DPM-Solver-v3 (orders 2 and 3) on the four fixed ones, with
the model's EMS (computed afresh here, timed, then shared through the cache). Per peer and NFE the best configuration is picked by a
screening evaluation (1,000 samples, seed 0), then it and S3's exported schedule are scored on the
same 2,000 x 2 fresh seeds (as the search's final re-evaluation). GITS's precomputation is timed
and its model calls counted (computed afresh here, not read from the cache). S3's schedules come
from ``--run`` (default runs/digits, written by ``make search``; the script runs that search when
the run is missing) and its cost from that run's summary.

    python benchmarks/peers_digits.py [--space digits|digits_cfg] [--run runs/<space>] [--nfe 3,4,5,6]

Writes benchmarks/results/peers_<space>.{json,md}. Target (issue 15): S3 <= 0.8 x the best peer at
NFE 4 and 5; the script exits 1 when it is missed. A noise check re-scores S3, the two best peers
and the converged solve on 12 more seeds (means, paired wins, excess over the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"
PEERS = ("ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh2", "ipndm")
V3_PEERS = ("dpm_solver_v3", "dpm_solver_v3_2")
DISCS = ("time_uniform", "logsnr_uniform", "time_quadratic", "edm", "gits")
SCREEN, FINAL, FINAL_SEEDS = 1000, 2000, (20_000, 20_001)
NOISE_SEEDS = tuple(range(30_000, 30_012))  # the noise check: S3, the two best peers and converged on 12 more seeds
TARGET_RATIO, TARGET_NFES = 0.8, (4, 5)


def _space() -> Path:
    """The search space of ``--space`` (main sets it in the environment, for the pool's workers too)."""
    return SPACES / f"{os.environ.get('S3_PEERS_SPACE', 'digits')}.yaml"


def _target():
    import torch

    torch.set_num_threads(1)
    from s3_ray.config import load_config
    from s3_ray.metrics.evaluate import get_target

    cfg = load_config(_space())
    return get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())


class _Counting:
    """The model, counting its calls and the samples they evaluate."""

    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, 0

    def __call__(self, x, t):
        self.calls += 1
        self.rows += int(x.shape[0])
        return self.model(x, t)


def _gits_job(job):
    name, nfe = job
    from s3_ray.usf.gits import gits_grid

    target = _target()
    model = _Counting(target.producer.model_for(0, 256))  # (gits_grid's 256 teacher samples, classes bound)
    start = time.perf_counter()
    res = gits_grid(model, target.noise, name, nfe, shape=target.shape, dtype=target.dtype, device=target.device,
                    data_mean=target.data_mean)
    return {"name": name, "nfe": nfe, "times": [float(t) for t in res.times], "seconds": time.perf_counter() - start,
            "model_calls": model.calls, "sample_evaluations": model.rows}


def _ems_job(_):
    """The target's DPM-Solver-v3 statistics, computed afresh (the cache file removed first), timed."""
    from s3_ray.metrics.evaluate import EMS_SETTINGS
    from s3_ray.metrics.fid import cache_dir
    from s3_ray.usf.ems import ems_cache_path

    target = _target()
    path, _ = ems_cache_path(target.noise, model_hash=target.cache_key(), cache_dir=cache_dir() / "ems", **EMS_SETTINGS)
    path.unlink(missing_ok=True)
    calls, start = target.model.calls, time.perf_counter()
    target.ems()
    return {"seconds": time.perf_counter() - start, "model_calls": target.model.calls - calls,
            "sample_evaluations": (target.model.calls - calls) * EMS_SETTINGS["samples"], **EMS_SETTINGS}


def _score_job(job):
    label, schedule_json, n, seed = job
    from s3_ray.metrics.evaluate import evaluate
    from s3_ray.usf.schedule import SolverSchedule

    r = evaluate(SolverSchedule.from_json(schedule_json), _target(), n=n, seed=seed)
    return {"label": label, "seed": seed, "score": None if r["failed"] else float(r["score"])}


def _run_dir(run: Path, nfes) -> Path:
    if not all((run / "best" / f"nfe{k}.json").is_file() for k in nfes if k <= 5):
        print(f"{run}: no finished search; running `s3 search --space {_space().name} --fresh` (as make search)")
        subprocess.run([sys.executable, "-m", "s3_ray.cli", "search", "--space", str(_space()), "--fresh",
                        "--runs", str(run.parent), "--name", run.name], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", default="digits", help="a search space under search_spaces/ (digits, digits_cfg)")
    ap.add_argument("--run", default=None, help="the search's run dir (default runs/<space>)")
    ap.add_argument("--nfe", default="3,4,5,6")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    nfes = [int(k) for k in a.nfe.split(",")]
    os.environ["S3_PEERS_SPACE"] = a.space
    space = _space()
    run = _run_dir(Path(a.run or ROOT / "runs" / a.space), nfes)
    from s3_ray.config import load_config
    from s3_ray.usf.baselines import build_baseline
    from s3_ray.usf.noise import get_noise_schedule
    from s3_ray.usf.schedule import load_schedule

    cfg = load_config(space)
    noise = get_noise_schedule(cfg.model.noise_schedule)
    started = time.time()
    with ProcessPoolExecutor(2) as pool:
        ems_cost = pool.submit(_ems_job, None).result()  # before any v3 score job reads the cache
        gits = {(g["name"], g["nfe"]): g for g in pool.map(_gits_job, [(p, k) for p in PEERS for k in nfes])}
        configs = {}  # (peer, nfe, disc) -> schedule json
        for (p, k), g in gits.items():
            for d in DISCS:
                grid = g["times"] if d == "gits" else None
                configs[(p, k, d)] = build_baseline(p, noise, k, discretization=d, grid=grid).to_json()
        for p in V3_PEERS:
            for k in nfes:
                for d in DISCS[:-1]:
                    configs[(p, k, d)] = build_baseline(p, noise, k, discretization=d).to_json()
        screen = dict(zip(configs, (r["score"] for r in pool.map(
            _score_job, [(f"{p}/{d}", sj, SCREEN, 0) for (p, k, d), sj in configs.items()]))))
        finalists = {}  # (label, nfe) -> schedule json
        for p in PEERS + V3_PEERS:
            for k in nfes:
                ok = [(s, d) for (pp, kk, d), s in screen.items() if pp == p and kk == k and s is not None]
                if ok:
                    d = min(ok)[1]
                    finalists[(f"{p}/{d}", k)] = configs[(p, k, d)]
        s3 = {k: load_schedule(run / "best" / f"nfe{k}.json") for k in nfes if (run / "best" / f"nfe{k}.json").is_file()}
        for k, s in s3.items():
            finalists[("S3 (exported)", k)] = s.to_json()
        keys = [key for key in finalists for _ in FINAL_SEEDS]
        jobs = [(key[0], finalists[key], FINAL, seed) for key in finalists for seed in FINAL_SEEDS]
        scores = list(pool.map(_score_job, jobs))
        noise_check = _noise_check(pool, finalists, keys, scores, noise)
    final = {}
    for key, r in zip(keys, scores):
        final.setdefault(key, []).append(r["score"])
    rows = []
    for k in nfes:
        for (lab, kk), v in final.items():
            if kk == k:
                ok = None not in v
                rows.append({"nfe": k, "config": lab, "peer": lab.split("/")[0],
                             "fid": sum(v) / len(v) if ok else None, "fid_seeds": v})
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    verdict = []
    for k in nfes:
        peers = [r for r in rows if r["nfe"] == k and r["peer"] != "S3 (exported)" and r["fid"] is not None]
        mine = [r for r in rows if r["nfe"] == k and r["peer"] == "S3 (exported)"]
        if peers and mine and mine[0]["fid"] is not None:
            best = min(peers, key=lambda r: r["fid"])
            verdict.append({"nfe": k, "best_peer": best["config"], "best_peer_fid": best["fid"],
                            "s3_fid": mine[0]["fid"], "ratio": mine[0]["fid"] / best["fid"],
                            "met": k not in TARGET_NFES or mine[0]["fid"] <= TARGET_RATIO * best["fid"]})
    result = {"space": str(space.relative_to(ROOT)), "reference": cfg.metric.reference,
              "run": str(run), "screen_samples": SCREEN,
              "final_samples": FINAL, "final_seeds": list(FINAL_SEEDS), "rows": rows, "verdict": verdict,
              "noise_check": noise_check, "noise_seeds": list(NOISE_SEEDS),
              "gits_costs": list(gits.values()), "ems_cost": ems_cost,
              "s3_cost": {"trials": summary.get("trials"), "search_seconds": summary.get("search_seconds")},
              "seconds": time.time() - started}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peers_{a.space}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / f"peers_{a.space}.md").write_text(md)
    print(md)
    return 0 if all(v["met"] for v in verdict) else 1


def _noise_check(pool, finalists: dict, keys: list, scores: list, noise) -> list[dict]:
    """Per NFE: S3 and the two best peers of the 2-seed table, and the converged reference solve (the
    metric's floor), each on ``NOISE_SEEDS``: means, per-seed S3 wins (paired: the same noise), the
    ratio to the best peer and the excess-over-floor ratio (S3 - floor) / (peer - floor)."""
    import numpy as np

    from s3_ray.metrics.evaluate import REFERENCE_SOLVER
    from s3_ray.usf.baselines import build_baseline

    two_seed: dict = {}
    for key, r in zip(keys, scores):
        two_seed.setdefault(key, []).append(r["score"])
    picks = {}
    for (lab, k) in finalists:
        if lab != "S3 (exported)" or None in two_seed[(lab, k)]:
            continue
        peers = sorted((sum(v) / len(v), name) for (name, kk), v in two_seed.items()
                       if kk == k and name != lab and None not in v)
        picks[k] = [lab] + [name for _, name in peers[:2]]
    conv = build_baseline(REFERENCE_SOLVER[0], noise, REFERENCE_SOLVER[1]).to_json()
    jobs = [((lab, k), finalists[(lab, k)]) for k in sorted(picks) for lab in picks[k]] + [(("converged", 0), conv)]
    got = list(pool.map(_score_job, [(key[0], sj, FINAL, seed) for key, sj in jobs for seed in NOISE_SEEDS]))
    per = {key: [g["score"] for g in got[i * len(NOISE_SEEDS):(i + 1) * len(NOISE_SEEDS)]] for i, (key, _) in enumerate(jobs)}
    floor = float(np.mean(per[("converged", 0)]))
    out = []
    for k in sorted(picks):
        s3 = np.array(per[(picks[k][0], k)], dtype=float)
        for peer in picks[k][1:]:
            v = np.array(per[(peer, k)], dtype=float)
            out.append({"nfe": k, "peer": peer, "s3_mean": float(s3.mean()), "s3_sd": float(s3.std(ddof=1)),
                        "peer_mean": float(v.mean()), "peer_sd": float(v.std(ddof=1)), "floor": floor,
                        "floor_sd": float(np.std(per[("converged", 0)], ddof=1)),
                        "s3_wins": int((s3 < v).sum()), "seeds": len(s3), "ratio": float(s3.mean() / v.mean()),
                        "excess_ratio": float((s3.mean() - floor) / (v.mean() - floor))})
    return out


def markdown(r: dict) -> str:
    lines = [f"# S3 vs the best configuration of each peer ({r['space']}, FID vs {r.get('reference', 'data')})", "",
             f"Each peer's discretisation picked on {r['screen_samples']} samples (seed 0); then every row on "
             f"{r['final_samples']} samples x seeds {r['final_seeds']} (the same noise for all). "
             f"Run: `{r['run']}`; {r['seconds']:.0f} s.", "",
             "| NFE | peer (best discretisation) | FID |", "|---|---|---|"]
    for row in sorted(r["rows"], key=lambda x: (x["nfe"], x["fid"] if x["fid"] is not None else 1e9)):
        fid = "failed" if row["fid"] is None else f"{row['fid']:.3f}"
        lines.append(f"| {row['nfe']} | {row['config']} | {fid} |")
    lines += ["", f"| NFE | best peer | its FID | S3 | S3 / best peer | target <= {TARGET_RATIO} at NFE "
                  f"{'/'.join(map(str, TARGET_NFES))} |", "|---|---|---|---|---|---|"]
    for v in r["verdict"]:
        met = "-" if v["nfe"] not in TARGET_NFES else ("met" if v["met"] else "missed")
        lines.append(f"| {v['nfe']} | {v['best_peer']} | {v['best_peer_fid']:.3f} | {v['s3_fid']:.3f} | "
                     f"{v['ratio']:.2f} | {met} |")
    if r.get("noise_check"):
        n = len(r["noise_seeds"])
        lines += ["", f"Noise check: the 2-seed table's FID has a seed spread as large as the gaps it ranks, so S3 and "
                  f"the two best peers per NFE, and the converged reference solve (the floor), again on {n} more seeds "
                  f"x {r['final_samples']} samples (the same noise for all; mean ± sd over seeds):", "",
                  "| NFE | peer | peer FID | S3 FID | S3 lower on | S3 / peer | floor | (S3 - floor) / (peer - floor) |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in r["noise_check"]:
            lines.append(f"| {v['nfe']} | {v['peer']} | {v['peer_mean']:.4f} ± {v['peer_sd']:.4f} | {v['s3_mean']:.4f} ± "
                         f"{v['s3_sd']:.4f} | {v['s3_wins']} of {v['seeds']} seeds | {v['ratio']:.2f} | "
                         f"{v['floor']:.4f} ± {v['floor_sd']:.4f} | {v['excess_ratio']:.2f} |")
    c = r["s3_cost"]
    lines += ["", "Precomputation: GITS (256 teacher samples, 61 candidates, computed afresh per peer and NFE): "
              + ", ".join(f"{g['name']}@{g['nfe']} {g['seconds']:.0f} s / {g['model_calls']} calls "
                          f"({g['sample_evaluations']} sample evaluations)" for g in r["gits_costs"]),
              f"DPM-Solver-v3: EMS on {r['ems_cost']['n_grid'] + 1} logSNR nodes from {r['ems_cost']['samples']} "
              f"trajectories, {r['ems_cost']['probes']} Hutchinson probe: {r['ems_cost']['seconds']:.0f} s / "
              f"{r['ems_cost']['model_calls']} calls ({r['ems_cost']['sample_evaluations']} sample evaluations; a JVP "
              "counted as one call).",
              f"S3: the search itself, {c['trials']} trials in {c['search_seconds'] or 0:.0f} s (its summary); "
              "fixed discretisations and iPNDM cost nothing beforehand."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
