"""Acceptance numbers of the embedded digits model and its FID/KID metric (issue 3).

Measured, one process, one thread (``torch.set_num_threads(1)``):

1. converged quality: data-FID of a high-accuracy reference solve (``REFERENCE_SOLVER``) on 2,000
   samples, and at the floor's sample size (397 samples, several seeds: FID is biased by sample
   size, so only the equal-N comparison is a fair one) vs the noise floor of the same metric
   (the 397 held-out images against the training set). Requirement: converged <= floor at equal N.
2. no memorisation: L2 distance from each of 397 model samples to its nearest training image vs
   the same for the 397 held-out images (quantiles, two-sample KS test). Requirement: the model's
   samples (quantised to the data's 17 grey levels) are not closer to the training set than fresh
   data: one-sided KS p >= 0.01, and the share of samples below the held-out 5% quantile is not
   significantly above 5% (binomial p >= 0.01).
3. speed: ``evaluate()`` of DPM-Solver++(2M) logSNR at NFE 5 with 1,000 samples, FID included,
   median over >= 10 timed runs after one warm-up. Requirement: >= 40 evaluations / minute.
4. few-step gap: data-FID of that schedule / converged data-FID (same samples count and seed).
   Requirement: >= 5x.
5. shipped weights (``s3_ray/assets/*.safetensors``) <= 5 MB.
6. reference-set decision: with the ``data`` reference, solver error must not be able to hide model
   error. At NFE 10 and 20, every baseline x discretisation (2 seeds) must not score a data-FID
   below the converged FID (same seeds, same sample count: common random numbers) by more than the
   converged FID's seed-to-seed spread (sample std over >= 5 seeds).

Writes ``benchmarks/results/embedded_model.{json,md}``. ``--quick`` runs a reduced version (smoke).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ASSETS = Path(__file__).resolve().parents[1] / "s3_ray" / "assets"


def _stats(v) -> dict:
    v = [float(a) for a in v]
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v), "values": v}


def _quantiles(d: np.ndarray) -> dict:
    q = np.quantile(d, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95])
    return {"min": float(d.min()), "q01": float(q[0]), "q05": float(q[1]), "q25": float(q[2]),
            "median": float(q[3]), "q75": float(q[4]), "q95": float(q[5]), "mean": float(d.mean())}


def _quantize_like_data(x: torch.Tensor) -> torch.Tensor:
    """Model-space images onto the digits' 17 grey levels (pixel values 0..16 -> [-1, 1])."""
    return ((x.clamp(-1, 1) + 1) * 8).round() / 8 - 1


