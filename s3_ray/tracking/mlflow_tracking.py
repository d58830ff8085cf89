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
import os
import queue
import sys
import threading
import time

from ray.tune import Callback

from s3_ray.errors import first_line
from s3_ray.tracking.server import NO_TELEMETRY
from s3_ray.usf.schedule import SolverSchedule

log = logging.getLogger("s3_ray.tracking")

SEARCH_TAG = "s3.search"
TRIAL_TAG = "s3.trial_id"
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "s3.kind"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # training runs, not GenAI traces
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (Markdown)
# MLflow 3.17.2's UI ignores the experiment's kind: it opens an experiment on the view its GenAI / Model
# training switch holds (kept in the browser, GenAI's overview at first; measured in Chromium). The URL a
# search prints (``ui_url``) asks for the training-runs view and this shared view of the trials (the UI's
# "Share" feature: an experiment tag ``mlflow.sharedViewState.<key>`` holding the view as JSON).
TRIALS_VIEW = "s3-trials"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch request
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag's value
TRIAL_METRICS = ("score", "fid", "kid", "kid_std", "rmse", "label_accuracy", "seconds", "failed")

# The MLflow client retries an HTTP request 7 times with exponential backoff and waits up to 120 s per
# attempt by default (measured: 246 s for one request to a closed port): a server outage would hold
# the trial logger for minutes per trial and the end of the search with it.
# Searches bound that (a failed request gives up after ~2 s when the server refuses connections);
# values already in the environment win. A trial that cannot be logged stays in Tune's results.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
RETRY_AFTER_S = 5.0  # while the server is down, the callback probes /health at most this often


# With a tracking server, MLflow's client prints "View run NAME at: URL" to stdout for every run it
# ends: one line per trial in the middle of the search's own output.
QUIET = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def set_client_env() -> None:
    """Defaults for this process's MLflow client: bounded HTTP retries (``HTTP_LIMITS``), no telemetry,
    no per-run URL lines on stdout (``QUIET``)."""
    for k, v in {**HTTP_LIMITS, **NO_TELEMETRY, **QUIET}.items():
        os.environ.setdefault(k, v)


TRACKING_FILE = "tracking.json"  # in the run directory: where this search logs, and its parent run


def read_tracking(path) -> dict:
    """A run's tracking record (``write_tracking``); {} if there is none or it is unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_tracking(path, uri: str, experiment: str, artifact_root: str | None, parent_id: str) -> None:
    """Record the search's store, experiment, artifact root and parent run (read by ``--resume`` and
    by the trial callback, so a resumed search logs into its own parent run)."""
    data = {"uri": uri, "experiment": experiment, "artifact_root": artifact_root, "parent_run_id": parent_id}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def server_reachable(uri: str, timeout: float = 2.0) -> bool:
    """A cheap probe: True unless ``uri`` is an HTTP tracking server that does not answer, or
    whose backend store does not (a server on PostgreSQL answers ``/health`` while its database is
    down, and answers store requests with 5xx: that is an outage too)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.error
    import urllib.request

    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:
            if r.status != 200:
                return False
    except Exception:  # noqa: BLE001 (any failure means: not reachable now)
        return False
    try:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get?experiment_id=0", timeout=timeout):
            return True
    except urllib.error.HTTPError as e:  # a 4xx (no experiment 0, auth) still means the store answered
        return e.code < 500
    except Exception:  # noqa: BLE001
        return False


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


