"""MLflow tracking: one parent run per search, one child run per trial.

Logging is batched (``log_batch``) and idempotent by trial id: a resumed search, a re-run trial or a
final sync never duplicates a child run. If the tracking server is unreachable, the failure is
reported and the search goes on; ``sync_trials`` at the end (or on resume) fills the gaps from the
results Tune keeps in the run directory.
"""

from __future__ import annotations

import json
import logging
import math

from ray.tune import Callback

from s3_ray.usf.schedule import SolverSchedule

log = logging.getLogger("s3_ray.tracking")

SEARCH_TAG = "s3.search"
TRIAL_TAG = "s3.trial_id"
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "s3.kind"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch request
TRIAL_METRICS = ("score", "fid", "kid", "kid_std", "rmse", "seconds", "failed")


def schedule_params(s: SolverSchedule) -> dict[str, str]:
    """The schedule's decisions, flattened per step (``s03.order`` etc.), as MLflow params."""
    out = {"afs": s.afs, "n_steps": str(len(s.steps)), "t_start": repr(s.t_start), "noise_schedule": s.noise_schedule}
    for i, st in enumerate(s.steps):
        p = f"s{i:02d}"
        out[f"{p}.t"] = repr(st.t)
        out[f"{p}.pred"] = st.prediction
        out[f"{p}.order"] = str(st.order)
        out[f"{p}.start"] = str(st.start)
        out[f"{p}.points"] = "|".join(",".join(map(str, d.points)) for d in st.derivatives) or "-"
        rel = [d.relaxation for d in st.derivatives if not d.relaxation.is_identity]
        out[f"{p}.relax"] = ";".join(f"{r.kind}:{r.scale:g}:{r.slope:g}" for r in rel) or "-"
        out[f"{p}.combine"] = st.combine
        c = st.corrector
        out[f"{p}.corrector"] = "none" if c is None else f"{c.kind}/{c.order}/{c.combine}"
    return out


class Tracker:
    """Thin wrapper over ``MlflowClient`` for one search (experiment = search name)."""

    def __init__(self, tracking_uri: str, search_name: str, artifact_root: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri, self.search_name = tracking_uri, search_name
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(search_name)
        if exp is None:
            self.experiment_id = self.client.create_experiment(search_name, artifact_location=artifact_root)
        else:
            self.experiment_id = exp.experiment_id
        self._logged: set[str] | None = None
        self.parent_id: str | None = None

    # ---- parent -----------------------------------------------------------------------------------
    def start_parent(self, config: dict, algo: str) -> str:
        """The search's parent run: found again on resume (by tag), else created."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{self.search_name}' "
                                       f"and tags.`{KIND_TAG}` = 'search'", max_results=1)
        if runs:
            self.parent_id = runs[0].info.run_id
            return self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=f"{self.search_name}-{algo}",
                                     tags={SEARCH_TAG: self.search_name, KIND_TAG: "search", "s3.algo": algo})
        self.parent_id = run.info.run_id
        from mlflow.entities import Param

        flat = {"algo": algo, "budget": config["budget"], "nfe": ",".join(map(str, config["nfe"])),
                "stages": config["stages"], "metric": config["metric"]["kind"], "reference": config["metric"]["reference"],
                "model": config["model"]["kind"], "seed": config["seed"]}
        self.client.log_batch(self.parent_id, params=[Param(k, str(v)) for k, v in flat.items()])
        self.client.log_text(self.parent_id, json.dumps(config, indent=1), "config.json")
        return self.parent_id

    # ---- children ---------------------------------------------------------------------------------
    def logged_trial_ids(self) -> set[str]:
        if self._logged is None:
            self._logged = set()
            token = None
            while True:
                page = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
                                               max_results=1000, page_token=token)
                self._logged.update(r.data.tags.get(TRIAL_TAG) for r in page)
                token = page.token
                if not token:
                    break
        return self._logged

    def log_trial(self, trial_id: str, config: dict, result: dict) -> bool:
        """Create the trial's child run unless it exists. Returns True if a run was created.

        ``trial_id`` is the searcher's trial key (stable across a driver restart), not Tune's id."""
        from mlflow.entities import Metric, Param, RunTag

        if trial_id in self.logged_trial_ids():
            return False
        s = SolverSchedule.from_json(config["schedule"])
        tags = {PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id, KIND_TAG: "trial", "s3.schedule_hash": config["schedule_hash"],
                "s3.source": config["source"], "ray.trial_id": str(result.get("trial_id", ""))}
        if result.get("node_id"):
            tags["s3.node_id"] = str(result["node_id"])
        run = self.client.create_run(self.experiment_id, run_name=f"{config['source']}-nfe{config['nfe']}-{trial_id}", tags=tags)
        params = {"nfe": str(config["nfe"]), "stage": str(config["stage"]), "source": config["source"],
                  "samples": str(config["samples"]), "seed": str(config["seed"]), **schedule_params(s)}
        items = [Param(k, v) for k, v in params.items()]
        metrics = [Metric(k, float(result[k]), 0, 0) for k in TRIAL_METRICS
                   if isinstance(result.get(k), (int, float)) and math.isfinite(float(result[k]))]
        for i in range(0, max(len(items), 1), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH],
                                  metrics=metrics if i == 0 else [])
        self.client.log_text(run.info.run_id, s.to_json(indent=1), "schedule.json")
        self.client.set_terminated(run.info.run_id, "FAILED" if result.get("failed") else "FINISHED")
        self.logged_trial_ids().add(trial_id)
        return True

    def sync_trials(self, records: list[tuple[str, dict, dict]]) -> int:
        """Log every (trial_id, config, result) not yet in MLflow; returns how many were added."""
        return sum(self.log_trial(tid, cfg, res) for tid, cfg, res in records)


class MlflowTrialCallback(Callback):
    """Ray Tune callback: logs each completed trial as a child run. Stateless apart from a lazily
    built Tracker, so it survives pickling into ``tuner.pkl`` and a restore."""

    def __init__(self, tracking_uri: str, search_name: str, artifact_root: str | None = None):
        super().__init__()
        self.args = (tracking_uri, search_name, artifact_root)
        self._tracker = None

    def __getstate__(self):
        return {"args": self.args}

    def __setstate__(self, state):
        self.args, self._tracker = state["args"], None

    def tracker(self) -> Tracker:
        if self._tracker is None:
            t = Tracker(*self.args)
            runs = t.client.search_runs([t.experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{t.search_name}' "
                                        f"and tags.`{KIND_TAG}` = 'search'", max_results=1)
            if not runs:
                raise RuntimeError(f"no parent run for search {t.search_name!r}")
            t.parent_id = runs[0].info.run_id
            self._tracker = t
        return self._tracker

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            self.tracker().log_trial(trial.config["trial_key"], trial.config, trial.last_result or {})
        except Exception as e:  # a tracking outage must not stop the search; sync_trials fills gaps
            self._tracker = None
            log.warning("MLflow logging of trial %s failed (%s); it will be synced at the end or on --resume", trial_id, e)
