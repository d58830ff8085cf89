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
converged solve from the same noise, or with ``screen.fidelity: metric`` by the search metric on
those samples, drawn from noise seed ``seed + SCREEN_SEED_OFFSET``); once every screening result of the stage is in, the best
1 / factor per NFE by that score go to full evaluation. Budgets are counted in cost: a full
evaluation costs 1, a screened schedule ``screen.cost``.

It runs (and is tested) without a Ray cluster: Tune only calls ``suggest``/``on_trial_complete``/
``save``/``restore``. ``suggest`` returns the trial config: the schedule as canonical JSON plus the
evaluation settings (model and metric configs, sample count, noise seed).
"""

from __future__ import annotations

import atexit
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
from s3_ray.search.predictor import PredictorEnsemble, encode_many, heldout_tau, per_nfe_tau
from s3_ray.search.seed_baselines import baseline_schedules
from s3_ray.search.space import propose, random_schedule_at_nfe
from s3_ray.search.tpe import TPEProposer
from s3_ray.usf.schedule import SolverSchedule, load_schedule

ALGOS = ("s3", "evolution", "random", "optuna-tpe")
STATE_VERSION = 2
# Metric screening draws its noise apart from the full evaluations': survivors picked for a lucky
# screening draw would otherwise carry that luck into their full score (shared samples).
SCREEN_SEED_OFFSET = 100_000


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
        self._plan_job: StagePlan | None = None  # the stage being planned (not saved: _stream replans it)
        self._stream: dict | None = None  # a streamed stage's remaining chunks, for a restore
        self._fitted: dict[int, PredictorEnsemble] = {}  # the last two stages' predictors (predictor.refit_epochs)
        self.submit_plan = _submit_plan  # fits a stage's predictor beside the search (a simulation's clock)
        self.submit_chunk = _submit_chunk  # makes a chunk's proposals (plan_workers processes)
        self.map_parallel = _map_parallel  # a fit's encodings on the planning processes
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
        return make_proposal(self.cfg, s, source, stage, self.seen if seen is None else seen, baseline)

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
            # from the seed phase's first part: random ones fill the phase to 2 x concurrency
            # (+ plan_lag: room for the first wave's stragglers).
            for i in range(max(0, min(2 * cfg.concurrency + cfg.plan_lag, cfg.budget) - len(seeds))):
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

    def _mutants(self, n: int, stage: int, source: str) -> list[dict]:
        """Up to ``n`` new (unseen) evolutionary proposals bred from every result (``evolution``)."""
        return breed(self.cfg, self.noise, breeding_pool(self._ordered_results()), n, stage, source, self.rng, self.seen)

    # ---- S3 stages: a fit, then chunks ------------------------------------------------------------
    # A stage is planned in two steps: the predictor is fit on the stage's training set (on the
    # planning thread), then the stage's proposals are made in chunks of at most ``plan_chunk``,
    # each from its own seed (drawn from the searcher's rng when the stage starts) and its share of
    # the candidates, on ``plan_workers`` processes. Chunks are queued in chunk order as each is
    # ready, so workers start on a stage's first chunk while the rest is planned, and the proposals
    # do not depend on which chunk finished first or on the order results arrived in. A chunk's
    # schedules already proposed (by an earlier chunk) are replaced by its next-ranked candidates.
    def _stage_shape(self, stage: int) -> tuple[int, int, list[list[int]]]:
        """(proposals to choose, screening survivors (0: no screening), per chunk (candidates, proposals))."""
        budget = self.stage_budgets[stage]
        survivors = screen_split(budget, self.cfg.screen) if self.cfg.screen else 0
        n_choose = survivors * self.cfg.screen.factor if survivors else budget
        n_cands = max(self.cfg.predictor.candidates, n_choose)
        # chunk sizes grow from plan_chunk / 8, doubling, to plan_chunk: the first proposals come soon
        sizes, size = [], max(1, self.cfg.plan_chunk // 8)
        while sum(sizes) < n_choose:
            sizes.append(min(size, n_choose - sum(sizes)))
            size = min(2 * size, self.cfg.plan_chunk)
        sizes = sizes or [0]
        # candidates in proportion; a few spare ones replace a chunk's duplicates of earlier chunks' proposals
        bounds = [round(n_cands * x / max(n_choose, 1)) for x in np.cumsum([0, *sizes])]
        return n_choose, survivors, [[max(b - a, m + m // 32 + 2), m] for a, b, m in zip(bounds, bounds[1:], sizes)]

    def _fit_stage(self, stage: int, results: list[dict], start_from: PredictorEnsemble | None = None,
                   ) -> tuple[PredictorEnsemble, dict, dict]:
        """Stage ``stage``'s predictor, trained on (a capped subset of) ``results`` in suggestion
        order (from ``start_from``: an incremental update), the schedules' encodings not yet cached
        made on the planning processes first; returns it, the breeding pool (the training set) and
        the stage's bookkeeping.

        The predictor's quality is measured after the search (``predictor_quality``), so that
        planning does only what the proposals need."""
        survivors = self._stage_shape(stage)[1]
        below = max((r["index"] for r in results), default=-1) + 1  # the training set: a subset of the results below
        train = training_subset(sorted(results, key=lambda r: r["index"]), self.cfg.predictor.max_train,
                                self.cfg.seed + stage)
        missing = list({r["schedule_hash"]: r["schedule"] for r in train if r["schedule_hash"] not in self._encodings}.items())
        k = min(self.cfg.plan_workers, math.ceil(len(missing) / 64))
        bounds = np.cumsum([0, *_split(len(missing), k)]) if k else [0]
        parts = [missing[a:b] for a, b in zip(bounds, bounds[1:])]
        for part, x in zip(parts, self.map_parallel(encode_chunk, self.cfg, self.noise, [[j for _, j in p] for p in parts])):
            self._encodings.update(zip([h for h, _ in part], x))
        predictor = PredictorEnsemble(self.cfg.predictor, self.noise, seed=self.cfg.seed + stage,
                                      encoding_cache=self._encodings)
        predictor.fit([SolverSchedule.from_json(r["schedule"]) for r in train], [r["score"] for r in train], start_from)
        info = {"stage": stage, "n_train": len(train), "train_below": below, "candidates": 0, "chosen": 0}
        if survivors:  # "chosen" becomes the stage's full evaluations when they are known
            info.update(screened=0, survivors=survivors)
        return predictor, breeding_pool(train), info

    def _start_plan(self, stage: int, cutoff: int):
        """Start planning stage ``stage`` from the results with index < ``cutoff`` (all of them in),
        on copies of the rng and the seen set that the stage's first chunk commits."""
        rng = copy.deepcopy(self.rng)
        shares = self._stage_shape(stage)[2]
        seeds = [int(x) for x in rng.integers(0, 2**63 - 1, size=len(shares))]
        self._plan_job = StagePlan(stage, cutoff, seeds, shares, rng, set(self.seen), taken=0)
        self._plan_job.fit = self.submit_plan(self._fit_stage, stage, self._results_below(cutoff), self._start_from(stage))

    def _results_below(self, cutoff: int) -> list[dict]:
        return [r for r in self.results if r["index"] < cutoff]

    def _start_from(self, stage: int) -> PredictorEnsemble | None:
        """What stage ``stage``'s fit starts from: the previous stage's predictor with
        ``predictor.refit_epochs``, else nothing (from scratch)."""
        return self._fitted.get(stage - 1) if self.cfg.predictor.refit_epochs else None

    def _resume_stream(self):
        """After a restore in the middle of a streamed stage: plan its remaining chunks again (the
        same fit, seeds and seen set as before, so the same proposals)."""
        st = self._stream
        seen = self.seen - set(st["merged"])
        self._plan_job = StagePlan(st["stage"], st["cutoff"], st["seeds"], st["shares"], None,
                                   seen, taken=st["taken"], merged=list(st["merged"]))
        self._plan_job.fit = self.submit_plan(self._fit_stage, st["stage"], self._results_below(st["cutoff"]),
                                              self._start_from(st["stage"]))

    def _advance_plan(self, wait: bool) -> bool:
        """Move the stage being planned on: start its chunks once its predictor is fit, queue its
        ready chunks in order (the first one commits the stage). ``wait``: block for the next piece.
        True when it took a chunk."""
        if self._plan_job is None and self._stream is not None:
            self._resume_stream()
        job = self._plan_job
        if job is None:
            return False
        if job.chunks is None:
            if not (wait or job.fit.done()):
                return False
            predictor, pool, info = job.fit.result()
            if self.cfg.predictor.refit_epochs:  # the next stage's fit starts from it
                self._fitted = {k: p for k, p in self._fitted.items() if k == job.stage - 1} | {job.stage: predictor}
            job.info = self.taus[-1] if self._stream is not None else info
            job.chunks = [None if j < job.taken else
                          self.submit_chunk(plan_chunk, self.cfg, self.noise, predictor, pool, job.stage, seed, job.seen,
                                            n_cands)
                          for j, (seed, (n_cands, _)) in enumerate(zip(job.seeds, job.shares))]
        if self.cfg.screen is not None:  # a screening rung needs the whole stage: no streaming
            if not (wait or all(f.done() for f in job.chunks)):
                return False
            for j in range(len(job.chunks)):
                self._take_chunk(job, *job.chunks[j].result(), commit=False)
            self._plan_job, info = None, job.info
            info.update(screened=len(job.chosen), survivors=min(info["survivors"], len(job.chosen)))
            self._commit_stage(job.chosen, info)
            return True
        took = False
        while job.taken < len(job.chunks) and (job.chunks[job.taken].done() or (wait and not took)):
            self._take_chunk(job, *job.chunks[job.taken].result(), commit=True)
            took = True
        if job.taken == len(job.chunks):
            self._plan_job, self._stream = None, None
        return took

    def _take_chunk(self, job: StagePlan, ranked: list[dict], n_cands: int, commit: bool):
        """Chunk ``job.taken``'s share of ``ranked`` (best first), skipping schedules already proposed."""
        if job.rng is not None:  # the stage's first chunk: commit the stage
            self.rng, job.rng = job.rng, None
            if commit:
                self.stage = job.stage
                self.taus.append(job.info)
        want, chosen = job.shares[job.taken][1], []
        for c in ranked:
            if len(chosen) == want:
                break
            if c["schedule_hash"] not in self.seen:
                self.seen.add(c["schedule_hash"])
                chosen.append(c)
        job.info["candidates"] += n_cands
        job.info["chosen"] += len(chosen)
        job.taken += 1
        if commit:  # what a restore needs to plan the stage's remaining chunks again
            self.queue.extend(chosen)
            job.merged += [c["schedule_hash"] for c in chosen]
            self._stream = {"stage": job.stage, "cutoff": job.cutoff, "seeds": job.seeds, "shares": job.shares,
                            "taken": job.taken, "merged": job.merged}
        else:
            job.chosen += chosen

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
                               "fidelity": self.cfg.screen.fidelity, "seed": self._screen_seed(), "cost": len(b) * cost})

    def _screen_seed(self) -> int:
        return self.cfg.seed + (SCREEN_SEED_OFFSET if self.cfg.screen.fidelity == "metric" else 0)

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
    # The next stage is planned beside the search from the results of every trial suggested
    # before the current phase's (seed phase, then each stage) last ``plan_ahead`` ones, but at
    # least its first one, as soon as those results are in, while the last trials run. Its inputs
    # (which results, the rng, the seen set) do not depend on the order results arrive in, and it
    # works on copies of the rng and seen set that its first chunk commits: a state saved before
    # that replans the same stage when restored (after it, ``_stream`` replans the rest).
    def _maybe_plan_ahead(self):
        if (self.algo != "s3" or self.cfg.plan_ahead == 0 or self._plan_job is not None or self._stream is not None
                or self.rung is not None or self.stage + 1 >= len(self.stage_budgets)):
            return  # (a screening rung: the stage's full evaluations are not known yet)
        end = self.n_suggested + len(self.queue)  # the queue holds the rest of the current phase
        if self.spent + sum(p["cost"] for p in self.queue) >= self.cfg.budget - 1e-9:
            return  # no stage follows
        if self.stage >= 0:
            size, prev = self.taus[-1]["chosen"], self.taus[-1].get("train_below", 0)
            # at least the phase's first result, or with plan_lag one more than the current stage's
            cutoff = max(end - self.cfg.plan_ahead, end - size + 1 - self.cfg.plan_lag, prev + 1) if size else end
        else:  # the first stage trains on at least half of the seed phase (with plan_lag, less)
            least = max((end + 1) // 2 - self.cfg.plan_lag // 2, min(end, self.cfg.concurrency))
            cutoff = max(end - self.cfg.plan_ahead, least)
        if self._done_prefix < cutoff:
            return  # an earlier result is still out
        self._start_plan(self.stage + 1, cutoff)

    def _next_stage(self):
        """Queue the S3 stages' next proposals: True when queued, False when not ready yet (ask
        again later), ``Searcher.FINISHED`` when no stage follows."""
        while not self.queue:
            if self._plan_job is None and self._stream is None:  # no stage is being planned
                if self.stage + 1 >= len(self.stage_budgets):
                    return Searcher.FINISHED
                if self.cfg.plan_ahead:
                    self._maybe_plan_ahead()
                elif not self.pending:  # a stage starts when every earlier result is in
                    self._start_plan(self.stage + 1, self.n_suggested)
                if self._plan_job is None:
                    return False  # it waits for earlier results
            # (with nothing in flight there is nothing to overlap: wait here, not in Tune's 1-s polling)
            if not self._advance_plan(wait=not self.pending):
                return False
        return True

    def plan_future(self):
        """The future the stage being planned waits for next (None: no stage is being planned)."""
        return self._plan_job.next_future() if self._plan_job is not None else None

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
                ready = self._next_stage()
                if ready is not True:
                    return None if ready is False else ready
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
        self._on_result()

    def _on_result(self):
        """Start the next stage's planning, or its chunks, as soon as it can."""
        self._maybe_plan_ahead()
        if self._plan_job is not None and self.cfg.plan_ahead:
            self._advance_plan(wait=False)

    def _screen_complete(self, proposal: dict, result: dict | None, error: bool):
        n, worst = len(proposal["screen"]), self.cfg.metric.worst_score
        scores = (result or {}).get("scores") if not error else None
        if not isinstance(scores, list) or len(scores) != n:
            scores = [worst] * n  # a failed screening trial: its schedules rank last
        scores = [float(x) if isinstance(x, (int, float)) and math.isfinite(x) else worst for x in scores]
        if self.rung is not None and self.rung["stage"] == proposal["stage"]:
            self.rung["scores"][str(proposal["index"])] = scores
        self._count_done(proposal["index"])
        self._on_result()

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
                "stage": self.stage, "stage_budgets": self.stage_budgets, "taus": self.taus, "stream": self._stream,
                "fitted": {str(k): p.state_dict() for k, p in self._fitted.items()},
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
        self._stream = state.get("stream")
        self.trial_settings = state.get("trial_settings", {})
        self.tpe = TPEProposer(self.cfg, self.noise) if self.algo == "optuna-tpe" else None
        self._encodings, self._plan_job = {}, None
        self._fitted = {int(k): PredictorEnsemble.from_state(p, self.cfg.predictor, self.noise, self._encodings)
                        for k, p in state.get("fitted", {}).items()}
        if self.tpe is not None:
            self.tpe.set_state(state["tpe"])
        self._eval_settings = _eval_settings(self.cfg)

    def __getstate__(self):  # Tune pickles the searcher with the Tuner; a running plan stays behind
        return {**self.__dict__, "_plan_job": None, "_encodings": {}, "submit_plan": _submit_plan,
                "submit_chunk": _submit_chunk, "map_parallel": _map_parallel}

    def save(self, path: str):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.get_state(), f)
        os.replace(tmp, path)

    def restore(self, path: str):
        with open(path) as f:
            self.set_state(json.load(f))