def nn_distances(x: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """L2 distance (model space, [-1, 1]) from each image in ``x`` to its nearest training image."""
    a, b = x.reshape(len(x), -1).double(), train.reshape(len(train), -1).double()
    return torch.cdist(a, b).min(dim=1).values.numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-samples", type=int, default=2000, help="samples of the converged / few-step FIDs")
    p.add_argument("--floor-seeds", type=int, default=20, help="seeds of the converged FID at 397 samples")
    p.add_argument("--small-n", type=int, default=200, help="sample size of the subset comparison with the floor")
    p.add_argument("--small-reps", type=int, default=20, help="held-out subsets / model seeds at --small-n")
    p.add_argument("--speed-evals", type=int, default=10, help="timed evaluations (after one warm-up)")
    p.add_argument("--check-samples", type=int, default=2000, help="samples of the reference-set check")
    p.add_argument("--check-seeds", type=int, default=2, help="seeds per baseline in the reference-set check")
    p.add_argument("--converged-seeds", type=int, default=5, help="seeds of the converged FID in the check")
    p.add_argument("--check-nfe", default="10,20")
    p.add_argument("--quick", action="store_true", help="smoke run: small sample counts, few baselines")
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.quick:
        a.small_reps, a.ref_samples, a.floor_seeds, a.speed_evals, a.check_samples, a.converged_seeds = 3, 500, 2, 2, 400, 3

    torch.set_num_threads(1)
    from scipy.stats import binomtest, ks_2samp

    from s3_ray.config import MetricConfig, ModelConfig
    from s3_ray.metrics.evaluate import REFERENCE_SOLVER, evaluate, get_target
    from s3_ray.metrics.fid import digits_reference, fid_kid, uint8_images
    from s3_ray.models.digits import N_HELDOUT, load_digits_data
    from s3_ray.usf.baselines import BASELINES, DISCRETIZATIONS, build_baseline

    t_all = time.perf_counter()
    load_before = os.getloadavg()
    target = get_target(ModelConfig().model_dump_json(), MetricConfig().model_dump_json())
    ref_schedule = build_baseline(REFERENCE_SOLVER[0], target.noise, REFERENCE_SOLVER[1])
    few = build_baseline("dpm_solver_pp_2m", target.noise, 5, discretization="logsnr_uniform")
    solver = f"{REFERENCE_SOLVER[0]}@{REFERENCE_SOLVER[1]} (logsnr_uniform)"
    converged_x: dict = {}  # (n, seed) -> samples of the reference solve

    def converged(n: int, seed: int) -> torch.Tensor:
        if (n, seed) not in converged_x:
            converged_x[(n, seed)] = target.sample(ref_schedule, n, seed)
        return converged_x[(n, seed)]

    def data_fid(x: torch.Tensor) -> float:
        return fid_kid(uint8_images(x))["fid"]

    def log(msg):
        print(f"[{time.perf_counter() - t_all:7.1f} s] {msg}", flush=True)

    # 1. converged quality vs the held-out floor --------------------------------------------------
    n_ref = a.ref_samples
    conv_ref = fid_kid(uint8_images(converged(n_ref, 0)))
    floor = fid_kid(digits_reference("heldout"))
    conv_397 = [data_fid(converged(N_HELDOUT, s)) for s in range(a.floor_seeds)]
    s397 = _stats(conv_397)
    s397["frac_seeds_le_floor"] = float(np.mean([v <= floor["fid"] for v in conv_397]))
    # The floor is one draw of a noisy statistic; at a smaller N, random subsets of the held-out set
    # estimate E[FID_N(held-out)] much better (subsets overlap, so their std is an underestimate).
    held_u8 = digits_reference("heldout")
    rng = np.random.default_rng(0)
    floor_small = [fid_kid(held_u8[torch.from_numpy(rng.choice(len(held_u8), a.small_n, replace=False))])["fid"]
                   for _ in range(a.small_reps)]
    conv_small = [data_fid(target.sample(ref_schedule, a.small_n, s)) for s in range(a.small_reps)]
    small = {"samples": a.small_n, "heldout_subsets": _stats(floor_small), "converged_seeds": _stats(conv_small)}
    small["converged_le_floor"] = small["converged_seeds"]["mean"] <= small["heldout_subsets"]["mean"]
    log(f"converged FID {n_ref}: {conv_ref['fid']:.4f}; at {N_HELDOUT}: {s397['mean']:.4f} ± {s397['std']:.4f}; "
        f"floor {floor['fid']:.4f}; at {a.small_n}: converged {small['converged_seeds']['mean']:.4f} ± "
        f"{small['converged_seeds']['std']:.4f} vs held-out subsets {small['heldout_subsets']['mean']:.4f} ± "
        f"{small['heldout_subsets']['std']:.4f}")

    # 2. memorisation: nearest-training-image distances ---------------------------------------------
    (train_x, _), (held_x, _), _ = load_digits_data()
    train_t, held_t = torch.from_numpy(train_x), torch.from_numpy(held_x)
    model_x = converged(N_HELDOUT, 0)
    d_held = nn_distances(held_t, train_t)
    d_model_q = nn_distances(_quantize_like_data(model_x), train_t)
    d_model_c = nn_distances(model_x.clamp(-1, 1), train_t)
    ks_q = ks_2samp(d_model_q, d_held)
    ks_q_less = ks_2samp(d_model_q, d_held, alternative="greater")  # H1: model distances stochastically smaller
    ks_c = ks_2samp(d_model_c, d_held)
    ks_c_less = ks_2samp(d_model_c, d_held, alternative="greater")
    q_held, q_model_q, q_model_c = _quantiles(d_held), _quantiles(d_model_q), _quantiles(d_model_c)
    thr = q_held["q05"]
    memo = {
        "samples": N_HELDOUT, "seed": 0, "space": "L2 in model space [-1, 1], 64 pixels",
        "heldout": q_held, "model_quantized": q_model_q, "model_continuous": q_model_c,
        "ks_two_sided_p_quantized": float(ks_q.pvalue), "ks_statistic_quantized": float(ks_q.statistic),
        "ks_one_sided_p_quantized": float(ks_q_less.pvalue),
        "ks_two_sided_p_continuous": float(ks_c.pvalue), "ks_statistic_continuous": float(ks_c.statistic),
        "ks_one_sided_p_continuous": float(ks_c_less.pvalue),
        "heldout_q05": thr,
        "frac_model_below_heldout_q05": float((d_model_q < thr).mean()),
        "lower_tail_binomial_p": float(binomtest(int((d_model_q < thr).sum()), len(d_model_q), 0.05,
                                                 alternative="greater").pvalue),
        "exact_copies_quantized": int((d_model_q < 1e-9).sum()),
        "exact_copies_heldout": int((d_held < 1e-9).sum()),
    }
    memo_pass = memo["ks_one_sided_p_quantized"] >= 0.01 and memo["lower_tail_binomial_p"] >= 0.01
    log(f"NN distance median: held-out {q_held['median']:.3f}, model (quantised) {q_model_q['median']:.3f}, "
        f"(continuous) {q_model_c['median']:.3f}; KS p {ks_q.pvalue:.3g} (one-sided {ks_q_less.pvalue:.3g})")

    # 4. few-step gap -------------------------------------------------------------------------------
    few_ref = data_fid(target.sample(few, n_ref, 0))
    few_1k = data_fid(target.sample(few, 1000, 0))
    conv_1k = data_fid(converged(1000, 0))
    gap = few_ref / conv_ref["fid"]
    log(f"few-step gap: NFE 5 FID {few_ref:.4f} / converged {conv_ref['fid']:.4f} = {gap:.2f}x "
        f"(1k: {few_1k:.4f} / {conv_1k:.4f} = {few_1k / conv_1k:.2f}x)")

    # 3. speed --------------------------------------------------------------------------------------
    evaluate(few, target, n=1000, seed=0)  # warm-up
    secs = []
    for i in range(a.speed_evals):
        t0 = time.perf_counter()
        evaluate(few, target, n=1000, seed=i)
        secs.append(time.perf_counter() - t0)
    med = statistics.median(secs)
    per_min = 60.0 / med
    log(f"speed: median {med:.3f} s / evaluation = {per_min:.1f} / min")

    # 5. weights --------------------------------------------------------------------------------------
    weights = {f.name: f.stat().st_size for f in sorted(ASSETS.glob("*.safetensors"))}
    total_mb = sum(weights.values()) / 1e6

    # 6. reference-set decision -----------------------------------------------------------------------
    nfes = [int(v) for v in a.check_nfe.split(",")]
    nc = a.check_samples
    conv_seeds = list(range(max(a.converged_seeds, a.check_seeds)))
    conv_c = {s: data_fid(converged(nc, s)) for s in conv_seeds}
    for k in [k for k in converged_x if k[0] == nc]:
        if k[1] != 0:
            converged_x.pop(k)  # free memory
    cstats = _stats(list(conv_c.values()))
    check_seeds = list(range(a.check_seeds))
    conv_paired = float(np.mean([conv_c[s] for s in check_seeds]))
    spread = cstats["std"]
    names = list(BASELINES)
    if a.quick:
        names = ["ddim", "dpm_solver_pp_2m", "unipc_bh2"]
    rows = []
    for nfe in nfes:
        for name in names:
            for disc in DISCRETIZATIONS:
                s = build_baseline(name, target.noise, nfe, discretization=disc)
                fids = []
                for seed in check_seeds:
                    x = target.sample(s, nc, seed)
                    fids.append(data_fid(x) if bool(torch.isfinite(x).all()) else float("nan"))
                f = float(np.mean(fids))
                rows.append({"nfe": nfe, "name": name, "discretization": disc, "fid_data": f,
                             "fid_data_seeds": fids, "below_converged": conv_paired - f,
                             "below_converged_by_seed": [conv_c[sd] - v for sd, v in zip(check_seeds, fids)],
                             "violates": bool(np.isfinite(f) and conv_paired - f > spread)})
        log(f"reference-set check NFE {nfe}: done")
    violations = [r for r in rows if r["violates"]]
    finite = [r for r in rows if np.isfinite(r["fid_data"])]
    per_nfe = {}
    for nfe in nfes:
        rr = sorted([r for r in finite if r["nfe"] == nfe], key=lambda r: r["fid_data"])
        per_nfe[str(nfe)] = {"best": f"{rr[0]['name']}/{rr[0]['discretization']}", "best_fid": rr[0]["fid_data"],
                             "largest_margin_below_converged": rr[0]["below_converged"],
                             "largest_relative_drop": rr[0]["below_converged"] / conv_paired,
                             "n_below_converged_every_seed": sum(all(d > 0 for d in r["below_converged_by_seed"])
                                                                 for r in rr),
                             "n_below_converged_mean": sum(r["below_converged"] > 0 for r in rr),
                             "n_violations": sum(r["violates"] for r in rr), "n": len(rr)}
    ref_check = {
        "samples": nc, "baseline_seeds": check_seeds, "nfe": nfes, "n_baselines": len(names),
        "discretizations": list(DISCRETIZATIONS), "converged_solver": solver,
        "converged_fid_by_seed": {str(k): v for k, v in conv_c.items()},
        "converged_fid_mean": cstats["mean"], "converged_fid_spread_std": spread,
        "converged_fid_paired_mean": conv_paired,
        "rule": "violation if mean_{seeds} FID(converged) - mean_{seeds} FID(baseline) > std over seeds of "
                "FID(converged) (same seeds and sample count: common random numbers)",
        "per_nfe": per_nfe, "violations": [f"{r['nfe']}/{r['name']}/{r['discretization']}" for r in violations],
        "verdict": "data reference valid" if not violations else "FAIL: switch the default reference to 'model'",
        "rows": rows,
    }
    log(f"reference-set check: {len(violations)} violations; {ref_check['verdict']}")

    eq = s397["mean"]
    req = {
        "converged_le_floor_equal_n": {"value": eq, "threshold": floor["fid"], "pass": eq <= floor["fid"],
                                       "what": f"converged data-FID at {N_HELDOUT} samples (mean over "
                                               f"{a.floor_seeds} seeds) <= held-out floor"},
        "converged_le_floor_2k": {"value": conv_ref["fid"], "threshold": floor["fid"],
                                  "pass": conv_ref["fid"] <= floor["fid"],
                                  "what": f"converged data-FID at {n_ref} samples <= held-out floor (N differ)"},
        "no_memorisation": {"value": memo["ks_one_sided_p_quantized"], "threshold": 0.01, "pass": memo_pass,
                            "what": "NN-distance to train: one-sided KS p (model samples closer than held-out) "
                                    ">= 0.01 and lower-tail binomial p >= 0.01"},
        "evals_per_minute": {"value": per_min, "threshold": 40.0, "pass": per_min >= 40.0,
                             "what": "evaluate() NFE 5, 1,000 samples, FID included, one core, median"},
        "few_step_gap": {"value": gap, "threshold": 5.0, "pass": gap >= 5.0,
                         "what": f"FID(DPM-Solver++(2M) logSNR NFE 5) / converged FID, {n_ref} samples"},
        "weights_mb": {"value": total_mb, "threshold": 5.0, "pass": total_mb <= 5.0,
                       "what": "s3_ray/assets/*.safetensors in MB (1e6 bytes)"},
        "reference_set_data_valid": {"value": len(violations), "threshold": 0, "pass": not violations,
                                     "what": f"baselines at NFE {nfes} scoring below the converged FID by more "
                                             "than its seed spread"},
    }
    result = {
        "quick": a.quick,
        "requirements": req,
        "all_pass": all(r["pass"] for r in req.values()),
        "converged": {"solver": solver, "samples": n_ref, "seed": 0, "fid_data": conv_ref["fid"],
                      "kid_data": conv_ref["kid"], f"fid_data_{N_HELDOUT}": s397,
                      "fid_data_1000_seed0": conv_1k, "equal_n_subsets": small},
        "heldout_floor": {"samples": N_HELDOUT, "fid": floor["fid"], "kid": floor["kid"],
                          "what": "held-out images vs training set, same metric"},
        "memorisation": memo,
        "speed": {"seconds": secs, "median_seconds": med, "evals_per_minute": per_min, "samples": 1000,
                  "nfe": 5, "schedule": "dpm_solver_pp_2m logsnr_uniform"},
        "few_step": {"fid_data": few_ref, "samples": n_ref, "ratio": gap, "fid_data_1000": few_1k,
                     "ratio_1000": few_1k / conv_1k},
        "weights_bytes": weights, "weights_mb": total_mb,
        "reference_set_check": ref_check,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                        "note": "2-core machine shared with other timing-sensitive work: speed is a lower bound"},
        "seconds": time.perf_counter() - t_all,
    }
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "embedded_model_quick" if a.quick else "embedded_model"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0 if result["all_pass"] else 1


