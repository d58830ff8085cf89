"""S3Searcher: the S3 search as a Ray Tune Searcher (spec 4.3), plus the predictor-free variants.

Phases: (1) seed the pool with every configured baseline builder x discretisation at every NFE,
then random schedules; (2) ``stages`` rounds, each of which retrains the predictor on everything
evaluated, generates evolutionary mutants, and sends only the top predicted ones to true
evaluation. ``algo='evolution'`` proposes one mutant at a time from the current pool (the public
release's algorithm); ``algo='random'`` draws random valid schedules; ``algo='optuna-tpe'`` asks
Optuna's TPE over a fixed-length parameterisation of the same space (``tpe.py``).

It runs (and is tested) without a Ray cluster: Tune only calls ``suggest``/``on_trial_complete``/
``save``/``restore``. ``suggest`` returns the trial config: the schedule as canonical JSON plus the
evaluation settings (model and metric configs, sample count, noise seed).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import numpy as np
from ray.tune.search import Searcher

from s3_ray.config import SearchConfig
from s3_ray.search.predictor import Predictor, heldout_tau, per_nfe_tau
from s3_ray.search.space import propose, random_schedule_at_nfe
from s3_ray.search.tpe import TPEProposer
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import get_noise_schedule
from s3_ray.usf.schedule import SolverSchedule, load_schedule

ALGOS = ("s3", "evolution", "random", "optuna-tpe")
STATE_VERSION = 1


class S3Searcher(Searcher):
    """``suggest(trial_id)`` -> trial config | None (ask again later) | Searcher.FINISHED."""

    def __init__(self, config: SearchConfig, algo: str = "s3", metric: str = "score", mode: str = "min"):
        super().__init__(metric=metric, mode=mode)
        if algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
        self.cfg, self.algo = config, algo
        self.noise = get_noise_schedule(config.model.noise_schedule)
        self.rng = np.random.default_rng(config.seed)
        self.queue: list[dict] = []  # proposals waiting for a trial id
        self.pending: dict[str, dict] = {}  # trial id -> proposal
        self.results: list[dict] = []  # proposal + score, failed
        self.seen: set[str] = set()  # schedule hashes ever proposed
        self.n_suggested = 0
        self.stage = -1  # -1: seed phase
        self.stage_budgets = []
        self.taus: list[dict] = []  # per stage: training set size, candidates, chosen
        self._eval_settings = {"model": config.model.model_dump_json(), "metric": config.metric.model_dump_json()}
        self.trial_settings: dict = {}  # extra keys for every trial config (the driver sets the result cache)
        self.tpe = TPEProposer(config, self.noise) if algo == "optuna-tpe" else None
        self._encodings: dict = {}  # schedule hash -> predictor input, so each schedule is encoded once
        self._plan_seed_phase()

    # ---- planning -------------------------------------------------------------------------------
    def _proposal(self, s: SolverSchedule, source: str, stage: int) -> dict | None:
        h = s.schedule_hash()
        if h in self.seen:
            return None
        self.seen.add(h)
        samples = self.cfg.metric.samples[min(max(stage, 0), len(self.cfg.metric.samples) - 1)]
        return {"schedule": s.to_json(), "schedule_hash": h, "nfe": s.nfe(), "source": source, "stage": stage,
                "samples": samples, "seed": self.cfg.seed}

    def _plan_seed_phase(self):
        cfg = self.cfg
        seeds = [(load_schedule(f), "user") for f in cfg.seed_schedules]
        if self.algo in ("s3", "evolution"):
            for nfe in cfg.nfe:
                for name in cfg.baselines:
                    for disc in cfg.discretizations:
                        seeds.append((build_baseline(name, self.noise, nfe, discretization=disc), "baseline"))
        for _ in range(cfg.random_init):
            for nfe in cfg.nfe:
                seeds.append((random_schedule_at_nfe(self.rng, self.noise, nfe, cfg.decisions, cfg.operators), "random"))
        for s, source in seeds:
            p = self._proposal(s, source, -1)
            if p is not None:
                self.queue.append(p)
        self.queue = self.queue[: cfg.budget]
        rest = cfg.budget - len(self.queue)
        k = cfg.stages
        self.stage_budgets = [rest // k + (1 if i < rest % k else 0) for i in range(k)]

    def _ordered_results(self) -> list[dict]:
        """Results in suggestion order: planning then depends on which results exist, not on the
        order they arrived in (a restored search plans the same stage)."""
        return sorted(self.results, key=lambda r: r["index"])

    def _pool(self) -> dict[int, list[tuple[SolverSchedule, float]]]:
        pool = defaultdict(list)
        for r in self._ordered_results():
            pool[r["nfe"]].append((SolverSchedule.from_json(r["schedule"]), r["score"]))
        return pool

    def _mutants(self, n: int, stage: int, source: str) -> list[dict]:
        """Up to ``n`` new (unseen) evolutionary proposals with target NFEs drawn from the range."""
        pool, out, tries = self._pool(), [], 0
        allowed = set(self.cfg.nfe)
        while len(out) < n and tries < 20 * n + 100:
            tries += 1
            target = int(self.rng.choice(self.cfg.nfe))
            s = propose(self.rng, pool, target, self.noise, self.cfg.decisions, self.cfg.operators, allowed)
            p = self._proposal(s, source, stage)
            if p is not None:
                out.append(p)
        return out

    def _plan_stage(self):
        """Retrain the predictor, rank many mutants, queue the top ones of this stage.

        This runs while no trial is in flight, so it does only what the proposals need; the
        predictor's quality is measured after the search (``predictor_quality``)."""
        self.stage += 1
        budget = self.stage_budgets[self.stage]
        results = self._ordered_results()
        schedules = [SolverSchedule.from_json(r["schedule"]) for r in results]
        scores = [r["score"] for r in results]
        predictor = Predictor(self.cfg.predictor, self.noise, seed=self.cfg.seed + self.stage,
                              encoding_cache=self._encodings)
        predictor.fit(schedules, scores)
        cands = self._mutants(max(self.cfg.predictor.candidates, budget), self.stage, "predictor")
        for c in cands:  # only the chosen ones stay "seen"
            self.seen.discard(c["schedule_hash"])
        pred = predictor.predict([SolverSchedule.from_json(c["schedule"]) for c in cands]) if cands else []
        by_nfe = defaultdict(list)
        for c, p in zip(cands, pred):
            by_nfe[c["nfe"]].append((float(p), {**c, "predicted": float(p)}))
        for group in by_nfe.values():
            group.sort(key=lambda pc: pc[0])
        # Round-robin over NFEs, best predicted first, so every NFE gets its share.
        chosen, depth = [], 0
        while len(chosen) < budget and any(depth < len(g) for g in by_nfe.values()):
            for nfe in sorted(by_nfe):
                if depth < len(by_nfe[nfe]) and len(chosen) < budget:
                    chosen.append(by_nfe[nfe][depth][1])
            depth += 1
        for c in chosen:
            self.seen.add(c["schedule_hash"])
        self.queue.extend(chosen)
        self.taus.append({"stage": self.stage, "n_train": len(schedules), "candidates": len(cands),
                          "chosen": len(chosen)})

    # ---- the Searcher protocol -------------------------------------------------------------------
    def suggest(self, trial_id: str):
        if self.n_suggested >= self.cfg.budget:
            return Searcher.FINISHED
        if not self.queue:
            if self.algo == "s3":
                if self.pending:
                    return None  # a stage starts when every earlier result is in
                if self.stage + 1 >= len(self.stage_budgets):
                    return Searcher.FINISHED
                self._plan_stage()
                if not self.queue:
                    return Searcher.FINISHED
            elif self.algo == "evolution":
                if not self.results:
                    return None
                self.queue.extend(self._mutants(1, 0, "evolution"))
            elif self.algo == "optuna-tpe":
                self._ask_tpe()
            else:
                for _ in range(100):
                    nfe = int(self.rng.choice(self.cfg.nfe))
                    s = random_schedule_at_nfe(self.rng, self.noise, nfe, self.cfg.decisions, self.cfg.operators)
                    p = self._proposal(s, "random", 0)
                    if p is not None:
                        self.queue.append(p)
                        break
            if not self.queue:
                return None
        # The trial key (suggestion index + schedule hash) is the same when a restored searcher
        # re-suggests a proposal, so tracking and the result cache recognise a re-run trial.
        proposal = {**self.queue.pop(0), "index": self.n_suggested}
        proposal["trial_key"] = f"{self.n_suggested:05d}-{proposal['schedule_hash'][:10]}"
        self.pending[trial_id] = proposal
        self.n_suggested += 1
        return {**proposal, **self._eval_settings, **self.trial_settings}

    def _ask_tpe(self):
        known = {r["schedule_hash"]: r["score"] for r in self.results}
        for _ in range(50):
            s, params, number = self.tpe.ask()
            p = self._proposal(s, "optuna-tpe", 0)
            if p is not None:
                self.queue.append({**p, "tpe": {"params": params, "number": number}})
                return
            if s.schedule_hash() in known:  # a point that decodes to a known schedule: tell its score
                self.tpe.tell(number, params, known[s.schedule_hash()])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        proposal = self.pending.pop(trial_id, None)
        if proposal is None:  # not ours, or already recorded
            return
        score = result.get("score") if (result and not error) else None
        finite = score is not None and math.isfinite(score)
        failed = bool(error or not finite or result.get("failed"))
        value = float(score) if finite else self.cfg.metric.worst_score
        self.results.append({**proposal, "trial_id": trial_id, "score": value, "failed": failed})
        if self.tpe is not None and "tpe" in proposal:
            self.tpe.tell(proposal["tpe"]["number"], proposal["tpe"]["params"], value)

    # ---- state ------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "config": self.cfg.model_dump(mode="json"), "algo": self.algo,
                "rng": self.rng.bit_generator.state, "queue": self.queue, "pending": self.pending,
                "results": self.results, "seen": sorted(self.seen), "n_suggested": self.n_suggested,
                "stage": self.stage, "stage_budgets": self.stage_budgets, "taus": self.taus,
                "trial_settings": self.trial_settings, "tpe": self.tpe.get_state() if self.tpe else None}

    def set_state(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"searcher state version {state.get('version')} is not {STATE_VERSION}")
        self.cfg = SearchConfig.model_validate(state["config"])
        self.algo = state["algo"]
        self.noise = get_noise_schedule(self.cfg.model.noise_schedule)
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.queue, self.pending, self.results = state["queue"], state["pending"], state["results"]
        self.seen, self.n_suggested = set(state["seen"]), state["n_suggested"]
        self.stage, self.stage_budgets, self.taus = state["stage"], state["stage_budgets"], state["taus"]
        self.trial_settings = state.get("trial_settings", {})
        self.tpe = TPEProposer(self.cfg, self.noise) if self.algo == "optuna-tpe" else None
        self._encodings = {}
        if self.tpe is not None:
            self.tpe.set_state(state["tpe"])
        self._eval_settings = {"model": self.cfg.model.model_dump_json(), "metric": self.cfg.metric.model_dump_json()}

    def save(self, path: str):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.get_state(), f)
        os.replace(tmp, path)

    def restore(self, path: str):
        with open(path) as f:
            self.set_state(json.load(f))