class StagePlan:
    """A stage being planned: its predictor's fit (a future), then one future per chunk, taken in
    chunk order; ``rng`` and ``seen`` are the searcher's copies the stage's first chunk commits."""

    def __init__(self, stage: int, cutoff: int, seeds: list[int], shares: list[list[int]], rng, seen: set,
                 taken: int = 0, merged: list[str] | None = None):
        self.stage, self.cutoff, self.seeds, self.shares = stage, cutoff, seeds, shares
        self.rng, self.seen, self.taken = rng, seen, taken
        self.merged = merged or []  # hashes queued by the stage's chunks so far
        self.fit, self.chunks, self.info = None, None, None
        self.chosen: list[dict] = []  # a screened stage's proposals, gathered until all chunks are in

    def next_future(self):
        return self.fit if self.chunks is None else self.chunks[self.taken]


def make_proposal(cfg: SearchConfig, s: SolverSchedule, source: str, stage: int, seen: set,
                  baseline: str | None = None) -> dict | None:
    """A trial's config for ``s`` (None when its hash is in ``seen``; else added to it)."""
    h = s.schedule_hash()
    if h in seen:
        return None
    seen.add(h)
    samples = cfg.metric.samples[min(max(stage, 0), len(cfg.metric.samples) - 1)]
    config = {"schedule": s.to_json(), "schedule_hash": h, "nfe": s.nfe(), "source": source, "stage": stage,
              "samples": samples, "seed": cfg.seed, "cost": 1.0}
    if baseline is not None:
        config["baseline"] = baseline
    return config