def trials_view(metric: str) -> dict:
    """The runs table of a search: best first by ``metric`` (sorted by a metric, MLflow lists child runs
    flat, not folded under the parent) with the metric, NFE, stage and source as columns."""
    return {"searchFilter": "", "orderByKey": f"metrics.`{metric}`", "orderByAsc": True, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": [f"metrics.`{metric}`", "metrics.`nfe`", "metrics.`stage`", "params.`source`"]}


def ui_url(base: str, experiment_id: str) -> str:
    """The search's trials in MLflow's UI at ``base`` (e.g. http://127.0.0.1:5000)."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={TRIALS_VIEW}")


def trial_run_name(trial_id: str, config: dict, result: dict) -> str:
    """A child run's name: NFE, source and score, e.g. ``nfe5-predictor-fid0.0834-00012-ab12cd34ef``."""
    metric = "fid" if "fid" in result else "rmse" if "rmse" in result else "score"
    score = result.get("score")
    said = "failed" if result.get("failed") or not isinstance(score, (int, float)) else f"{metric}{score:.3g}"
    source = f"baseline-{config['baseline']}" if config.get("baseline") else config["source"]
    return f"nfe{config['nfe']}-{source}-{said}-{trial_id}"


class Tracker:
    """Thin wrapper over ``MlflowClient`` for one search (experiment = search name)."""

    def __init__(self, tracking_uri: str, search_name: str, artifact_root: str | None = None):
        set_client_env()
        from mlflow.tracking import MlflowClient

        self.uri, self.search_name = tracking_uri, search_name
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(search_name)
        if exp is None:
            self.experiment_id = self.client.create_experiment(search_name, artifact_location=artifact_root)
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        self._logged: set[str] | None = None
        self._partial: dict[str, str] = {}  # trial id -> run id of a child run left unfinished
        self.parent_id: str | None = None

    # ---- parent -----------------------------------------------------------------------------------
    def start_parent(self, config: dict, algo: str, resume_id: str | None = None) -> str:
        """The search's parent run: ``resume_id`` (the run a resumed search started) if this store
        holds it, else a new one. A new search never reuses another search's parent, even of the same
        name: its child runs would be taken for duplicates and dropped."""
        self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{TRIALS_VIEW}",
                                       json.dumps(trials_view(config["metric"]["kind"])))
        if resume_id:
            try:
                run = self.client.get_run(resume_id)
            except Exception:  # noqa: BLE001 (not in this store: start a new parent)
                run = None
            if run is not None and run.data.tags.get(KIND_TAG) == "search" and run.info.experiment_id == self.experiment_id:
                if run.info.status != "RUNNING":
                    self.client.update_run(resume_id, status="RUNNING")
                self.parent_id = resume_id
                return resume_id
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

    def fail_parent(self, parent_id: str, reason: str) -> None:
        """Mark the parent run FAILED with ``reason`` (tag ``s3.error``); best effort (the store may be down)."""
        try:
            self.client.set_tag(parent_id, "s3.error", reason[:5000])
            self.client.set_terminated(parent_id, "FAILED")
        except Exception as e:  # noqa: BLE001
            log.warning("could not mark the parent run %s FAILED: %s", parent_id, first_line(e))

    def describe_parent(self, parent_id: str, summary_md: str, best_hashes: dict[int, str]) -> None:
        """The parent run's description (the summary table, Markdown) and, per NFE, tag ``best_nfe<k>_run``:
        the child run of the exported schedule, when that schedule was a trial (its best-scored run)."""
        from mlflow.entities import RunTag

        run_of: dict[str, str] = {}
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                           order_by=["metrics.score ASC"], max_results=1000, page_token=token)
            for r in page:
                run_of.setdefault(r.data.tags.get("s3.schedule_hash"), r.info.run_id)
            token = page.token
            if not token:
                break
        tags = [RunTag(NOTE_TAG, summary_md[:MAX_TAG_CHARS])]
        tags += [RunTag(f"best_nfe{nfe}_run", run_of[h]) for nfe, h in sorted(best_hashes.items()) if h in run_of]
        self.client.log_batch(parent_id, tags=tags)

    # ---- children ---------------------------------------------------------------------------------
    def logged_trial_ids(self) -> set[str]:
        """Trial ids whose child run is complete. A child run still RUNNING was cut off mid-logging
        (server outage, killed driver): it is remembered in ``_partial`` and replaced by ``log_trial``.
        A RUNNING run of a trial that has a complete run (or a second RUNNING one) is a leftover of a
        request the outage cut off and the logger then repeated: it is deleted here, so the UI lists
        each trial once."""
        if self._logged is None:
            runs = [r for r in _all_runs(self.client, self.experiment_id, f"tags.`{PARENT_TAG}` = '{self.parent_id}'")
                    if r.data.tags.get(TRIAL_TAG)]  # another child run of the parent is none of ours to judge
            logged = {r.data.tags[TRIAL_TAG] for r in runs if r.info.status != "RUNNING"}
            partial = {}
            for r in (r for r in runs if r.info.status == "RUNNING"):
                tid = r.data.tags[TRIAL_TAG]
                if tid in logged or tid in partial:
                    self.client.delete_run(r.info.run_id)
                else:
                    partial[tid] = r.info.run_id
            self._logged, self._partial = logged, partial
        return self._logged

    def log_trial(self, trial_id: str, config: dict, result: dict) -> bool:
        """Create the trial's child run unless it exists. Returns True if a run was created.

        ``trial_id`` is the searcher's trial key (stable across a driver restart), not Tune's id."""
        if trial_id in self.logged_trial_ids():
            return False
        try:
            return self._log_trial(trial_id, config, result)
        except BaseException:
            self._logged = None  # the server may hold a partial child run now: look again next time
            raise

    def _log_trial(self, trial_id: str, config: dict, result: dict) -> bool:
        from mlflow.entities import Metric, Param

        if trial_id in self._partial:  # an unfinished child run of this trial: replace it
            self.client.delete_run(self._partial.pop(trial_id))
        if "screen" in config:
            return self._log_screen(trial_id, config, result)
        s = SolverSchedule.from_json(config["schedule"])
        tags = {PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id, KIND_TAG: "trial", "s3.schedule_hash": config["schedule_hash"],
                "s3.source": config["source"], "ray.trial_id": str(result.get("trial_id", ""))}
        if result.get("node_id"):
            tags["s3.node_id"] = str(result["node_id"])
        if config.get("baseline"):
            tags["s3.baseline"] = str(config["baseline"])  # 'builder/discretization'
        run = self.client.create_run(self.experiment_id, run_name=trial_run_name(trial_id, config, result), tags=tags)
        params = {"nfe": str(config["nfe"]), "stage": str(config["stage"]), "source": config["source"],
                  "samples": str(config["samples"]), "seed": str(config["seed"]), **schedule_params(s)}
        items = [Param(k, v) for k, v in params.items()]
        metrics = [Metric(k, float(result[k]), 0, 0) for k in TRIAL_METRICS
                   if isinstance(result.get(k), (int, float)) and math.isfinite(float(result[k]))]
        metrics += [Metric(k, float(config[k]), 0, 0) for k in ("nfe", "stage")]  # sortable in the UI
        for i in range(0, max(len(items), 1), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH],
                                  metrics=metrics if i == 0 else [])
        self.client.log_text(run.info.run_id, s.to_json(indent=1), "schedule.json")
        self.client.set_terminated(run.info.run_id, "FAILED" if result.get("failed") else "FINISHED")
        self.logged_trial_ids().add(trial_id)
        return True

    def _log_screen(self, trial_id: str, config: dict, result: dict) -> bool:
        """A screening trial's child run (kind 'screen'): no ``score`` metric, so the trials table
        sorted by the search metric lists full evaluations first; ``screen.json`` holds each
        schedule's hash and screening score (RMSE, or the metric)."""
        from mlflow.entities import Metric, Param

        tags = {PARENT_TAG: self.parent_id, TRIAL_TAG: trial_id, KIND_TAG: "screen", "s3.source": "screen"}
        name = next((k.removeprefix("screen_best_") for k in result if k.startswith("screen_best_")), "rmse")
        best = result.get(f"screen_best_{name}")
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=(
            f"screen-stage{config['stage']}-{len(config['screen'])}x-{name}{best:.3g}-{trial_id}"
            if isinstance(best, (int, float)) else f"screen-stage{config['stage']}-failed-{trial_id}"))
        params = {"stage": str(config["stage"]), "source": "screen", "samples": str(config["samples"]),
                  "seed": str(config["seed"]), "n_schedules": str(len(config["screen"])),
                  "fidelity": str(config.get("fidelity", "rmse"))}
        metrics = [Metric(k, float(result[k]), 0, 0) for k in (f"screen_best_{name}", "seconds", "failed")
                   if isinstance(result.get(k), (int, float)) and math.isfinite(float(result[k]))]
        metrics.append(Metric("stage", float(config["stage"]), 0, 0))
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()], metrics=metrics)
        scores = result.get("scores") or [None] * len(config["screen"])
        self.client.log_text(run.info.run_id, json.dumps([{"schedule_hash": h, name: sc} for h, sc in
                                                          zip(config["schedule_hashes"], scores)], indent=1), "screen.json")
        self.client.set_terminated(run.info.run_id, "FAILED" if result.get("failed") else "FINISHED")
        self.logged_trial_ids().add(trial_id)
        return True

    def sync_trials(self, records: list[tuple[str, dict, dict]]) -> int:
        """Log every (trial_id, config, result) not yet in MLflow; returns how many were added."""
        return sum(self.log_trial(tid, cfg, res) for tid, cfg, res in records)


