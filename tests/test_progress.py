"""Progress: a live bar on a terminal, plain lines at a bounded rate elsewhere; the search's callback
(budget, stage, best score per NFE, resume); one real search under a pseudo-terminal."""

from __future__ import annotations

import io
import os
import pickle
import re
import select
from types import SimpleNamespace

import pytest
import tqdm.std

from s3_ray import progress as progress_mod
from s3_ray.progress import Progress
from s3_ray.search.progress import SearchProgress

CONTROL = re.compile(r"[\r\x1b]")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(progress_mod, "monotonic", c)
    monkeypatch.setattr(tqdm.std, "time", c)  # tqdm's own clock (it redraws at most every 0.1 s)
    return c


def test_plain_lines_have_no_control_codes_and_a_bounded_rate(clock):
    out = io.StringIO()
    p = Progress(200, "search", "trials", per="min", stream=out, interval=1.0)
    for i in range(200):  # 12.5 s of updates, one every 62.5 ms
        clock.now += 0.0625
        p.update(1, f"best fid NFE 4: {5 - i / 100:.3f}")
        p.tick()
    p.close()
    text = out.getvalue()
    assert not CONTROL.search(text), repr(text[:300])
    lines = text.splitlines()
    assert 10 <= len(lines) <= 1 + 12 + 1, lines  # the start, at most one a second, the end
    assert lines[0].startswith("search: 0/200 trials (0%)")
    assert lines[-1].startswith("search: 200/200 trials (100%) | 960.0 trials/min | 00:12 elapsed, ETA -")
    assert lines[-1].endswith("best fid NFE 4: 3.010")
    assert re.search(r"ETA 00:0\d", lines[len(lines) // 2])  # a real estimate mid-way


def test_plain_lines_keep_coming_while_nothing_finishes(clock):
    out = io.StringIO()
    p = Progress(5, "final re-evaluation", "evaluations", stream=out, interval=10.0)
    for _ in range(60):  # a minute of waiting, ticked every second
        clock.now += 1.0
        p.tick()
    assert len(out.getvalue().splitlines()) == 1 + 6
    assert "00:30 elapsed, ETA ?" in out.getvalue()


def test_live_bar_redraws_in_place_on_a_terminal(clock):
    out = FakeTTY()
    p = Progress(50, "search", "trials", per="min", stream=out)
    for i in range(50):
        clock.now += 1.0
        p.update(1, f"best fid NFE 4: {2 - i / 100:.3f}")
    p.close()
    text = out.getvalue()
    assert text.count("\rsearch:") >= 10, repr(text[:300])  # redrawn in place, not new lines
    assert text.count("\n") == 1 and text.endswith("\n")  # the final bar stays on screen
    final = text.rsplit("\r", 1)[-1]
    assert "100%|" in final and "50/50 trials" in final and "best fid NFE 4: 1.510" in final


def _trial(i, status="TERMINATED", stage=-1, nfe=4, score=None, failed=False):
    return SimpleNamespace(trial_id=f"t{i}", status=status, config={"stage": stage, "nfe": nfe},
                           last_result={} if score is None else {"score": score, "failed": failed})


def test_search_callback_counts_restored_trials_and_tracks_the_best_per_nfe(capsys):
    restored = [_trial(0, score=3.0), _trial(1, score=2.5, nfe=6), _trial(2, score=1.0, failed=True),
                _trial(3, status="PENDING")]
    cb = pickle.loads(pickle.dumps(SearchProgress(budget=10, metric="fid", stages=2)))  # as after --resume
    cb.on_step_end(0, restored)
    assert cb.progress.n == cb.progress.initial == 3
    new = _trial(3, stage=0, score=2.0)
    cb.on_trial_start(1, restored, new)
    cb.on_trial_complete(2, restored, new)
    cb.on_trial_complete(3, restored, new)  # counted once
    cb.on_trial_error(4, restored, _trial(4, stage=1, nfe=6))
    cb.on_experiment_end(restored)
    pickle.dumps(cb)  # Tune may pickle it again: the display is not part of its state
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("search: 3/10 trials (30%)")
    assert lines[0].endswith("seed phase | best fid NFE 4: 3.000, NFE 6: 2.500")  # the failed 1.0 is not a best
    assert lines[-1].startswith("search: 5/10 trials (50%)")
    assert lines[-1].endswith("stage 2/2 | best fid NFE 4: 2.000, NFE 6: 2.500")


def test_search_callback_compares_the_best_searched_schedule_with_the_best_baseline(capsys):
    def baseline(i, score, nfe=4):
        t = _trial(i, score=score, nfe=nfe)
        t.config.update(source="baseline", baseline="some/name")
        return t

    trials = [baseline(0, 0.9), baseline(1, 0.4), baseline(2, 0.2, nfe=5), _trial(3, score=0.3), _trial(4, score=0.1, nfe=6)]
    cb = SearchProgress(budget=10, metric="fid", stages=2)
    cb.on_step_end(0, [])
    for t in trials:
        cb.on_trial_complete(1, trials, t)
    cb.on_experiment_end(trials)
    lines = capsys.readouterr().err.splitlines()
    # a baseline is not the searched best (NFE 5 has none yet); the ratio is to the best baseline (0.3 / 0.4)
    assert lines[-1].endswith("best fid NFE 4: 0.300 (0.75x), NFE 5: - (baseline 0.200), NFE 6: 0.100")


def test_search_callback_finishes_its_line_when_the_budget_is_done(capsys):
    cb = SearchProgress(budget=2, metric="rmse")
    trials = [_trial(0, score=0.5), _trial(1, score=0.25)]
    cb.on_step_end(0, [])
    for t in trials:
        cb.on_trial_complete(1, trials, t)
    assert cb.progress.closed
    cb.on_step_end(2, trials)  # Tune goes on a little: nothing more is shown
    cb.on_experiment_end(trials)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("search: 2/2 trials (100%)") and lines[-1].endswith("best rmse NFE 4: 0.250")
    assert sum(line.startswith("search: 2/2") for line in lines) == 1


# ---- a real search under a pseudo-terminal ----------------------------------------------------------

@pytest.mark.slow
def test_search_on_a_terminal_shows_a_live_bar_with_the_budget_and_the_best_score(small_search):
    """The session's small search (tests/conftest.py) ran on a pseudo-terminal."""
    rc, shown = small_search.returncode, small_search.shown
    assert rc == 0, shown[-3000:]
    # A redraw is a carriage return not followed by a newline (the terminal turns "\n" into "\r\n").
    bars = re.findall(r"\r(?!\n)(search:[^\r\n]*)", shown)
    assert len(bars) >= 3, shown[-3000:]  # drawn, then redrawn in place as trials finish
    budget = small_search.budget
    assert re.search(rf"100%\|.*\| {budget}/{budget} trials \|", bars[-1]), bars[-1]
    # per NFE the best searched score and its ratio to the best seeded baseline's; nothing else after
    assert re.search(r"best fid NFE 3: \d+\.\d{3} \(\d+\.\d{2}x\), NFE 4: \d+\.\d{3} \(\d+\.\d{2}x\)$", bars[-1]), bars[-1]
    final = re.findall(r"\r(?!\n)(final re-evaluation:[^\r\n]*)", shown)
    n = small_search.final_evaluations
    assert final and f"{n}/{n} evaluations" in final[-1], shown[-3000:]
    assert "| NFE | S3 FID |" in shown  # the table still comes after the bars


def test_live_bar_is_drawn_on_a_terminal_that_reports_no_size():
    """A pseudo-terminal nobody sized reports 0x0 (e.g. `script` run without a terminal); tqdm's own
    sizing then draws nothing at all, so the bar falls back to 80 columns."""
    import pty

    master, slave = pty.openpty()  # 0 rows, 0 columns
    stream = open(slave, "w", closefd=True)  # noqa: SIM115
    try:
        assert os.get_terminal_size(slave) == (0, 0) and stream.isatty()
        p = Progress(4, "search", unit="trials", stream=stream)
        p.update(status="best fid NFE 4: 1.234")
        p.close()
        stream.flush()
        shown = b""
        while select.select([master], [], [], 1.0)[0]:  # everything written (one read may return a part)
            shown += os.read(master, 65536)
        shown = shown.decode()
    finally:
        stream.close()
        os.close(master)
    assert "search:" in shown and "1/4 trials" in shown and "best fid" in shown, repr(shown)  # 80 columns cut the rest
