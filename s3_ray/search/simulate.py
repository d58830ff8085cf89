"""A discrete-event simulation of a search (a benchmark tool): the real ``S3Searcher`` driven by a
simulated clock, with ``workers`` trial slots and no Ray, so that 1024 workers can be studied on a
laptop. Trials last their synthetic durations (``synthetic.trial_duration``: the same as in a real
run of the same search) and score their schedule on the ``gmm`` model for real; the searcher's own
calls and its stage planning cost their measured CPU time on the simulated clock (what they cost on a
core of their own, whatever else runs on this machine; planning ahead runs beside the search, like
the real planning thread). A trial's slot is free again
``turnaround_s`` after the trial ends (Tune's turnaround, measured in a real run).

``utilisation`` reads a timeline (trial intervals + the searcher's waits) the same way for a
simulation and for a real run (``benchmarks/scale.py``)."""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from ray.tune.search import Searcher

from s3_ray.config import SearchConfig, SyntheticConfig
from s3_ray.search.searcher import S3Searcher
from s3_ray.search.synthetic import trial_duration

_cpu = time.thread_time  # the simulated cost of the searcher's own work: this thread's CPU seconds


@dataclass
class Timeline:
    """What happened: busy intervals per trial (start, end), the searcher's waits (start, end, why:
    'results' = a stage waits for earlier results, 'planning' = for its planning), and the
    CPU time of each searcher decision (suggest / on_trial_complete, planning excluded)."""

    workers: int
    trials: list[tuple[float, float]] = field(default_factory=list)
    waits: list[tuple[float, float, str]] = field(default_factory=list)
    decision_s: list[float] = field(default_factory=list)
    proposals: list[str] = field(default_factory=list)  # schedule hashes in suggestion order
    best: dict[int, float] = field(default_factory=dict)  # NFE -> the best score found
    planning_s: float = 0.0


class WaitLog:
    """Turns the reason of each suggest call (None while it proposed) into wait intervals."""

    def __init__(self, waits: list):
        self.waits, self.since, self.why = waits, None, None

    def saw(self, now: float, why: str | None):
        if why == self.why:
            return
        if self.why is not None:
            self.waits.append((self.since, now, self.why))
        self.since, self.why = now, why


class _SimClock:
    def __init__(self):
        self.now = 0.0
        self.excluded = 0.0  # planning time run inside a decision call (not the decision's own cost)
        self.planning = 0.0
        self.credit = 0.0  # of a planning job's measured time, what its parallel parts save


def _sim_map(clock: _SimClock, workers: int):
    """The searcher's ``map_parallel`` on ``workers`` simulated processes: the items run here one
    after another; the job that called it is charged the longest process's share, not their sum."""

    def run(fn, cfg, noise, items):
        lanes, out = [0.0] * workers, []
        for x in items:
            t0 = _cpu()
            out.append(fn(cfg, noise, x))
            i = min(range(workers), key=lanes.__getitem__)
            lanes[i] += _cpu() - t0
        clock.credit += sum(lanes) - max(lanes, default=0.0)
        return out

    return run


class _SimFuture:
    """A planning job: computed at once, ready on the simulated clock after its measured time, on
    the first of ``lanes`` (the planning processes' next free times) that is free."""

    def __init__(self, clock: _SimClock, fn, args, lanes: list[float] | None = None):
        t0, clock.credit = _cpu(), 0.0
        self.value = fn(*args)
        elapsed = _cpu() - t0 - clock.credit
        clock.excluded += elapsed + clock.credit  # (all of it ran here, outside the decision)
        clock.planning += elapsed
        self.clock, self.ready_at = clock, clock.now + elapsed
        if lanes is not None:
            i = min(range(len(lanes)), key=lanes.__getitem__)
            self.ready_at = lanes[i] = max(clock.now, lanes[i]) + elapsed

    def done(self) -> bool:
        return self.clock.now >= self.ready_at

    def result(self):
        self.clock.now = max(self.clock.now, self.ready_at)  # the driver waits for it
        return self.value