def breeding_pool(results: list[dict]) -> dict[int, list[tuple[SolverSchedule, float]]]:
    """NFE -> [(schedule, score)] of ``results``, in their order: what ``breed`` draws parents from."""
    pool = defaultdict(list)
    for r in results:
        pool[r["nfe"]].append((SolverSchedule.from_json(r["schedule"]), r["score"]))
    return dict(pool)


def breed(cfg: SearchConfig, noise, pool: dict, n: int, stage: int, source: str, rng: np.random.Generator,
          seen: set) -> list[dict]:
    """Up to ``n`` new (not in ``seen``) evolutionary proposals with target NFEs drawn from the
    range, bred from ``pool`` (``breeding_pool``) with ``rng``."""
    out, tries, allowed = [], 0, set(cfg.nfe)
    while len(out) < n and tries < 20 * n + 100:
        tries += 1
        target = int(rng.choice(cfg.nfe))
        s = propose(rng, pool, target, noise, cfg.decisions, cfg.operators, allowed)
        p = make_proposal(cfg, s, source, stage, seen)
        if p is not None:
            out.append(p)
    return out


def plan_chunk(cfg: SearchConfig, noise, predictor: PredictorEnsemble, pool: dict, stage: int, seed: int,
               seen: set, n_cands: int) -> tuple[list[dict], int]:
    """One chunk of a stage: ``n_cands`` mutants bred from ``pool`` not in ``seen``, from ``seed``,
    ranked by the predictor's acquisition within each NFE and interleaved over NFEs (best first).
    Returns (ranked proposals, candidates made). A pure function of its arguments: it runs in a
    planning process or thread."""
    rng, seen = np.random.default_rng(seed), set(seen)
    cands = breed(cfg, noise, pool, n_cands, stage, "predictor", rng, seen)
    acq, pred = predictor.acquire([SolverSchedule.from_json(c["schedule"]) for c in cands]) if cands else ([], [])
    by_nfe = defaultdict(list)
    for order, (c, a, p) in enumerate(zip(cands, acq, pred)):  # "predicted": the members' mean (proposal_tau)
        by_nfe[c["nfe"]].append((float(a), order, {**c, "predicted": float(p)}))
    ranked = {nfe: [c for *_, c in sorted(g, key=lambda e: e[:2])] for nfe, g in by_nfe.items()}
    return round_robin(ranked, len(cands)), len(cands)


