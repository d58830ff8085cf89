"""Optuna TPE over a fixed-length parameterisation of the USF decision space (a search baseline).

Slots 0..S-1 (S = max NFE + 1) each carry a relative logSNR step size, an order, a prediction type,
a first-derivative point count, a linear relaxation slope and a corrector; NFE and AFS are global
choices. A point decodes to M = NFE + [afs != none] steps (the first M slots), times spread in
logSNR in proportion to the step sizes, and goes through ``repair`` (valid by construction).
Completed points are kept as plain data, so the study is rebuilt exactly on restore.
"""

from __future__ import annotations

import numpy as np
import optuna

from s3_ray.config import SearchConfig
from s3_ray.search.space import repair
from s3_ray.usf.noise import NoiseSchedule
from s3_ray.usf.schedule import SolverSchedule


class TPEProposer:
    def __init__(self, cfg: SearchConfig, noise: NoiseSchedule):
        self.cfg, self.noise = cfg, noise
        d = cfg.decisions
        self.slots = max(cfg.nfe) + 1
        self.dists = {"nfe": optuna.distributions.CategoricalDistribution(list(cfg.nfe)),
                      "afs": optuna.distributions.CategoricalDistribution(list(d.afs))}
        for i in range(self.slots):
            self.dists |= {
                f"dl{i}": optuna.distributions.FloatDistribution(0.05, 1.0, log=True),
                f"order{i}": optuna.distributions.IntDistribution(1, d.max_order),
                f"pred{i}": optuna.distributions.CategoricalDistribution(list(d.predictions)),
                f"k1_{i}": optuna.distributions.IntDistribution(1, 2),
                f"relax{i}": optuna.distributions.FloatDistribution(-0.5, 0.5),
                f"corr{i}": optuna.distributions.CategoricalDistribution([c for c in d.correctors if c != "implicit"] or ["none"]),
            }
        self.completed: list[tuple[dict, float]] = []
        self._study = None

    def study(self) -> optuna.Study:
        if self._study is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._study = optuna.create_study(direction="minimize")
            for params, value in self.completed:
                self._study.add_trial(optuna.trial.create_trial(params=params, distributions=self.dists, value=value))
        return self._study

    def ask(self) -> tuple[SolverSchedule, dict, int]:
        """A new point: (schedule, params, optuna trial number)."""
        study = self.study()
        # Seeded by the history length: a study rebuilt on restore asks the same next point.
        study.sampler = optuna.samplers.TPESampler(seed=self.cfg.seed + len(study.trials), n_startup_trials=10)
        trial = study.ask(self.dists)
        return self.decode(trial.params), dict(trial.params), trial.number

    def tell(self, number: int | None, params: dict, value: float) -> None:
        self.completed.append((params, value))
        study = self.study()
        live = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if t.number == number]
        if live:
            study.tell(number, value)
        else:  # asked before a restore: add it as a finished trial
            study.add_trial(optuna.trial.create_trial(params=params, distributions=self.dists, value=value))

    def decode(self, p: dict) -> SolverSchedule:
        afs, nfe = p["afs"], int(p["nfe"])
        m = nfe + (afs != "none")
        lo, hi = self.cfg.decisions.t_end_range or (self.noise.t_end_default,) * 2
        t_end = float(np.sqrt(lo * hi))
        lam0, lam1 = float(self.noise.lambda_(self.noise.T)), float(self.noise.lambda_(t_end))
        w = np.cumsum([p[f"dl{i}"] for i in range(m)])
        times = [float(t) for t in self.noise.inverse_lambda(lam0 + (lam1 - lam0) * w / w[-1])]
        steps = []
        for i, t in enumerate(times):
            order = min(int(p[f"order{i}"]), i + 1)
            pts = [-k for k in range(2, i + 2)]
            derivs = []
            for n in range(1, order):
                k = max(n, int(p[f"k1_{i}"]) if n == 1 else order - 1)
                slope = float(p[f"relax{i}"]) if n == 1 else 0.0
                derivs.append({"points": pts[:k], "relaxation": {"kind": "linear", "scale": 1.0, "slope": slope}})
            corr = None if (p[f"corr{i}"] == "none" or i == m - 1) else {"kind": "pseudo", "order": order + 1}
            steps.append({"t": t, "prediction": p[f"pred{i}"], "order": order, "start": -1, "derivatives": derivs,
                          "combine": "taylor", "corrector": corr})
        data = {"format_version": 1, "noise_schedule": self.noise.name, "t_start": float(self.noise.T), "afs": afs,
                "steps": steps}
        return repair(data, self.noise, self.cfg.decisions)

    def get_state(self) -> list:
        return [[params, value] for params, value in self.completed]

    def set_state(self, state: list) -> None:
        self.completed = [(dict(params), float(value)) for params, value in state]
        self._study = None