def simulate(cfg: SearchConfig, workers: int, *, algo: str = "s3", turnaround_s: float = 0.0,
             completion_order=None) -> Timeline:
    """Run the search ``cfg`` (its ``synthetic`` trial settings) on ``workers`` simulated slots.
    ``completion_order(trial_ids) -> trial id`` overrides which running trial ends next (tests)."""
    from s3_ray.metrics.evaluate import evaluate, get_target
    from s3_ray.usf.schedule import SolverSchedule

    synthetic = cfg.synthetic or SyntheticConfig()
    clock, tl = _SimClock(), Timeline(workers)
    searcher = S3Searcher(cfg, algo=algo)
    lanes = [0.0] * cfg.plan_workers
    searcher.submit_plan = lambda fn, *args: _SimFuture(clock, fn, args)
    searcher.submit_chunk = lambda fn, *args: _SimFuture(clock, fn, args, lanes)
    searcher.map_parallel = _sim_map(clock, cfg.plan_workers)
    target = None
    running: list[tuple[float, int, str, dict, float]] = []  # heap of (slot free at, seq, trial id, config, start)
    waits, free, seq, finished = WaitLog(tl.waits), workers, 0, False

    def call(fn, *args):
        clock.excluded = 0.0
        t0 = _cpu()
        out = fn(*args)
        own = _cpu() - t0 - clock.excluded
        tl.decision_s.append(own)
        clock.now += own  # the driver's loop is busy meanwhile
        return out

    while True:
        while free > 0 and not finished:
            trial_id = f"t{seq:06d}"
            config = call(searcher.suggest, trial_id)
            if config is Searcher.FINISHED:
                finished = True
                break
            waits.saw(clock.now, searcher.waiting_for)
            if config is None:
                break
            duration = trial_duration(synthetic, config["trial_key"], int(config["seed"]))
            heapq.heappush(running, (clock.now + duration + turnaround_s, seq, trial_id, config, clock.now))
            tl.trials.append((clock.now, clock.now + duration))
            tl.proposals.append(config["schedule_hash"])
            seq, free = seq + 1, free - 1
        job = searcher.plan_future()
        if not running:
            if finished or job is None:
                break
            clock.now = max(clock.now, job.ready_at)  # nothing runs: wait for the plan
            continue
        if free > 0 and not finished and job is not None and clock.now <= job.ready_at < running[0][0]:
            clock.now = job.ready_at  # a slot waits for a plan that is now ready
            continue
        if completion_order is not None:
            pick = completion_order([r[2] for r in running])
            item = next(r for r in running if r[2] == pick)
            running.remove(item)
            heapq.heapify(running)
        else:
            item = heapq.heappop(running)
        free_at, _, trial_id, config, _ = item
        clock.now = max(clock.now, free_at)
        if target is None:
            target = get_target(config["model"], config["metric"])
        result = evaluate(SolverSchedule.from_json(config["schedule"]), target, n=int(config["samples"]),
                          seed=int(config["seed"]))
        call(searcher.on_trial_complete, trial_id, result)
        free += 1
    waits.saw(clock.now, None)
    tl.planning_s = clock.planning
    for r in (r for r in searcher.results if not r["failed"]):
        tl.best[r["nfe"]] = min(tl.best.get(r["nfe"], float("inf")), r["score"])
    return tl


def utilisation(tl: Timeline) -> dict:
    """Worker utilisation in the steady window, from the time every slot has started a trial to the
    start of the last trial (before: start-up; after: the budget is spent and slots drain), and the
    idle slot-seconds in it by cause: 'stage barrier' (the searcher waits for earlier results),
    'planning' (for a stage's planning), 'turnaround' (the rest: from a trial's end to its slot's
    next start: Tune, tracking, the searcher's calls)."""
    starts = sorted(s for s, _ in tl.trials)
    if len(starts) < tl.workers + 1:
        return {"utilisation": float("nan"), "window_s": 0.0, "idle_share": {}}
    t0, t1 = starts[tl.workers - 1], starts[-1]
    edges = sorted({t0, t1, *(t for s, e in tl.trials for t in (s, e) if t0 < t < t1),
                    *(t for a, b, _ in tl.waits for t in (a, b) if t0 < t < t1)})
    # busy count per segment via a sweep over +1/-1 events
    events = sorted([(s, 1) for s, _ in tl.trials] + [(e, -1) for _, e in tl.trials])
    waits = sorted(tl.waits)
    busy_s, idle = 0.0, {"stage barrier": 0.0, "planning": 0.0, "turnaround": 0.0}
    busy, ei, wi = 0, 0, 0
    for a, b in zip(edges, edges[1:]):
        while ei < len(events) and events[ei][0] <= a:
            busy += events[ei][1]
            ei += 1
        while wi < len(waits) and waits[wi][1] <= a:
            wi += 1
        why = waits[wi][2] if wi < len(waits) and waits[wi][0] <= a else None  # waits do not overlap
        dt = b - a
        busy_s += min(busy, tl.workers) * dt
        cause = {"results": "stage barrier", "planning": "planning"}.get(why, "turnaround")
        idle[cause] += max(tl.workers - busy, 0) * dt
    slot_s = tl.workers * (t1 - t0)
    return {"utilisation": busy_s / slot_s if slot_s else float("nan"), "window_s": t1 - t0,
            "trials_in_window": sum(1 for s in starts if t0 <= s <= t1),
            "idle_share": {k: v / slot_s for k, v in idle.items()} if slot_s else {}}
