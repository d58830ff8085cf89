"""Why the predictor ranks its own proposals poorly: a diagnosis from a finished search (issue 14, item 2).

Reads a search's run directory (``runs/<name>/``: the searcher's saved state) and, per stage,
refits that stage's predictor exactly as the search did (same training set, settings and seed;
its predictions for the chosen proposals are checked against the ones the search recorded), then
measures:

- ``proposal_tau``: Kendall tau of predicted vs measured score on the stage's own proposals, per NFE;
- ``noise_ceiling_tau``: the tau a perfect predictor could reach on those proposals, given the
  measured scores' noise: with ``noise_sd`` (seed-to-seed sd of one score at the search fidelity
  among the best quarter of schedules, from ``benchmarks/results/fidelity.json``) and the proposals' measured variance v, the
  reliability r = max(0, 1 - noise_sd^2 / v), and for Gaussian scores tau = (2 / pi) arcsin(sqrt r);
- ``final_loss``: the pairwise ranking loss at the end of training (log 2 = 0.693 is chance);
- ``distance_ratio``: median distance (standardised encodings) from a proposal to its nearest
  training schedule, over the median nearest-neighbour distance within the training set;
- ``tau_without_probes``: held-out tau of the same training set with the probe features off (does
  the encoding's expensive part help?), next to the held-out tau with them.

Writes ``benchmarks/results/predictor_diagnosis_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _noise_sd(fidelity: Path, target: str) -> dict[int, float]:
    data = json.loads(fidelity.read_text())
    for t in data["targets"]:
        if t["target"] == target:
            return {int(k): v["search_noise_sd_best_quarter"] for k, v in t["per_nfe"].items()}
    raise SystemExit(f"{fidelity} has no target {target!r}")


def ceiling_tau(scores: np.ndarray, noise_sd: float) -> float:
    """Kendall tau of the true scores against noisy measurements of them, for Gaussian scores."""
    v = float(np.var(scores, ddof=1)) if scores.size > 1 else 0.0
    r = max(0.0, 1.0 - noise_sd ** 2 / v) if v > 0 else 0.0
    return 2 / math.pi * math.asin(math.sqrt(r))


def diagnose(run_dir: Path, fidelity: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from s3_ray.config import SearchConfig
    from s3_ray.models.pipeline import noise_for
    from s3_ray.search.predictor import Predictor, heldout_tau, per_nfe_tau
    from s3_ray.search.searcher import load_saved_state, training_subset
    from s3_ray.usf.schedule import SolverSchedule

    state = load_saved_state(run_dir / "tune")
    cfg = SearchConfig.model_validate(state["config"])
    if cfg.predictor.model != "net":
        raise SystemExit(f"{run_dir}: predictor.model {cfg.predictor.model!r}; this diagnosis refits model 'net' "
                         "(benchmarks/predictor_models.py compares models)")
    noise = noise_for(cfg.model)
    noise_sd = _noise_sd(fidelity, cfg.model.kind)
    results = sorted(state["results"], key=lambda r: r["index"])
    cache: dict = {}
    stages = []
    for t in state["taus"]:
        k = t["stage"]
        train = training_subset(results[: t["n_train"]], cfg.predictor.max_train, cfg.seed + k)
        schedules = [SolverSchedule.from_json(r["schedule"]) for r in train]
        p = Predictor(cfg.predictor, noise, seed=cfg.seed + k, encoding_cache=cache).fit(schedules, [r["score"] for r in train])
        own = [r for r in results if r.get("stage") == k and "predicted" in r]
        pred = p.predict([SolverSchedule.from_json(r["schedule"]) for r in own])
        recorded = np.array([r["predicted"] for r in own])
        nfes = np.array([r["nfe"] for r in own])
        scores = np.array([r["score"] for r in own])
        x_train = (p._encode(schedules) - p.mean) / p.std
        x_own = (p._encode([SolverSchedule.from_json(r["schedule"]) for r in own]) - p.mean) / p.std
        d_train = np.linalg.norm(x_train[:, None] - x_train[None], axis=2)
        np.fill_diagonal(d_train, np.inf)
        d_own = np.linalg.norm(x_own[:, None] - x_train[None], axis=2).min(1)
        per = {}
        for nfe in sorted(set(nfes.tolist())):
            sel = nfes == nfe
            per[nfe] = {"n": int(sel.sum()), "score_sd": float(scores[sel].std(ddof=1)) if sel.sum() > 1 else 0.0,
                        "noise_sd": noise_sd.get(nfe), "ceiling_tau": ceiling_tau(scores[sel], noise_sd[nfe])
                        if nfe in noise_sd else None}
        ceil = [v for v in per.values() if v["ceiling_tau"] is not None and v["n"] >= 3]
        sub = [SolverSchedule.from_json(r["schedule"]) for r in results[: t["n_train"]]]
        sub_scores = [r["score"] for r in results[: t["n_train"]]]
        stages.append({
            "stage": k, "n_train": len(train), "n_proposals": len(own),
            "predictions_reproduced": bool(np.allclose(pred, recorded, rtol=1e-5, atol=1e-6)),
            "proposal_tau": per_nfe_tau(nfes, recorded, scores),
            "noise_ceiling_tau": (sum(v["n"] * v["ceiling_tau"] for v in ceil) / sum(v["n"] for v in ceil)) if ceil else None,
            "final_loss": float(p.final_loss), "n_pairs": int(p.n_pairs),
            "distance_ratio": float(np.median(d_own) / np.median(d_train.min(1))),
            "heldout_tau": heldout_tau(sub, sub_scores, cfg.predictor, noise, seed=cfg.seed + k, encoding_cache=cache),
            "tau_without_probes": heldout_tau(sub, sub_scores, cfg.predictor, noise, seed=cfg.seed + k, probes=False),
            "per_nfe": per,
        })
        print(json.dumps({k2: v for k2, v in stages[-1].items() if k2 != "per_nfe"}), flush=True)
    return {"run": str(run_dir), "name": cfg.name, "target": cfg.model.kind, "search_samples": cfg.metric.samples[0],
            "stages": stages}


def _markdown(d: dict) -> str:
    f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
    lines = [f"# Predictor diagnosis: {d['name']} ({d['target']}, FID@{d['search_samples']} per trial)", "",
             "Per stage, the stage's predictor refit as in the search. `ceiling`: the tau a perfect predictor "
             "reaches on the proposals given the search fidelity's seed noise (fidelity.json); loss: pairwise "
             "logistic (0.69 = chance); distance: proposals' nearest training neighbour over the training set's "
             "own nearest-neighbour distance (standardised encodings).", "",
             "| stage | train | proposals | proposal tau | noise ceiling | loss | distance ratio | held-out tau | "
             "without probes | score sd / noise sd per NFE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in d["stages"]:
        spread = ", ".join(f"{nfe}: {v['score_sd']:.4f} / {v['noise_sd']:.4f}" for nfe, v in s["per_nfe"].items()
                           if v["noise_sd"] is not None)
        lines.append(f"| {s['stage']} | {s['n_train']} | {s['n_proposals']} | {f(s['proposal_tau'])} | "
                     f"{f(s['noise_ceiling_tau'])} | {f(s['final_loss'])} | {f(s['distance_ratio'])} | "
                     f"{f(s['heldout_tau'])} | {f(s['tau_without_probes'])} | {spread} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a search's run directory (runs/<name>)")
    p.add_argument("--fidelity", type=Path, default=RESULTS / "fidelity.json")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    d = diagnose(a.run, a.fidelity)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"predictor_diagnosis_{d['name']}.json").write_text(json.dumps(d, indent=1))
    (a.out / f"predictor_diagnosis_{d['name']}.md").write_text(_markdown(d))
    print(_markdown(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