def predictor_quality(state: dict) -> list[dict]:
    """Per-stage predictor quality from a searcher state (``get_state()`` or its saved JSON),
    measured after the search so that no trial waits for it. For stage k:

    - ``kendall_tau``: held-out Kendall tau of a predictor trained like stage k's (same settings and
      seed) on a seeded, NFE-stratified 75 % of the results stage k trained on, tested on the rest;
    - ``proposal_tau``: tau between stage k's predictions for the schedules it chose and their
      measured scores (schedules that predictor never saw; all of them top-ranked candidates).
    Both are means of per-NFE taus weighted by group size (NaN where no group has 3 items)."""
    if state.get("algo") != "s3":
        return []
    cfg = SearchConfig.model_validate(state["config"])
    noise = get_noise_schedule(cfg.model.noise_schedule)
    results = sorted(state["results"], key=lambda r: r["index"])
    encodings: dict = {}  # the stages' training sets overlap: encode each schedule once
    out = []
    for t in state["taus"]:
        k, trained = t["stage"], results[: t["n_train"]]
        tau = heldout_tau([SolverSchedule.from_json(r["schedule"]) for r in trained], [r["score"] for r in trained],
                          cfg.predictor, noise, seed=cfg.seed + k, encoding_cache=encodings)
        own = [r for r in results if r.get("stage") == k and "predicted" in r]
        ptau = per_nfe_tau(np.array([r["nfe"] for r in own]), np.array([r["predicted"] for r in own]),
                           np.array([r["score"] for r in own])) if own else float("nan")
        out.append({**t, "kendall_tau": float(tau), "proposal_tau": float(ptau), "n_evaluated": len(own)})
    return out
