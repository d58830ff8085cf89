"""Stages planned in chunks (``plan_chunk``), streamed into the queue in chunk order as each is
ready, on the planning thread or on planning processes (``plan_workers``): the proposals stay a
function of the seed and of which results exist, not of completion order, chunk timing or a restore."""

from concurrent.futures import Future

import pytest
import torch

from s3_ray.config import parse_config
from s3_ray.metrics.evaluate import evaluate, get_target
from s3_ray.search.searcher import S3Searcher
from s3_ray.search.simulate import simulate
from s3_ray.usf.schedule import SolverSchedule

from .test_searcher import CFG, _trace, run_concurrent
from .test_simulate import CFG as SIM_CFG
from .test_simulate import drive_in_order

CHUNKED = {**CFG, "plan_chunk": 7}  # stages of ~25 proposals: chunks of 1, 2, 4, 7, 7, 4
REFIT = {**CHUNKED, "stages": 3, "predictor": {**CFG["predictor"], "refit_epochs": 20}}  # incremental fits


@pytest.mark.parametrize("plan_ahead", [0, 5, 100])
def test_chunked_stages_do_not_depend_on_completion_order(plan_ahead):
    cfg = parse_config({**CHUNKED, "plan_ahead": plan_ahead})
    runs = []
    for order_seed in (1, 2):
        s = S3Searcher(cfg)
        run_concurrent(s, workers=3, order_seed=order_seed)
        assert len(s.results) == cfg.budget and s._plan_job is None and s._stream is None
        runs.append((_trace(s), s.taus))
    assert runs[0] == runs[1]
    trace, taus = runs[0]
    for k, t in enumerate(taus):
        size = sum(1 for *_, st in trace if st == k)
        assert t["chosen"] == size == s.stage_budgets[k]  # every chunk's share was filled
        assert t["candidates"] >= size


class HeldFuture(Future):
    """A planning job computed at once but reported done only when the test releases it."""

    def __init__(self, fn, args):
        super().__init__()
        self.value, self.released = fn(*args), False

    def done(self):
        return self.released

    def result(self, timeout=None):
        self.released = True
        return self.value


def test_a_stage_starts_on_its_first_chunk_while_the_rest_is_planned():
    cfg = parse_config({**CHUNKED, "plan_ahead": 0, "stages": 1, "budget": 41, "plan_chunk": 24})  # a stage of 21
    assert [m for _, m in S3Searcher(cfg)._stage_shape(0)[2]] == [3, 6, 12]  # from plan_chunk / 8, doubling
    s = S3Searcher(cfg)
    held = []
    s.submit_plan = s.submit_chunk = lambda fn, *args: held.append(HeldFuture(fn, args)) or held[-1]
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    seeds = [s.suggest(f"s{i}") for i in range(len(s.queue))]
    for i, c in enumerate(seeds):
        s.on_trial_complete(f"s{i}", evaluate(SolverSchedule.from_json(c["schedule"]), target, n=64))
    first = s.suggest("a")  # nothing in flight: it waits for the fit and the first chunk only
    assert first["stage"] == 0 and first["source"] == "predictor"
    fit, *chunks = held
    assert fit.released and len(chunks) == 3 and [c.released for c in chunks] == [True, False, False]
    got = [first] + [s.suggest(f"a{i}") for i in range(2)]  # the first chunk's 3
    assert all(isinstance(c, dict) for c in got)
    assert s.suggest("b") is None and s.waiting_for == "planning"  # chunk 1 is still being planned
    chunks[2].released = True  # a later chunk that is ready waits for the earlier one
    assert s.suggest("b") is None
    chunks[1].released = True
    rest = [s.suggest(f"c{i}") for i in range(18)]
    assert all(isinstance(c, dict) for c in rest) and s._plan_job is None
    assert len({c["schedule_hash"] for c in got + rest}) == 21
    whole = S3Searcher(cfg)  # the same stage with every chunk ready at once
    whole_seeds = [whole.suggest(f"s{i}") for i in range(len(whole.queue))]
    for i, c in enumerate(whole_seeds):
        whole.on_trial_complete(f"s{i}", evaluate(SolverSchedule.from_json(c["schedule"]), target, n=64))
    proposed = []
    while len(proposed) < 21:
        c = whole.suggest(f"w{len(proposed)}")
        if c is None:  # trials in flight: the next chunk is awaited, not waited for
            whole.plan_future().result()
            continue
        proposed.append(c["schedule_hash"])
    assert proposed == [c["schedule_hash"] for c in got + rest]