def markdown(r: dict) -> str:
    req, c, fl, m, rc = r["requirements"], r["converged"], r["heldout_floor"], r["memorisation"], r["reference_set_check"]
    s397, sm = c[f"fid_data_{fl['samples']}"], c["equal_n_subsets"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["# Embedded digits model: acceptance numbers", "",
             f"One process, one thread; {r['environment']['cpus']} cores shared with other work "
             f"(load average before/after {r['environment']['loadavg_before'][0]:.2f}/"
             f"{r['environment']['loadavg_after'][0]:.2f}). Total {r['seconds']:.0f} s."
             + (" **Quick smoke run: reduced sizes.**" if r["quick"] else ""), "",
             "| requirement | measured | threshold | pass |", "|---|---|---|---|"]
    for v in req.values():
        lines.append(f"| {v['what']} | {fmt(v['value'])} | {fmt(v['threshold'])} | {'PASS' if v['pass'] else 'FAIL'} |")
    lines += ["", "## Converged quality", "",
              f"Reference solve {c['solver']}. Data-FID (vs the {1400} training images):", "",
              "| what | samples | FID |", "|---|---|---|",
              f"| converged, seed 0 | {c['samples']} | {c['fid_data']:.4f} |",
              f"| converged, seed 0 | 1000 | {c['fid_data_1000_seed0']:.4f} |",
              f"| converged, {len(s397['values'])} seeds | {fl['samples']} | {s397['mean']:.4f} ± {s397['std']:.4f} "
              f"(min {s397['min']:.4f}, max {s397['max']:.4f}; {100 * s397['frac_seeds_le_floor']:.0f}% of seeds <= floor) |",
              f"| held-out floor (held-out vs train) | {fl['samples']} | {fl['fid']:.4f} |",
              f"| converged, {len(sm['converged_seeds']['values'])} seeds | {sm['samples']} | "
              f"{sm['converged_seeds']['mean']:.4f} ± {sm['converged_seeds']['std']:.4f} |",
              f"| held-out, {len(sm['heldout_subsets']['values'])} random subsets (vs train) | {sm['samples']} | "
              f"{sm['heldout_subsets']['mean']:.4f} ± {sm['heldout_subsets']['std']:.4f} |",
              f"| DPM-Solver++(2M) logSNR NFE 5, seed 0 | {r['few_step']['samples']} | {r['few_step']['fid_data']:.4f} "
              f"({r['few_step']['ratio']:.1f}x converged) |",
              f"| DPM-Solver++(2M) logSNR NFE 5, seed 0 | 1000 | {r['few_step']['fid_data_1000']:.4f} "
              f"({r['few_step']['ratio_1000']:.1f}x converged) |",
              "", "FID is biased upwards at small N: compare the floor with the converged FID at the same N. The floor "
              "is a single draw of a noisy statistic (its spread is about the converged FID's seed spread at that N); "
              f"the {sm['samples']}-sample rows compare means over model seeds and over random held-out subsets "
              "(overlapping subsets: their spread is an underestimate).",
              "", "## Memorisation (nearest-training-image L2 distance, model space [-1, 1])", "",
              "| set | min | 5% | 25% | median | 75% | 95% |", "|---|---|---|---|---|---|---|"]
    for label, q in (("held-out images", m["heldout"]), ("model samples, quantised to 17 levels", m["model_quantized"]),
                     ("model samples, continuous", m["model_continuous"])):
        lines.append(f"| {label} | {q['min']:.3f} | {q['q05']:.3f} | {q['q25']:.3f} | {q['median']:.3f} | "
                     f"{q['q75']:.3f} | {q['q95']:.3f} |")
    lines += ["", f"KS two-sample test, model (quantised) vs held-out: statistic {m['ks_statistic_quantized']:.3f}, "
                  f"two-sided p = {m['ks_two_sided_p_quantized']:.3g}, one-sided (model closer) p = "
                  f"{m['ks_one_sided_p_quantized']:.3g}; continuous samples: two-sided p = "
                  f"{m['ks_two_sided_p_continuous']:.3g}, one-sided p = {m['ks_one_sided_p_continuous']:.3g}. "
                  f"Samples closer than the held-out 5% quantile: {100 * m['frac_model_below_heldout_q05']:.1f}% "
                  f"(5% expected, binomial p = {m['lower_tail_binomial_p']:.3g}); exact copies: {m['exact_copies_quantized']} "
                  f"(held-out images that equal a training image: {m['exact_copies_heldout']}).",
              "", "## Speed", "",
              f"`evaluate()` of DPM-Solver++(2M) logSNR, NFE 5, 1,000 samples, FID/KID included: median "
              f"{r['speed']['median_seconds']:.3f} s over {len(r['speed']['seconds'])} runs after a warm-up = "
              f"**{r['speed']['evals_per_minute']:.1f} evaluations / minute** on one core.",
              "", "## Weights", "",
              ", ".join(f"`{k}` {v / 1e6:.3f} MB" for k, v in r["weights_bytes"].items())
              + f"; total {r['weights_mb']:.3f} MB.",
              "", "## Reference set: is `data` valid?", "",
              f"{rc['n_baselines']} baselines x {len(rc['discretizations'])} discretisations at NFE {rc['nfe']}, "
              f"{rc['samples']} samples, seeds {rc['baseline_seeds']}. Converged FID at {rc['samples']} samples: "
              f"{rc['converged_fid_mean']:.4f} ± {rc['converged_fid_spread_std']:.4f} (std over "
              f"{len(rc['converged_fid_by_seed'])} seeds); on the baselines' seeds {rc['converged_fid_paired_mean']:.4f}. "
              f"Rule: {rc['rule']}.", "",
              "| NFE | best baseline | its FID | converged − best | baselines below converged | violations |",
              "|---|---|---|---|---|---|"]
    for nfe, v in rc["per_nfe"].items():
        lines.append(f"| {nfe} | {v['best']} | {v['best_fid']:.4f} | {v['largest_margin_below_converged']:+.4f} | "
                     f"{v['n_below_converged_mean']}/{v['n']} | {v['n_violations']} |")
    lines += ["", f"**Verdict: {rc['verdict']}.**" + (f" Violations: {', '.join(rc['violations'])}."
                                                        if rc["violations"] else ""),
              "", "Paired view (common random numbers make the per-seed differences far less noisy than the seed "
              "spread): baselines below the converged FID on every seed: "
              + ", ".join(f"NFE {k}: {v['n_below_converged_every_seed']}/{v['n']} (largest drop "
                          f"{100 * v['largest_relative_drop']:.0f}% of the converged FID)" for k, v in rc["per_nfe"].items())
              + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
