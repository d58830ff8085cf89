"""The predictor's model, compared offline on finished searches (issue 14, item 2).

For every stage of each given search (a run directory ``runs/<name>/`` or a saved searcher state),
fits each model on exactly the stage's training set (same subset and seed as the search) and
measures its Kendall tau (per NFE, weighted) on the stage's own proposals once evaluated. The
proposals were chosen by the search's own predictor (model 'net' in the stored searches), so its
tau there is the one ``predictor_quality`` reports; the other models rank the same schedules
without having chosen them, so this compares ranking skill on the schedules a stage asks about,
not the whole search (``search_efficiency.py`` does that).

Writes ``benchmarks/results/predictor_models.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"net": {"model": "net"}, "forest": {"model": "forest"}}


def _state(path: Path) -> dict:
    from s3_ray.search.searcher import load_saved_state

    return load_saved_state(path / "tune") if path.is_dir() else json.loads(path.read_text())


def compare(path: Path) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    from s3_ray.config import SearchConfig
    from s3_ray.models.pipeline import noise_for
    from s3_ray.search.predictor import heldout_tau, make_predictor, per_nfe_tau
    from s3_ray.search.searcher import training_subset
    from s3_ray.usf.schedule import SolverSchedule

    state = _state(path)
    cfg = SearchConfig.model_validate(state["config"])
    noise = noise_for(cfg.model)
    results = sorted(state["results"], key=lambda r: r["index"])
    cache: dict = {}
    rows = []
    for t in state["taus"]:
        k = t["stage"]
        below = t.get("train_below", t["n_train"])
        train = training_subset([r for r in results if r["index"] < below], cfg.predictor.max_train, cfg.seed + k)
        own = [r for r in results if r.get("stage") == k and "predicted" in r]
        schedules = [SolverSchedule.from_json(r["schedule"]) for r in train]
        scores = [r["score"] for r in train]
        asked = [SolverSchedule.from_json(r["schedule"]) for r in own]
        nfes, measured = np.array([r["nfe"] for r in own]), np.array([r["score"] for r in own])
        train_nfes = np.array([s.nfe() for s in schedules])
        row = {"search": cfg.name, "path": str(path), "stage": k, "n_train": len(train), "n_proposals": len(own),
               "recorded_tau": per_nfe_tau(nfes, np.array([r["predicted"] for r in own]), measured)}
        for name, update in MODELS.items():
            pc = cfg.predictor.model_copy(update={**update, "ensemble": 1, "refit_epochs": None, "acquisition": "mean"})
            pc = type(pc).model_validate(pc.model_dump())
            t0 = time.process_time()
            p = make_predictor(pc, noise, seed=cfg.seed + k, encoding_cache=cache).fit(schedules, scores)
            row[f"{name}_fit_cpu_s"] = time.process_time() - t0
            pred, fitted = p.predict(asked), p.predict(schedules)
            row[f"{name}_proposal_tau"] = per_nfe_tau(nfes, pred, measured)
            # extrapolation: proposals predicted better than every training schedule of their NFE
            best = {n: fitted[train_nfes == n].min() for n in set(train_nfes.tolist())}
            row[f"{name}_beyond_best"] = float(np.mean([p_i < best.get(n, -np.inf) for p_i, n in zip(pred, nfes.tolist())]))
            row[f"{name}_heldout_tau"] = heldout_tau(schedules, scores, pc, noise, seed=cfg.seed + k, encoding_cache=cache)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _markdown(rows: list[dict]) -> str:
    names = list(MODELS)
    lines = ["# Predictor models on finished searches", "",
             "Kendall tau (per NFE, weighted) of each model, fit on a stage's training set, on that stage's "
             "proposals once evaluated (chosen by the search's own 'net'); held-out: a 75/25 split of the "
             "training set; beyond best: the share of proposals predicted better than every training schedule "
             "of their NFE (extrapolation; a forest hardly can: its predictions are averages of training scores). "
             "Written by `benchmarks/predictor_models.py`.", "",
             "| search | stage | train | proposals | recorded | " + " | ".join(f"{n} proposal tau" for n in names)
             + " | " + " | ".join(f"{n} held-out tau" for n in names) + " | "
             + " | ".join(f"{n} beyond best" for n in names) + " | " + " | ".join(f"{n} fit CPU s" for n in names)
             + " |", "|---" * (5 + 4 * len(names)) + "|"]
    for r in rows:
        lines.append(f"| {r['search']} | {r['stage']} | {r['n_train']} | {r['n_proposals']} | {r['recorded_tau']:.2f} | "
                     + " | ".join(f"{r[f'{n}_proposal_tau']:.2f}" for n in names) + " | "
                     + " | ".join(f"{r[f'{n}_heldout_tau']:.2f}" for n in names) + " | "
                     + " | ".join(f"{r[f'{n}_beyond_best']:.2f}" for n in names) + " | "
                     + " | ".join(f"{r[f'{n}_fit_cpu_s']:.2f}" for n in names) + " |")
    mean = lambda key: float(np.nanmean([r[key] for r in rows]))
    lines += ["", "Mean over stages: recorded " + f"{mean('recorded_tau'):.3f}; "
              + "; ".join(f"{n} proposal {mean(f'{n}_proposal_tau'):.3f}, held-out {mean(f'{n}_heldout_tau'):.3f}, "
                          f"beyond best {mean(f'{n}_beyond_best'):.2f}"
                          for n in names) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("searches", type=Path, nargs="+", help="run directories (runs/<name>) or saved searcher states")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    rows = [row for path in a.searches for row in compare(path)]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "predictor_models.json").write_text(json.dumps(rows, indent=1))
    (a.out / "predictor_models.md").write_text(_markdown(rows))
    print(_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