@pytest.mark.parametrize("plan_ahead,base", [(0, CHUNKED), (5, CHUNKED), (5, REFIT)], ids=["0", "5", "5-refit"])
def test_restored_in_the_middle_of_a_streamed_stage_continues_the_same_search(tmp_path, plan_ahead, base):
    cfg = parse_config({**base, "plan_ahead": plan_ahead})
    whole = S3Searcher(cfg)
    run_concurrent(whole, workers=3, order_seed=1)
    a = S3Searcher(cfg)
    _, inflight = run_concurrent(a, workers=3, order_seed=4,
                                 stop_when=lambda s: s._stream is not None and s._stream["taken"] < len(s._stream["seeds"]))
    assert a._stream["taken"] >= 1 and a._plan_job is not None
    path = tmp_path / "searcher.json"
    a.save(str(path))
    b = S3Searcher(cfg)
    b.restore(str(path))
    assert b._plan_job is None and b._stream == a._stream
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    for tid, c in inflight.items():
        b.on_trial_complete(tid, evaluate(SolverSchedule.from_json(c["schedule"]), target, n=c["samples"], seed=c["seed"]))
    run_concurrent(b, workers=3, order_seed=5)
    assert _trace(b) == _trace(whole) and b.taus == whole.taus


def test_planning_processes_propose_what_the_planning_thread_proposes():
    cfg = {**SIM_CFG, "plan_ahead": 60, "plan_chunk": 6}
    thread = drive_in_order(S3Searcher(parse_config(cfg)), workers=4)
    processes = drive_in_order(S3Searcher(parse_config({**cfg, "plan_workers": 2})), workers=4)
    assert processes == thread and len(thread) == 60


@pytest.mark.parametrize("plan_workers", [1, 3])
def test_simulation_with_chunks_on_planning_lanes_proposes_what_the_searcher_proposes(plan_workers):
    cfg = parse_config({**SIM_CFG, "plan_ahead": 60, "plan_chunk": 6, "plan_workers": plan_workers})
    tl = simulate(cfg, workers=4, completion_order=min)
    plain = drive_in_order(S3Searcher(parse_config({**SIM_CFG, "plan_ahead": 60, "plan_chunk": 6})), workers=4)
    assert tl.proposals == plain and len(plain) == cfg.budget


@pytest.mark.parametrize("lag", [4, 40])
def test_plan_lag_lets_a_stage_train_on_less_than_the_previous_stage_and_stays_order_independent(lag):
    """Asynchronous stages with plan_lag: stage k+1 trains on every result before stage k's first
    one except the last ``lag`` (but on one more than stage k trained on); the first stage on half
    the seed phase less lag / 2 (at least concurrency), the seed phase holding 2 x concurrency + lag."""
    cfg = parse_config({**CHUNKED, "plan_ahead": 1000, "plan_lag": lag, "concurrency": 3, "budget": 90})
    runs = []
    for order_seed in (1, 2):
        s = S3Searcher(cfg)
        run_concurrent(s, workers=3, order_seed=order_seed)
        assert len(s.results) == cfg.budget
        runs.append((_trace(s), s.taus))
    assert runs[0] == runs[1]
    trace, taus = runs[0]
    start = [min(i for i, _, st in trace if st == k) for k in range(cfg.stages)]
    assert start[0] >= 2 * cfg.concurrency + lag
    cut = [max((start[0] + 1) // 2 - lag // 2, cfg.concurrency)]
    for k in range(1, cfg.stages):
        cut.append(max(start[k - 1] + 1 - lag, cut[-1] + 1))
    assert [t["train_below"] for t in taus] == cut
    assert [t["n_train"] for t in taus] == cut  # below every cap: all of them


def test_incremental_fits_start_from_the_previous_stage_and_stay_order_independent(tmp_path):
    """predictor.refit_epochs: stage k's predictor is an update of stage k-1's (another search than
    fits from scratch from the second stage on), the same whatever the completion order, and a
    state saved after a stage was planned carries the predictor the next stage starts from."""
    cfg = parse_config({**REFIT, "plan_ahead": 5})
    runs = []
    for order_seed in (1, 2):
        s = S3Searcher(cfg)
        run_concurrent(s, workers=3, order_seed=order_seed)
        runs.append((_trace(s), s.taus))
    assert runs[0] == runs[1]
    assert sorted(s._fitted) == [1, 2]
    scratch = S3Searcher(parse_config({**CHUNKED, "stages": 3, "plan_ahead": 5}))
    run_concurrent(scratch, workers=3, order_seed=1)
    stage = lambda trace, k: [h for _, h, st in trace if st == k]
    assert stage(runs[0][0], 0) == stage(_trace(scratch), 0)  # the first stage fits from scratch in both
    assert stage(runs[0][0], 1) != stage(_trace(scratch), 1)
    a = S3Searcher(cfg)
    _, inflight = run_concurrent(a, workers=3, order_seed=3, stop_when=lambda s: s.stage == 1 and s._stream is None)
    a.save(str(tmp_path / "s.json"))
    b = S3Searcher(cfg)
    b.restore(str(tmp_path / "s.json"))
    assert sorted(b._fitted) == sorted(a._fitted) and 1 in b._fitted
    assert all(torch.equal(p, q) for p, q in zip(b._fitted[1].members[0].params, a._fitted[1].members[0].params))
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    for tid, c in inflight.items():
        b.on_trial_complete(tid, evaluate(SolverSchedule.from_json(c["schedule"]), target, n=c["samples"], seed=c["seed"]))
    run_concurrent(b, workers=3, order_seed=5)
    assert (_trace(b), b.taus) == runs[0]
