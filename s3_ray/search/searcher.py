"""S3Searcher: the S3 search as a Ray Tune Searcher (spec 4.3), plus the predictor-free variants.

Phases: (1) seed the pool with every configured baseline builder x discretisation at every NFE,
then random schedules; (2) ``stages`` rounds, each of which retrains the predictor on everything
evaluated, generates evolutionary mutants, and sends only the top predicted ones to true
evaluation. ``algo='evolution'`` proposes one mutant at a time from the current pool (the public
release's algorithm); ``algo='random'`` draws random valid schedules; ``algo='optuna-tpe'`` asks
Optuna's TPE over a fixed-length parameterisation of the same space (``tpe.py``).

With ``screen`` (multi-fidelity, successive halving with one cheap rung), a stage's top predicted
mutants, ``screen.factor`` times as many as it can fully evaluate, first go to screening trials
(``screen.batch`` schedules each, scored by the RMSE of ``screen.samples`` samples against the
converged solve from the same noise); once every screening result of the stage is in, the best
1 / factor per NFE by that score go to full evaluation. Budgets are counted in cost: a full
evaluation costs 1, a screened schedule ``screen.cost``.

It runs (and is tested) without a Ray cluster: Tune only calls ``suggest``/``on_trial_complete``/
``save``/``restore``. ``suggest`` returns the trial config: the schedule as canonical JSON plus the
evaluation settings (model and metric configs, sample count, noise seed).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
from ray.tune.search import Searcher

from s3_ray.config import SearchConfig
from s3_ray.models.pipeline import noise_for
from s3_ray.search.predictor import PredictorEnsemble, heldout_tau, per_nfe_tau
from s3_ray.search.seed_baselines import baseline_schedules
from s3_ray.search.space import propose, random_schedule_at_nfe
from s3_ray.search.tpe import TPEProposer
from s3_ray.usf.schedule import SolverSchedule, load_schedule

ALGOS = ("s3", "evolution", "random", "optuna-tpe")
STATE_VERSION = 2


class S3Searcher(Searcher):
    """``suggest(trial_id)`` -> trial config | None (ask again later) | Searcher.FINISHED."""

    def __init__(self, config: SearchConfig, algo: str = "s3", metric: str = "score", mode: str = "min",
                 gits_grids: dict[str, list[float]] | None = None, warm_results: list[dict] | None = None,
                 split_seeds: list[SolverSchedule] | None = None):
        """``gits_grids``: ``seed_baselines.gits_grids(config)``, needed when discretizations list gits;
        ``warm_results``: ``warm_start.load_warm_results(config)`` (S3 and evolution breed from them);
        ``split_seeds``: ``warm_start.split_seeds(config, noise)``, evaluated in the seed phase."""
        super().__init__(metric=metric, mode=mode)
        if algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
        from s3_ray.search.preflight import search_decisions

        config = search_decisions(config)  # a pipeline: only decisions it can run
        self.cfg, self.algo = config, algo
        self.noise = noise_for(config.model)
        self.rng = np.random.default_rng(config.seed)
        self.queue: list[dict] = []  # proposals waiting for a trial id
        self.pending: dict[str, dict] = {}  # trial id -> proposal
        self.results: list[dict] = []  # proposal + score, failed
        self._done_prefix, self._done_above = 0, set()  # every index < _done_prefix has its result
        self.seen: set[str] = set()  # schedule hashes ever proposed
        self.n_suggested = 0
        self.spent = 0.0  # budget charged to suggested trials (1 per full evaluation)
        self.rung: dict | None = None  # the current stage's screening rung until its survivors are queued
        self.screened: list[dict] = []  # every screened schedule: stage, nfe, hash, screen score, survived
        self.stage = -1  # -1: seed phase
        self.stage_budgets = []
        self.taus: list[dict] = []  # per stage: training set size, candidates, chosen
        self._eval_settings = _eval_settings(config)
        self.trial_settings: dict = {}  # extra keys for every trial config (the driver sets the result cache)
        self.tpe = TPEProposer(config, self.noise) if algo == "optuna-tpe" else None
        self._encodings: dict = {}  # schedule hash -> predictor input, so each schedule is encoded once
        self._plan_job = None  # (future, rng, seen) of the next stage while it is planned ahead
        self.submit_plan = _submit_plan  # runs a stage's planning beside the search (a simulation's clock)
        self.waiting_for = None  # why the last suggest returned None: 'results' or 'planning'
        self._gits_grids = gits_grids or {}
        self._split_seeds = list(split_seeds or []) if algo in ("s3", "evolution") else []
        self._add_warm(warm_results or [])
        self._plan_seed_phase()

    # ---- planning -------------------------------------------------------------------------------
    def _proposal(self, s: SolverSchedule, source: str, stage: int, seen: set | None = None,
                  baseline: str | None = None) -> dict | None:
        """A trial's config (None when the schedule was proposed before); ``baseline``: the
        baseline's 'builder/discretization' name, shown in progress, MLflow and the summary."""
        seen = self.seen if seen is None else seen
        h = s.schedule_hash()
        if h in seen:
            return None
        seen.add(h)
        samples = self.cfg.metric.samples[min(max(stage, 0), len(self.cfg.metric.samples) - 1)]
        config = {"schedule": s.to_json(), "schedule_hash": h, "nfe": s.nfe(), "source": source, "stage": stage,
                  "samples": samples, "seed": self.cfg.seed, "cost": 1.0}
        if baseline is not None:
            config["baseline"] = baseline
        return config

    def _add_warm(self, warm: list[dict]):
        """Earlier results as if evaluated before this search (indices -n..-1, before every trial):
        never suggested again, no budget; the pool-based algorithms train and breed on them."""
        if self.algo not in ("s3", "evolution"):
            warm = []  # random search and TPE do not read the pool
        for i, r in enumerate(warm):
            self.seen.add(r["schedule_hash"])
            self.results.append({**r, "index": i - len(warm), "stage": -2, "trial_id": None})

    @property
    def n_warm(self) -> int:
        """How many earlier results this search reused (``warm_results``)."""
        return sum(1 for r in self.results if r["source"] == "warm")

    def _plan_seed_phase(self):
        cfg = self.cfg
        seeds = [(load_schedule(f), "user", None) for f in cfg.seed_schedules]
        seeds += [(s, "split", None) for s in self._split_seeds]
        if self.algo in ("s3", "evolution"):
            seeds += [(b, "baseline", label) for _, label, b in baseline_schedules(cfg, self.noise, self._gits_grids)]
        for _ in range(cfg.random_init):
            for nfe in cfg.nfe:
                seeds.append((random_schedule_at_nfe(self.rng, self.noise, nfe, cfg.decisions, cfg.operators), "random",
                              None))
        if self.algo == "s3" and cfg.plan_ahead and seeds:
            # Planning ahead, every worker has a seed schedule while the first stage is planned
            # from the seed phase's first part: random ones fill the phase to 2 x concurrency.
            for i in range(max(0, min(2 * cfg.concurrency, cfg.budget) - len(seeds))):
                nfe = cfg.nfe[i % len(cfg.nfe)]
                seeds.append((random_schedule_at_nfe(self.rng, self.noise, nfe, cfg.decisions, cfg.operators), "random",
                              None))
        for s, source, label in seeds:
            p = self._proposal(s, source, -1, baseline=label)
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

    @staticmethod
    def _pool(results: list[dict]) -> dict[int, list[tuple[SolverSchedule, float]]]:
        pool = defaultdict(list)
        for r in results:
            pool[r["nfe"]].append((SolverSchedule.from_json(r["schedule"]), r["score"]))
        return pool

    def _mutants(self, n: int, stage: int, source: str, results: list[dict] | None = None,
                 rng: np.random.Generator | None = None, seen: set | None = None) -> list[dict]:
        """Up to ``n`` new (unseen) evolutionary proposals with target NFEs drawn from the range,
        bred from ``results`` (default: all) with ``rng`` and ``seen`` (default: the searcher's)."""
        rng = self.rng if rng is None else rng
        seen = self.seen if seen is None else seen
        pool, out, tries = self._pool(self._ordered_results() if results is None else results), [], 0
        allowed = set(self.cfg.nfe)
        while len(out) < n and tries < 20 * n + 100:
            tries += 1
            target = int(rng.choice(self.cfg.nfe))
            s = propose(rng, pool, target, self.noise, self.cfg.decisions, self.cfg.operators, allowed)
            p = self._proposal(s, source, stage, seen)
            if p is not None:
                out.append(p)
        return out

    def _plan(self, stage: int, results: list[dict], rng: np.random.Generator, seen: set) -> tuple[list[dict], dict]:
        """Stage ``stage``'s proposals: retrain the predictor on ``results`` (in suggestion order),
        rank many mutants, keep the top ones. Uses and advances ``rng`` and ``seen`` only, so it
        can run on copies beside the search (``plan_ahead``). Returns (chosen, bookkeeping).

        The predictor's quality is measured after the search (``predictor_quality``), so that
        planning does only what the proposals need."""
        budget = self.stage_budgets[stage]
        survivors = screen_split(budget, self.cfg.screen) if self.cfg.screen else 0
        n_choose = survivors * self.cfg.screen.factor if survivors else budget
        below = max((r["index"] for r in results), default=-1) + 1  # the training set: a subset of the results below
        results = training_subset(sorted(results, key=lambda r: r["index"]), self.cfg.predictor.max_train,
                                  self.cfg.seed + stage)
        schedules = [SolverSchedule.from_json(r["schedule"]) for r in results]
        predictor = PredictorEnsemble(self.cfg.predictor, self.noise, seed=self.cfg.seed + stage,
                                      encoding_cache=self._encodings)
        predictor.fit(schedules, [r["score"] for r in results])
        cands = self._mutants(max(self.cfg.predictor.candidates, n_choose), stage, "predictor", results, rng, seen)
        for c in cands:  # only the chosen ones stay "seen"
            seen.discard(c["schedule_hash"])
        acq, pred = predictor.acquire([SolverSchedule.from_json(c["schedule"]) for c in cands]) if cands else ([], [])
        by_nfe = defaultdict(list)
        for c, a, p in zip(cands, acq, pred):  # "predicted": the members' mean, what proposal_tau measures
            by_nfe[c["nfe"]].append((float(a), {**c, "predicted": float(p)}))
        for group in by_nfe.values():
            group.sort(key=lambda pc: pc[0])
        chosen = round_robin({nfe: [c for _, c in g] for nfe, g in by_nfe.items()}, n_choose)
        for c in chosen:
            seen.add(c["schedule_hash"])
        info = {"stage": stage, "n_train": len(results), "train_below": below, "candidates": len(cands),
                "chosen": len(chosen)}
        if survivors:  # "chosen" becomes the stage's full evaluations when they are known
            info.update(screened=len(chosen), survivors=min(survivors, len(chosen)))
        return chosen, info

    def _plan_stage(self):
        """Plan the next stage now, from every result (``plan_ahead = 0``: no trial is in flight)."""
        chosen, info = self._plan(self.stage + 1, self._ordered_results(), self.rng, self.seen)
        self._commit_stage(chosen, info)

    def _commit_stage(self, chosen: list[dict], info: dict):
        self.stage = info["stage"]
        self.taus.append(info)
        if "screened" not in info:
            self.queue.extend(chosen)
            return
        size, cost = self.cfg.screen.batch, self.cfg.screen.cost
        batches = [chosen[i : i + size] for i in range(0, len(chosen), size)]
        self.rung = {"stage": self.stage, "candidates": chosen, "survivors": info["survivors"], "trials": len(batches),
                     "scores": {}}
        for b in batches:
            hashes = [c["schedule_hash"] for c in b]
            self.queue.append({"screen": [c["schedule"] for c in b], "schedule_hashes": hashes,
                               "schedule_hash": hashlib.sha256(",".join(hashes).encode()).hexdigest(),
                               "nfe": None, "source": "screen", "stage": self.stage, "samples": self.cfg.screen.samples,
                               "seed": self.cfg.seed, "cost": len(b) * cost})

    def _promote(self) -> bool:
        """Queue the screening rung's survivors once all its results are in: per NFE the best by the
        screening score (ties: the predictor's order), shared round-robin as the stage's proposals
        were. False while a screening result is still out."""
        rung = self.rung
        if len(rung["scores"]) < rung["trials"]:
            return False
        scores = [x for key in sorted(rung["scores"], key=int) for x in rung["scores"][key]]
        by_nfe = defaultdict(list)
        for order, (c, sc) in enumerate(zip(rung["candidates"], scores)):
            by_nfe[c["nfe"]].append((sc, order, {**c, "screen_score": sc}))
        ranked = {nfe: [c for *_, c in sorted(g, key=lambda e: e[:2])] for nfe, g in by_nfe.items()}
        survivors = round_robin(ranked, rung["survivors"])
        kept = {c["schedule_hash"] for c in survivors}
        self.screened += [{"stage": rung["stage"], "nfe": c["nfe"], "schedule_hash": c["schedule_hash"],
                           "screen_score": sc, "predicted": c.get("predicted"), "survived": c["schedule_hash"] in kept}
                          for c, sc in zip(rung["candidates"], scores)]
        self.queue.extend(survivors)
        self.taus[-1]["chosen"] = len(survivors)
        self.rung = None
        return True

    # ---- planning ahead (plan_ahead > 0) ---------------------------------------------------------
    # The next stage is planned in a background thread from the results of every trial suggested
    # before the current phase's (seed phase, then each stage) last ``plan_ahead`` ones, but at
    # least its first one, as soon as those results are in, while the last trials run. Its inputs
    # (which results, the rng, the seen set) do not depend on the order results arrive in, and it
    # works on copies of the rng and seen set that are committed only when the phase's queue runs
    # out: a state saved before that replans the same stage when restored.
    def _maybe_plan_ahead(self):
        if (self.algo != "s3" or self.cfg.plan_ahead == 0 or self._plan_job is not None or self.rung is not None
                or self.stage + 1 >= len(self.stage_budgets)):
            return  # (a screening rung: the stage's full evaluations are not known yet)
        end = self.n_suggested + len(self.queue)  # the queue holds the rest of the current phase
        if self.spent + sum(p["cost"] for p in self.queue) >= self.cfg.budget - 1e-9:
            return  # no stage follows
        if self.stage >= 0:
            size = self.taus[-1]["chosen"]
            cutoff = max(end - self.cfg.plan_ahead, end - size + 1) if size else end  # at least the phase's first result
        else:  # the first stage trains on at least half of the seed phase
            cutoff = max(end - self.cfg.plan_ahead, (end + 1) // 2)
        if self._done_prefix < cutoff:
            return  # an earlier result is still out
        results = [r for r in self.results if r["index"] < cutoff]
        rng, seen = copy.deepcopy(self.rng), set(self.seen)
        job = self.submit_plan(self._plan, self.stage + 1, results, rng, seen)
        self._plan_job = (job, rng, seen)

    def _take_planned_stage(self) -> bool:
        """Commit the stage planned ahead if it is ready; False while it is still being planned."""
        self._maybe_plan_ahead()
        if self._plan_job is None:
            return False
        job, rng, seen = self._plan_job
        if not job.done() and self.pending:
            return False
        # (with nothing in flight there is nothing to overlap: wait here, not in Tune's 1-s polling)
        self._plan_job = None
        chosen, info = job.result()
        self.rng, self.seen = rng, seen
        self._commit_stage(chosen, info)
        return True

    # ---- the Searcher protocol -------------------------------------------------------------------
    def suggest(self, trial_id: str):
        self.waiting_for = None
        out = self._suggest(trial_id)
        if out is None:
            self.waiting_for = "planning" if self._plan_job is not None else "results"
        return out

    def _suggest(self, trial_id: str):
        if self.spent >= self.cfg.budget - 1e-9:
            return Searcher.FINISHED
        if not self.queue and self.rung is not None and not self._promote():
            return None  # a stage's full evaluations start when its screening results are in
        if not self.queue:
            if self.algo == "s3":
                if self.stage + 1 >= len(self.stage_budgets):
                    return Searcher.FINISHED
                if self.cfg.plan_ahead:
                    if not self._take_planned_stage():
                        return None  # the next stage is being planned, or waits for earlier results
                elif self.pending:
                    return None  # a stage starts when every earlier result is in
                else:
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
        self.spent += proposal.get("cost", 1.0)
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
        if "screen" in proposal:
            self._screen_complete(proposal, result, error)
            return
        score = result.get("score") if (result and not error) else None
        finite = score is not None and math.isfinite(score)
        failed = bool(error or not finite or result.get("failed"))
        value = float(score) if finite else self.cfg.metric.worst_score
        self.results.append({**proposal, "trial_id": trial_id, "score": value, "failed": failed})
        self._count_done(proposal["index"])
        if self.tpe is not None and "tpe" in proposal:
            self.tpe.tell(proposal["tpe"]["number"], proposal["tpe"]["params"], value)
        self._maybe_plan_ahead()

    def _screen_complete(self, proposal: dict, result: dict | None, error: bool):
        n, worst = len(proposal["screen"]), self.cfg.metric.worst_score
        scores = (result or {}).get("scores") if not error else None
        if not isinstance(scores, list) or len(scores) != n:
            scores = [worst] * n  # a failed screening trial: its schedules rank last
        scores = [float(x) if isinstance(x, (int, float)) and math.isfinite(x) else worst for x in scores]
        if self.rung is not None and self.rung["stage"] == proposal["stage"]:
            self.rung["scores"][str(proposal["index"])] = scores
        self._count_done(proposal["index"])
        self._maybe_plan_ahead()

    def _count_done(self, index: int):
        self._done_above.add(index)
        while self._done_prefix in self._done_above:
            self._done_above.remove(self._done_prefix)
            self._done_prefix += 1

    # ---- state ------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "config": self.cfg.model_dump(mode="json"), "algo": self.algo,
                "rng": self.rng.bit_generator.state, "queue": self.queue, "pending": self.pending,
                "results": self.results, "seen": sorted(self.seen), "n_suggested": self.n_suggested,
                "spent": self.spent, "rung": self.rung, "screened": self.screened,
                "stage": self.stage, "stage_budgets": self.stage_budgets, "taus": self.taus,
                "trial_settings": self.trial_settings, "tpe": self.tpe.get_state() if self.tpe else None}

    def set_state(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"searcher state version {state.get('version')} is not {STATE_VERSION}")
        self.cfg = SearchConfig.model_validate(state["config"])
        self.algo = state["algo"]
        self.noise = noise_for(self.cfg.model)
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.queue, self.pending, self.results = state["queue"], state["pending"], state["results"]
        self.seen, self.n_suggested = set(state["seen"]), state["n_suggested"]
        self.spent, self.rung, self.screened = state["spent"], state["rung"], state["screened"]
        self._done_prefix, self._done_above = 0, set()
        for r in self.results:
            if r["index"] >= 0:  # (warm results come before the search's first trial)
                self._count_done(r["index"])
        self.stage, self.stage_budgets, self.taus = state["stage"], state["stage_budgets"], state["taus"]
        self.trial_settings = state.get("trial_settings", {})
        self.tpe = TPEProposer(self.cfg, self.noise) if self.algo == "optuna-tpe" else None
        self._encodings, self._plan_job = {}, None
        if self.tpe is not None:
            self.tpe.set_state(state["tpe"])
        self._eval_settings = _eval_settings(self.cfg)

    def __getstate__(self):  # Tune pickles the searcher with the Tuner; a running plan stays behind
        return {**self.__dict__, "_plan_job": None, "_encodings": {}, "submit_plan": _submit_plan}

    def save(self, path: str):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.get_state(), f)
        os.replace(tmp, path)

    def restore(self, path: str):
        with open(path) as f:
            self.set_state(json.load(f))


