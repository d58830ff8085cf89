"""The search's progress: a Ray Tune callback that drives a ``Progress`` (trials done of the budget,
stage, best score per NFE, trials per minute, ETA), and ``gather`` for the final re-evaluation."""

from __future__ import annotations

from ray.tune import Callback

from s3_ray.progress import Progress


class SearchProgress(Callback):
    """Shows the search's progress on stderr. Only the arguments are pickled into ``tuner.pkl``; after
    ``--resume`` the count starts from the trials Tune restored as finished."""

    def __init__(self, budget: int, metric: str = "score", stages: int | None = None):
        super().__init__()
        self.budget, self.metric, self.stages = budget, metric, stages
        self._reset()

    def _reset(self):
        self.progress: Progress | None = None
        self.done: set[str] = set()
        self.best: dict[int, float] = {}  # searched schedules (everything but the seeded baselines)
        self.best_baseline: dict[int, float] = {}  # the seeded baselines
        self.stage = -1

    def __getstate__(self):
        return {"budget": self.budget, "metric": self.metric, "stages": self.stages}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # ---- what is shown ---------------------------------------------------------------------------
    def status(self) -> str:
        if self.stage < 0:
            stage = "seed phase"
        elif self.stages:  # S3's stages; the other algorithms have one phase after the seeds
            stage = f"stage {self.stage + 1}/{self.stages}"
        else:
            stage = "searching"
        shown = []  # the best searched score, and its ratio to the best seeded baseline's (short: a bar's width)
        for k in sorted(set(self.best) | set(self.best_baseline)):
            base = self.best_baseline.get(k)
            if k not in self.best:
                shown.append(f"NFE {k}: - (baseline {base:.3f})")
            elif base is None or base <= 0:
                shown.append(f"NFE {k}: {self.best[k]:.3f}")
            else:
                shown.append(f"NFE {k}: {self.best[k]:.3f} ({self.best[k] / base:.2f}x)")
        return f"{stage} | best {self.metric} {', '.join(shown) or '-'}"

    def _count(self, trial) -> None:
        self.done.add(trial.trial_id)
        config, result = trial.config or {}, trial.last_result or {}
        self.stage = max(self.stage, int(config.get("stage", -1)))
        score, nfe = result.get("score"), config.get("nfe")  # (a screening trial has no NFE)
        if score is None or nfe is None or result.get("failed"):
            return
        if config.get("source") == "baseline":  # the line says how S3 compares with the best of them
            self.best_baseline[nfe] = min(score, self.best_baseline.get(nfe, score))
        else:
            self.best[nfe] = min(score, self.best.get(nfe, score))

    def _start(self, trials) -> Progress:
        """The Progress, made at the first event, counting the trials a restored run had finished."""
        if self.progress is None:
            for t in trials:
                if t.status == "TERMINATED":
                    self._count(t)
            full = sum(1 for t in trials if t.trial_id in self.done and "screen" not in (t.config or {}))
            self.progress = Progress(self.budget, "search", "trials", initial=full, status=self.status(),
                                     per="min")
        return self.progress

    # ---- Tune's events ---------------------------------------------------------------------------
    def on_step_end(self, iteration, trials, **info):
        self._start(trials).tick()

    def on_trial_start(self, iteration, trials, trial, **info):
        p = self._start(trials)
        stage = int((trial.config or {}).get("stage", -1))
        if stage > self.stage:
            self.stage = stage
            p.update(0, self.status())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trials, trial)

    def _finish(self, trials, trial):
        p = self._start(trials)
        if trial.trial_id not in self.done:
            self._count(trial)
            p.update(0 if "screen" in (trial.config or {}) else 1, self.status())  # the bar counts full evaluations
            if p.n >= self.budget:  # done now, before Tune's closing log lines
                p.close()

    def on_experiment_end(self, trials, **info):
        if self.progress is not None:
            self.progress.close()


def gather(refs: list[list], desc: str = "final re-evaluation") -> list[list]:
    """``ray.get`` over a list of lists of object refs, in their order, with a progress display
    that advances as each result arrives."""
    import ray

    pending = [r for rs in refs for r in rs]
    with Progress(len(pending), desc, "evaluations", per="min") as p:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            if done:
                p.update(len(done))
            else:
                p.tick()
    return [ray.get(rs) for rs in refs]