class MlflowTrialCallback(Callback):
    """Ray Tune callback: logs each completed trial as a child run. Only its arguments are pickled
    into ``tuner.pkl`` (the Tracker and the pending trials are rebuilt / re-synced after a restore).

    Logging runs in a background thread, not in Tune's loop: a child run costs ~40-60 ms of CPU with
    an sqlite store (measured), which would otherwise delay every next trial by as much. The end of
    the experiment waits for the thread, so the driver's final sync never races it.

    If the tracking server is unreachable, the trial is kept in memory (it is also in Tune's results
    in the run directory) and the search goes on: while the server is down, ``/health`` is probed at
    most every ``RETRY_AFTER_S`` seconds at a trial's completion, and the pending trials are logged
    as soon as it answers; the driver's final sync (or ``--resume``) logs whatever is still missing."""

    _STOP = object()

    def __init__(self, tracking_file: str):
        super().__init__()
        self.tracking_file = tracking_file
        self._reset()

    def _reset(self):
        self._tracker = None
        self._pending: dict[str, tuple[dict, dict]] = {}
        self._lock = threading.Lock()  # guards _pending (Tune's loop adds, the logger thread removes)
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._next_try = 0.0
        self._uri: str | None = None

    def __getstate__(self):
        return {"tracking_file": self.tracking_file}

    def __setstate__(self, state):
        self.tracking_file = state["tracking_file"]
        self._reset()

    @property
    def uri(self) -> str:
        if self._uri is None:
            self._uri = self._tracking()["uri"]
        return self._uri

    def _tracking(self) -> dict:
        """The driver's tracking record (read at first use, so a resumed driver's store and parent apply)."""
        data = read_tracking(self.tracking_file)
        if not data.get("parent_run_id"):
            raise RuntimeError(f"no tracking record in {self.tracking_file}")
        return data

    def tracker(self) -> Tracker:
        if self._tracker is None:
            d = self._tracking()
            t = Tracker(d["uri"], d["experiment"], d.get("artifact_root"))
            t.parent_id = d["parent_run_id"]
            self._uri, self._tracker = d["uri"], t
        return self._tracker

    def on_trial_complete(self, iteration, trials, trial, **info):
        with self._lock:
            self._pending[trial.config["trial_key"]] = (dict(trial.config), dict(trial.last_result or {}))
        if self._thread is None:
            self._thread = threading.Thread(target=self._log_loop, name="s3-mlflow-log", daemon=True)
            self._thread.start()
        self._jobs.put(None)

    def on_experiment_end(self, trials, **info):
        self.close()

    def wait(self) -> None:
        """Block until the logger thread has handled every trial completed so far."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.join()

    def close(self) -> None:
        """Flush what can be logged now (probing a server that was down) and stop the logger thread (a
        later completion restarts it). It waits as long as that takes (bounded by HTTP_LIMITS: 3
        attempts of at most 15 s per request): the driver's final sync must not race it."""
        if self._thread is not None:
            self._jobs.put(self._STOP)
            self._thread.join()
            self._thread = None

    def _log_loop(self):
        while True:
            stop = self._jobs.get() is self._STOP
            try:
                if stop or self._jobs.empty():  # one flush serves a burst of completions
                    self.flush(probe=stop)
            except Exception as e:  # noqa: BLE001 (the thread must live on; the final sync fills gaps)
                _say(f"warning: logging trials to MLflow failed ({first_line(e)}); the end of the search retries")
            finally:
                self._jobs.task_done()
            if stop:
                return

    def flush(self, probe: bool = False) -> int:
        """Log the pending trials unless the server is known to be down (probed at most every
        RETRY_AFTER_S seconds, or now with ``probe``); returns how many were logged."""
        uri = self.uri
        now = time.monotonic()
        if self._down_since is not None:
            if now < self._next_try and not probe:
                return 0
            if not server_reachable(uri):
                self._next_try = now + RETRY_AFTER_S
                return 0
        done = 0
        with self._lock:
            pending = list(self._pending.items())
        for key, (config, result) in pending:
            try:
                self.tracker().log_trial(key, config, result)
            except Exception as e:  # noqa: BLE001 (an outage must not stop the search; sync_trials fills gaps)
                self._tracker = None
                if server_reachable(uri):  # the server is fine: this trial is the problem, not an outage
                    with self._lock:
                        del self._pending[key]
                    _say(f"warning: logging trial {key} to MLflow failed ({first_line(e)}); the end of the search "
                         f"retries it")
                    continue
                self._next_try = time.monotonic() + RETRY_AFTER_S
                if self._down_since is None:
                    self._down_since = now
                    _say(f"warning: MLflow at {uri} is unreachable ({first_line(e)}). The search goes on; "
                         f"{len(self._pending)} trial(s) wait in the run directory (tune/) and are logged when the "
                         f"server is back, at the end of the search, or by rerunning the same `s3 search` command "
                         f"with --resume")
                return done
            with self._lock:
                del self._pending[key]
            done += 1
        if self._down_since is not None:
            _say(f"MLflow at {uri} is reachable again after {now - self._down_since:.0f} s: "
                 f"logged {done} pending trial(s)")
            self._down_since = None
        return done


