"""Search efficiency: S3 vs evolution vs random vs Optuna TPE on an embedded model (``--space``:
digits, or digits_cfg, the guided one).

Each (algorithm, seed) runs the searcher's suggest/complete loop in-process (no Ray: the same
searcher class Tune drives) at one NFE up to the largest budget; the best schedule found within each
budget is then re-evaluated on fresh seeds with more samples. Also measures the best tuned baseline
(every builder x discretisation, same fresh-seed protocol). Writes
benchmarks/results/search_efficiency.{json,md,png}.

    python benchmarks/search_efficiency.py [--space digits] [--nfe 5] [--budgets 100,200,400] [--seeds 3]
        [--s3-budget 100] [--workers 2] [--tag _cfg_nfe5]

The search seeds pair the algorithms: search seed i evaluates every schedule on the same noise
(common random numbers), so S3@b vs another algorithm@400 is compared per seed (Wilcoxon signed-rank
and the count of seeds S3 wins) besides mean ± std. ``--s3-budget``: S3 stops there (the issue's
question is S3@100 vs the others@400).
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


SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def _config(space: str, nfe: int, budget: int, seed: int, samples: int, predictor: dict | None = None,
            screen: dict | None = None):
    """The space's model, metric, baselines, operators and decisions, at one NFE and this budget
    (``predictor``: settings that override the space's; ``screen``: multi-fidelity stages)."""
    import yaml

    from s3_ray.config import parse_config

    data = yaml.safe_load((SPACES / f"{space}.yaml").read_text())
    data["predictor"] = {**data.get("predictor", {}), **(predictor or {})}
    data.update(name=f"eff-{space}-{nfe}", nfe=[nfe], budget=budget, stages=4, random_init=10, seed=seed,
                metric={**data["metric"], "samples": [samples]}, concurrency=1, plan_ahead=0)
    if screen is not None:
        data["screen"] = screen
    return parse_config(data)


def run_one(args) -> dict:
    """One search run; returns the best (score, schedule) after each full evaluation and the budget
    spent by then (the searcher's own accounting: screening trials charged ``screen.cost`` per schedule)."""
    space, algo, seed, nfe, budget, samples, predictor, screen = args
    import torch

    torch.set_num_threads(1)
    from ray.tune.search import Searcher

    from s3_ray.metrics.evaluate import evaluate, get_target
    from s3_ray.search.searcher import S3Searcher, predictor_quality
    from s3_ray.search.trial import screen_schedules
    from s3_ray.usf.schedule import SolverSchedule

    cfg = _config(space, nfe, budget, seed, samples, predictor, screen if algo == "s3" else None)
    searcher = S3Searcher(cfg, algo=algo)
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    best, trace, spent, start = (float("inf"), None), [], [], time.time()
    while True:
        tid = f"t{searcher.n_suggested}"
        c = searcher.suggest(tid)
        if c == Searcher.FINISHED or c is None:
            break
        if "screen" in c:  # a screening trial: cheap scores for the searcher, no candidate for the trace
            searcher.on_trial_complete(tid, screen_schedules(c["screen"], target, c["samples"], c["seed"],
                                                                 c.get("fidelity", "rmse")))
            continue
        s = SolverSchedule.from_json(c["schedule"])
        r = evaluate(s, target, n=c["samples"], seed=c["seed"])
        searcher.on_trial_complete(tid, r)
        if r["score"] < best[0]:
            best = (r["score"], c["schedule"])
        trace.append(best)
        spent.append(searcher.spent)  # trials run one at a time: everything suggested so far is finished
    return {"algo": algo, "seed": seed, "trace": trace, "spent": spent, "seconds": time.time() - start,
            "taus": predictor_quality(searcher.get_state())}


def best_within(run: dict, budget: int) -> tuple[float, str]:
    """The best (search score, schedule) among the full evaluations done within ``budget`` (cost)."""
    n = int(np.searchsorted(np.asarray(run["spent"]), budget + 1e-9, side="right"))
    return run["trace"][max(n, 1) - 1]


def fresh_score(args) -> float:
    space, schedule_json, samples, seeds = args
    import torch

    torch.set_num_threads(1)
    from s3_ray.metrics.evaluate import evaluate, get_target
    from s3_ray.usf.schedule import SolverSchedule

    cfg = _config(space, 5, 100, 0, samples)
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    s = SolverSchedule.from_json(schedule_json)
    return float(np.mean([evaluate(s, target, n=samples, seed=sd)["score"] for sd in seeds]))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default="digits", help="digits or digits_cfg (search_spaces/<space>.yaml)")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--s3-budget", type=int, default=None, help="S3's largest budget (default: the largest)")
    ap.add_argument("--budgets", default="100,200,400")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--final-samples", type=int, default=2000)
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--predictor", type=json.loads, default=None, help=(
        'JSON settings overriding the space\'s predictor for S3, e.g. \'{"model": "forest"}\''))
    ap.add_argument("--screen", type=json.loads, default=None, help=(
        'JSON multi-fidelity settings for S3 (budgets then count cost), e.g. \'{"factor": 3, "cost": 0.06}\''))
    ap.add_argument("--reuse", type=Path, default=None, help=(
        "an earlier result JSON of the same protocol (space, NFE, seeds, samples): the algorithms not in "
        "--algos are taken from it (searches are deterministic given their seeds; valid only while their code "
        "is unchanged, which this script does not check: rerun one seed to compare)"))
    a = ap.parse_args(argv)
    budgets = [int(b) for b in a.budgets.split(",")]
    algos = a.algos.split(",")
    fresh_seeds = [50_000 + i for i in range(2)]
    start = time.time()
    cap = {algo: (a.s3_budget or max(budgets)) if algo == "s3" else max(budgets) for algo in algos}
    own = {algo: [b for b in budgets if b <= cap[algo]] for algo in algos}  # the budgets each algorithm reaches
    jobs = [(a.space, algo, seed, a.nfe, cap[algo], a.samples, a.predictor, a.screen) for algo in algos for seed in range(a.seeds)]
    with ProcessPoolExecutor(a.workers) as pool:
        runs = list(pool.map(run_one, jobs))
        # best found within each budget, re-scored on fresh seeds
        picked = [(r, b) for r in runs for b in own[r["algo"]]]
        fresh = list(pool.map(fresh_score, [(a.space, best_within(r, b)[1], a.final_samples, fresh_seeds)
                                            for r, b in picked]))
        from s3_ray.models.pipeline import noise_for
        from s3_ray.search.seed_baselines import baseline_schedules

        cfg = _config(a.space, a.nfe, 100, 0, a.samples)
        base = baseline_schedules(cfg, noise_for(cfg.model), {})
        base_scores = list(pool.map(fresh_score, [(a.space, s.to_json(), a.final_samples, fresh_seeds)
                                                  for *_, s in base]))
    rows = [{"algo": r["algo"], "seed": r["seed"], "budget": b, "search_best": best_within(r, b)[0],
             "fresh": f, "seconds": r["seconds"],
             "spent": max([c for c in r["spent"] if c <= b + 1e-9], default=0.0)} for (r, b), f in zip(picked, fresh)]
    reused = _reused(a, algos, fresh_seeds) if a.reuse else []
    for row in reused:
        if row["algo"] not in algos:
            algos.append(row["algo"])
            own[row["algo"]] = []
        if row["budget"] not in own[row["algo"]]:
            own[row["algo"]].append(row["budget"])
    rows += reused
    ib = int(np.argmin(base_scores))
    best_baseline = {"name": base[ib][1], "fresh": base_scores[ib]}
    summary = {}
    for algo in algos:
        for b in own[algo]:
            v = [x["fresh"] for x in rows if x["algo"] == algo and x["budget"] == b]
            summary[f"{algo}/{b}"] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v}
    checks, paired = {}, {}
    top = max(budgets)
    if "s3" in algos:
        b3 = min(own["s3"])
        for other in [x for x in algos if x != "s3" and f"{x}/{top}" in summary]:
            mine, theirs = summary[f"s3/{b3}"]["values"], summary[f"{other}/{top}"]["values"]
            checks[f"s3@{b3} <= {other}@{top}"] = summary[f"s3/{b3}"]["mean"] <= summary[f"{other}/{top}"]["mean"]
            paired[f"s3@{b3} vs {other}@{top}"] = _paired(mine, theirs)
        s3_best = summary[f"s3/{max(own['s3'])}"]["mean"]
        checks["ratio s3 / best baseline"] = s3_best / best_baseline["fresh"]
    out = {"benchmark": "search_efficiency", "nfe": a.nfe, "budgets": budgets, "seeds": a.seeds, "samples": a.samples,
           "final_samples": a.final_samples, "fresh_seeds": fresh_seeds, "best_baseline": best_baseline,
           "space": a.space, "predictor": a.predictor, "screen": a.screen, "reused_from": str(a.reuse) if a.reuse else None, "summary": summary, "checks": checks, "paired": paired, "rows": rows, "taus": {f"{r['algo']}/{r['seed']}": r["taus"] for r in runs},
           "seconds": time.time() - start}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"search_efficiency{a.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [f"# Search efficiency at NFE {a.nfe} ({a.space})", "",
          f"Best schedule found within each budget, re-scored with {a.final_samples} samples on fresh seeds "
          f"{fresh_seeds} (mean ± std over {a.seeds} search seeds; search used {a.samples} samples). "
          f"Best tuned baseline: {best_baseline['name']} FID {best_baseline['fresh']:.4f}."
          + (f" S3's predictor settings overridden: `{json.dumps(a.predictor)}`." if a.predictor else "")
          + (f" S3 with screening `{json.dumps(a.screen)}`: its budget counts cost (a screened schedule "
             f"{_cfg_screen(a.screen).cost}, a full evaluation 1)." if a.screen else ""), "",
          "| algorithm | " + " | ".join(f"{b} evals" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for algo in algos:
        md.append(f"| {algo} | " + " | ".join(f"{summary[f'{algo}/{b}']['mean']:.4f} ± {summary[f'{algo}/{b}']['std']:.4f}"
                                            if f"{algo}/{b}" in summary else "-" for b in budgets) + " |")
    if reused:
        md += ["", f"Rows {', '.join(sorted({r['algo'] for r in reused}))}: reused from `{a.reuse.name}` (the same "
               "seeds and protocol), not re-run: valid while their code is unchanged."]
    md += ["", "Checks: " + ", ".join(f"{k}: {v if isinstance(v, bool) else round(v, 3)}" for k, v in checks.items())]
    for k, p in paired.items():
        md.append(f"Paired over search seeds, {k}: mean difference {p['mean_diff']:+.4f} (S3 minus other), S3 lower "
                  f"on {p['s3_wins']} of {p['n']} seeds, Wilcoxon signed-rank p = {p['wilcoxon_p']:.3f}")
    taus = [t for r in runs if r["algo"] == "s3" for t in r["taus"]]
    if taus:
        by_stage = {}
        for t in taus:
            by_stage.setdefault(t["stage"], []).append(t)
        md.append("S3's predictor, Kendall tau per stage (mean over seeds), held-out / its own proposals once "
                  "evaluated: " + ", ".join(
                      f"stage {st}: {_mean(x.get('kendall_tau') for x in v):.2f} / {_mean(x.get('proposal_tau') for x in v):.2f}"
                      for st, v in sorted(by_stage.items())))
        screened = [t for t in taus if "screen_vs_full_tau" in t]
        if screened:
            md.append("Screening, Kendall tau per stage (mean over seeds), predictor vs screening score / screening "
                      "vs full score (survivors): " + ", ".join(
                          f"stage {st}: {_mean(x.get('predicted_vs_screen_tau') for x in v):.2f} / "
                          f"{_mean(x.get('screen_vs_full_tau') for x in v):.2f}" for st, v in sorted(by_stage.items())))
    md.append(f"Wall time {out['seconds']:.0f} s.")
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    _plot(out, algos, budgets, RESULTS / f"{stem}.png")
    print("\n".join(md))
    missed = [k for k, v in checks.items() if v is False]
    if missed:  # make bench fails
        print(f"search_efficiency.py: target(s) missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


def _reused(a, algos: list[str], fresh_seeds: list[int]) -> list[dict]:
    """The rows of ``a.reuse`` for algorithms not run now; refused unless the protocol is the same."""
    old = json.loads(a.reuse.read_text())
    want = {"space": a.space, "nfe": a.nfe, "seeds": a.seeds, "samples": a.samples, "final_samples": a.final_samples,
            "fresh_seeds": fresh_seeds}
    diff = {k: (old.get(k), v) for k, v in want.items() if old.get(k) != v}
    if diff:
        raise SystemExit(f"--reuse {a.reuse}: another protocol ({diff}: theirs, ours)")
    return [r for r in old["rows"] if r["algo"] not in algos]


def _cfg_screen(screen: dict):
    from s3_ray.config import ScreenConfig

    return ScreenConfig.model_validate(screen)


def _mean(xs) -> float:
    v = [x for x in xs if x is not None and x == x]
    return float(np.mean(v)) if v else float("nan")


def _paired(mine: list[float], theirs: list[float]) -> dict:
    """S3 vs another algorithm on the same search seeds (the same noise: a valid pairing)."""
    from scipy.stats import wilcoxon

    d = np.asarray(mine) - np.asarray(theirs)
    p = float(wilcoxon(d).pvalue) if len(d) >= 2 and np.any(d != 0) else float("nan")
    return {"n": len(d), "mean_diff": float(d.mean()), "s3_wins": int((d < 0).sum()), "wilcoxon_p": p}


def _plot(out, algos, budgets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for algo in algos:
        bs = [b for b in budgets if f"{algo}/{b}" in out["summary"]]
        m = [out["summary"][f"{algo}/{b}"]["mean"] for b in bs]
        s = [out["summary"][f"{algo}/{b}"]["std"] for b in bs]
        ax.errorbar(bs, m, yerr=s, marker="o", capsize=3, label=algo)
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