def _eval_settings(cfg: SearchConfig) -> dict:
    """What every trial config carries besides its proposal."""
    out = {"model": cfg.model.model_dump_json(), "metric": cfg.metric.model_dump_json()}
    if cfg.synthetic is not None:
        out["synthetic"] = cfg.synthetic.model_dump_json()
    return out


@cache
def _executor() -> ThreadPoolExecutor:
    """The one thread that plans stages ahead (planning is mostly Python: one at a time)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-plan")


def training_subset(results: list[dict], cap: int, seed: int) -> list[dict]:
    """At most ``cap`` of ``results`` (in suggestion order) for the predictor, so that a stage's
    planning costs the same with 10,000 results as with ``cap``: per NFE in proportion to its share,
    the best quarter and a seeded sample of the rest (a function of the results, not of the order
    they arrived in)."""
    if len(results) <= cap:
        return results
    by_nfe = defaultdict(list)
    for i, r in enumerate(results):
        by_nfe[r["nfe"]].append(i)
    rng, keep = np.random.default_rng(seed), []
    for nfe in sorted(by_nfe):
        idx = by_nfe[nfe]
        k = max(2, round(cap * len(idx) / len(results)))
        order = sorted(idx, key=lambda i: (results[i]["score"], i))
        best = order[: k // 4]
        rest = order[k // 4:]
        keep += best + [rest[j] for j in rng.choice(len(rest), size=min(k - len(best), len(rest)), replace=False)]
    return [results[i] for i in sorted(keep)]


def load_saved_state(tune_dir) -> dict:
    """The searcher's last saved state in a run's ``tune/`` directory (JSON, despite Tune's file
    name). ValueError when there is none or it is unreadable."""
    from pathlib import Path

    files = sorted(Path(tune_dir).glob("searcher-state-*.pkl"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise ValueError(f"{tune_dir} holds no finished search (no searcher-state-*.pkl)")
    try:
        return json.loads(files[-1].read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{files[-1]} is not a searcher state ({e})") from None


def screen_split(budget: float, screen) -> int:
    """Full evaluations of a screened stage with cost budget ``budget``: the most s with
    s + factor * s * cost <= budget (0: too small a stage to screen)."""
    s = int(budget // (1 + screen.factor * screen.cost))
    while s > 0 and s + s * screen.factor * screen.cost > budget + 1e-9:
        s -= 1
    return s


def round_robin(by_nfe: dict[int, list[dict]], n: int) -> list[dict]:
    """Up to ``n`` items taken round-robin over NFEs (ascending), each NFE's list best first, so that
    every NFE gets its share."""
    chosen, depth = [], 0
    while len(chosen) < n and any(depth < len(g) for g in by_nfe.values()):
        for nfe in sorted(by_nfe):
            if depth < len(by_nfe[nfe]) and len(chosen) < n:
                chosen.append(by_nfe[nfe][depth])
        depth += 1
    return chosen


def _submit_plan(fn, *args):
    return _executor().submit(fn, *args)


def predictor_quality(state: dict) -> list[dict]:
    """Per-stage predictor quality from a searcher state (``get_state()`` or its saved JSON),
    measured after the search so that no trial waits for it. For stage k:

    - ``kendall_tau``: held-out Kendall tau of a predictor trained like stage k's (same settings and
      seed) on a seeded, NFE-stratified 75 % of the results stage k trained on, tested on the rest;
    - ``proposal_tau``: tau between stage k's predictions for the schedules it chose and their
      measured scores (schedules that predictor never saw; all of them top-ranked candidates);
    - with screening, ``predicted_vs_screen_tau`` (predictions vs screening scores, every screened
      schedule) and ``screen_vs_full_tau`` (screening vs full scores of the survivors).
    Both are means of per-NFE taus weighted by group size (NaN where no group has 3 items)."""
    if state.get("algo") != "s3":
        return []
    cfg = SearchConfig.model_validate(state["config"])
    noise = noise_for(cfg.model)
    results = sorted(state["results"], key=lambda r: r["index"])
    encodings: dict = {}  # the stages' training sets overlap: encode each schedule once
    out = []
    for t in state["taus"]:
        k = t["stage"]
        if "train_below" in t:  # the stage's own training set (capped by predictor.max_train)
            trained = training_subset([r for r in results if r["index"] < t["train_below"]], cfg.predictor.max_train,
                                      cfg.seed + k)
        else:  # a state from before train_below: right unless max_train capped the set
            trained = results[: t["n_train"]]
        tau = heldout_tau([SolverSchedule.from_json(r["schedule"]) for r in trained], [r["score"] for r in trained],
                          cfg.predictor, noise, seed=cfg.seed + k, encoding_cache=encodings)
        own = [r for r in results if r.get("stage") == k and "predicted" in r]
        ptau = per_nfe_tau(np.array([r["nfe"] for r in own]), np.array([r["predicted"] for r in own]),
                           np.array([r["score"] for r in own])) if own else float("nan")
        row = {**t, "kendall_tau": float(tau), "proposal_tau": float(ptau), "n_evaluated": len(own)}
        screened = [x for x in state.get("screened", []) if x["stage"] == k]
        if screened:  # how the cheap fidelity ranked: against the predictor, and against the full score
            row["predicted_vs_screen_tau"] = float(per_nfe_tau(*(np.array([x[f] for x in screened], float)
                                                                 for f in ("nfe", "predicted", "screen_score"))))
            full = [r for r in own if "screen_score" in r]
            row["screen_vs_full_tau"] = float(per_nfe_tau(*(np.array([r[f] for r in full], float)
                                                            for f in ("nfe", "screen_score", "score")))) if full else float("nan")
        out.append(row)
    return out