def encode_chunk(cfg: SearchConfig, noise, schedules: list[str]) -> list[np.ndarray]:
    """The predictor's encodings of schedules (JSON), in a planning process or thread."""
    return list(encode_many([SolverSchedule.from_json(j) for j in schedules], noise, cfg.predictor.max_steps,
                            cfg.predictor.probes))


def _split(n: int, k: int) -> list[int]:
    """``n`` in ``k`` near-equal parts, larger first."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


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


def _submit_chunk(fn, cfg: SearchConfig, *args):
    """A chunk on the planning thread (``plan_workers`` 1) or on the planning processes."""
    if cfg.plan_workers == 1:
        return _executor().submit(fn, cfg, *args)
    return _planning_processes(cfg.plan_workers).submit(fn, cfg, *args)


def _map_parallel(fn, cfg: SearchConfig, noise, items: list) -> list:
    """``fn(cfg, noise, item)`` for each item, on the planning processes (``plan_workers`` > 1)."""
    if cfg.plan_workers == 1 or len(items) < 2:
        return [fn(cfg, noise, x) for x in items]
    return list(_planning_processes(cfg.plan_workers).map(fn, *zip(*[(cfg, noise, x) for x in items])))


@cache
def _planning_processes(n: int):
    """``n`` planning processes (spawned: the driver runs Ray's threads), one torch thread each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread)
    atexit.register(pool.shutdown)
    return pool


def _one_thread():
    import torch

    torch.set_num_threads(1)


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