def _say(msg: str) -> None:
    """Tell the user (the driver's stderr) and the log."""
    print(msg, file=sys.stderr, flush=True)
    log.debug(msg)


# ---- reading searches back (warm starts) ----------------------------------------------------------
def parse_store_ref(ref: str) -> tuple[str, str | None, str | None, str | None]:
    """``<tracking URI>#<where>`` -> (tracking URI, experiment id, experiment name, parent run id).
    ``where``: an MLflow UI link's fragment (``/experiments/<id>`` or ``/experiments/<id>/runs/<run
    id>``) or an experiment (= search) name. ValueError when there is no ``#``."""
    import re

    uri, sep, where = ref.partition("#")
    if not sep or not uri or not where:
        raise ValueError(f"{ref!r} names no experiment: write <tracking URI>#<experiment name>, or paste the "
                         "MLflow UI's link (…/#/experiments/<id>[/runs/<parent run id>])")
    m = re.fullmatch(r"/experiments/(\d+)(?:/runs/([0-9a-f]+))?/?", where)
    if m:
        return uri.rstrip("/") if uri.startswith("http") else uri, m.group(1), None, m.group(2)
    return uri, None, where, None


def read_searches(ref: str) -> list[tuple[str, dict]]:
    """The searches logged in the MLflow store ``ref`` (``parse_store_ref``): per parent run,
    (``'<ref> run <id>'``, a dict like a saved searcher state: ``config`` from the parent's
    ``config.json``, ``results`` from its finished trial runs, in suggestion order (trial keys): schedule (from
    ``schedule.json``, hash checked), schedule_hash, nfe, score, failed, source, index). Screening and
    unfinished runs are left out. ValueError (naming the run) when the store, a parent or a child
    cannot be read or does not hold what a search logs."""
    import tempfile
    from pathlib import Path

    set_client_env()
    from mlflow.tracking import MlflowClient

    uri, exp_id, exp_name, run_id = parse_store_ref(ref)
    client = MlflowClient(tracking_uri=uri)
    try:
        if exp_name is not None:
            exp = client.get_experiment_by_name(exp_name)
            if exp is None:
                raise ValueError(f"{uri} holds no experiment named {exp_name!r}")
            exp_id = exp.experiment_id
        if run_id:
            parents = [client.get_run(run_id)]
        else:
            parents = _all_runs(client, exp_id, f"tags.`{KIND_TAG}` = 'search'")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 (an unreachable server, a bad URI, an unknown id)
        raise ValueError(f"cannot read {ref}: {first_line(e)}") from None
    if not parents:
        raise ValueError(f"{ref} holds no search (no parent run tagged {KIND_TAG}=search)")
    out = []
    with tempfile.TemporaryDirectory(prefix="s3warm-") as tmp:
        for p in sorted(parents, key=lambda r: r.info.start_time):
            where = f"{ref} run {p.info.run_id}"
            if p.data.tags.get(KIND_TAG) != "search":
                raise ValueError(f"{where} is not a search's parent run (tag {KIND_TAG} is "
                                 f"{p.data.tags.get(KIND_TAG)!r})")
            try:
                config = json.loads(Path(client.download_artifacts(p.info.run_id, "config.json", tmp)).read_text())
                kids = _all_runs(client, p.info.experiment_id,
                                 f"tags.`{PARENT_TAG}` = '{p.info.run_id}' and tags.`{KIND_TAG}` = 'trial'")
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{where}: cannot read its config.json or trial runs ({first_line(e)})") from None
            results = []
            for i, k in enumerate(sorted((k for k in kids if k.info.status in ("FINISHED", "FAILED")),
                                         key=lambda r: (r.data.tags.get(TRIAL_TAG, ""), r.info.start_time))):
                results.append(_result_of(client, k, i, tmp, where))
            out.append((where, {"config": config, "results": results}))
    return out


def _all_runs(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _result_of(client, run, index: int, tmp: str, where: str) -> dict:
    """One trial run as a searcher result (``read_searches``)."""
    from pathlib import Path

    rid = run.info.run_id
    try:
        text = Path(client.download_artifacts(rid, "schedule.json", f"{tmp}/{rid}")).read_text()
        s = SolverSchedule.from_json(text)
        score, nfe = float(run.data.metrics["score"]), int(run.data.params["nfe"])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{where}: trial run {rid} holds no valid schedule.json, score and nfe ({first_line(e)})") from None
    h = s.schedule_hash()
    if run.data.tags.get("s3.schedule_hash") != h or s.nfe() != nfe:
        raise ValueError(f"{where}: trial run {rid}'s schedule.json does not match its tags (hash {h}, NFE {s.nfe()}) "
                         "— edited or corrupt; not reused")
    failed = run.info.status == "FAILED" or run.data.metrics.get("failed", 0.0) == 1.0
    return {"schedule": s.to_json(), "schedule_hash": h, "nfe": nfe, "score": score, "failed": failed,
            "source": run.data.tags.get("s3.source") or run.data.params.get("source"), "index": index}
