"""The ``s3`` command. Thin: parses arguments and calls the layers below.

Errors in user input (schedules, configs, checkpoints) exit with status 2 and one message, no
traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from s3_ray.usf.schedule import MAX_ORDER, MAX_STEPS, NOISE_NAMES, ScheduleError

MAX_SAMPLES = 100_000  # held in memory at once; FID-50k is the usual size
MAX_GRID = 10_000  # images in one `s3 sample` grid
MAX_SEED = 2**31 - 1
MAX_NFE = MAX_STEPS - 1  # AFS buys one more step than NFE


class UsageError(Exception):
    """Bad user input: printed as one line, exit status 2."""


# ---- argparse types: a bad value is reported by argparse as "argument --flag: ...", exit 2 -------

def int_range(lo: int, hi: int):
    """argparse type: an integer in lo..hi."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {v}")
        return v
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def nfe_list(text: str) -> list[int]:
    """argparse type: comma-separated NFE values, e.g. 3,4,5."""
    return [int_range(1, MAX_NFE)(v) for v in text.split(",")]


def unwritable(path, directory: bool = False) -> str | None:
    """Why ``path`` cannot be written as a file (or created / filled as a directory); None if it
    can. Leaves nothing behind: a directory is tried with a probe file that is removed at once."""
    p = Path(path)
    if p.exists():
        if p.is_dir() != directory:
            return "is a directory" if p.is_dir() else "exists and is not a directory"
        if directory:
            return _probe(p)
        return None if os.access(p, os.W_OK) else "is not writable"
    parent = p.parent
    if not directory and not parent.is_dir():
        return f"directory {parent} does not exist" if not parent.exists() else f"{parent} is not a directory"
    while not parent.exists():
        parent = parent.parent
    return _probe(parent) if parent.is_dir() else f"{parent} is not a directory"


def _probe(d: Path) -> str | None:
    try:
        fd, name = tempfile.mkstemp(dir=d, prefix=".s3-write-check-")
    except OSError as e:
        return f"cannot write in {d} ({e.strerror})"
    os.close(fd)
    os.unlink(name)
    return None


def out_file(text: str) -> str:
    """argparse type: a file this command may create or overwrite ('-': standard output)."""
    why = None if text == "-" else unwritable(text)
    if why:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return text


def out_dir(text: str) -> str:
    """argparse type: a directory this command may create or write into."""
    why = unwritable(text, directory=True)
    if why:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return text


def image_file(text: str) -> str:
    """argparse type: an image file to write (its suffix names a format PIL writes)."""
    from PIL import Image

    if Path(text).suffix.lower() not in Image.registered_extensions():
        raise argparse.ArgumentTypeError(f"{text}: not an image file name (use .png)")
    return out_file(text)


def _noise(name: str):
    from s3_ray.usf.noise import get_noise_schedule

    return get_noise_schedule(name)


# ---- schedules ---------------------------------------------------------------------------------

def cmd_baseline(a):
    from s3_ray.usf.baselines import build_baseline

    if a.space is not None:  # the space's model gives the noise schedule (and the GITS model)
        from s3_ray.config import load_config
        from s3_ray.models.pipeline import noise_for

        noise = noise_for(load_config(a.space).model)
        if a.noise_schedule not in (None, noise.name):
            raise UsageError(f"--noise-schedule: {a.noise_schedule!r} differs from the space's {noise.name!r}")
    else:
        noise = _noise(a.noise_schedule or "vp_linear")
    if a.t_end is not None and not a.t_end < noise.T:
        raise UsageError(f"--t-end: {a.t_end:g} is not below T = {noise.T:g} of noise schedule {noise.name!r}")
    opts = dict(order=a.order, t_end=a.t_end, afs=a.afs, lower_order_final=a.lower_order_final or None,
                prediction=a.prediction)
    grid = _gits_grid(a, noise, opts) if a.discretization == "gits" else None
    s = build_baseline(a.name, noise, a.nfe, discretization=a.discretization, grid=grid, **opts)
    _write(s, a.out)
    print(f"{a.name}: {len(s.steps)} steps, NFE {s.nfe()} -> {a.out}")


def _gits_grid(a, noise, opts):
    """The GITS grid of baseline a.name at a.nfe on the space's model (or the embedded one), cached."""
    import torch

    from s3_ray.metrics.baseline_table import gits_grid_for
    from s3_ray.metrics.fid import cache_dir

    torch.set_num_threads(1)
    target = _target(space=a.space)
    print(f"GITS grid for {a.name} at NFE {a.nfe} (computed once per model, cached in {cache_dir() / 'gits'})",
          file=sys.stderr)
    return gits_grid_for(target, a.name, a.nfe, **opts)


def cmd_validate(a):
    from s3_ray.usf.schedule import load_schedule

    s = load_schedule(a.file)
    print(f"{a.file}: valid, {len(s.steps)} steps, NFE {s.nfe()}, hash {s.schedule_hash()[:12]}")


def cmd_show(a):
    from s3_ray.usf.schedule import load_schedule

    s = load_schedule(a.file)
    print(format_schedule_table(s, _noise(a.noise_schedule or s.noise_schedule)))


def cmd_import_usf(a):
    from s3_ray.usf.release import claimed_nfe, import_release

    s = import_release(a.source, noise_schedule=a.noise_schedule)
    _write(s, a.out)
    claim = claimed_nfe(a.source)
    extra = f" (the release claims {claim})" if claim is not None else ""
    print(f"{a.source}: {len(s.steps)} steps, NFE {s.nfe()}{extra} -> {a.out}")


def _write(s, out):
    if out in (None, "-"):
        print(s.to_json(indent=1))
    else:
        s.save(out)


def format_schedule_table(s, noise) -> str:
    """Per-step table: t, lambda, h, order, prediction, start, derivative points, corrector; and NFE."""
    import numpy as np

    lam = noise.lambda_(np.array(s.times))
    rows = [f"{'step':>4} {'t':>12} {'lambda':>8} {'h':>7} {'ord':>3} {'pred':>5} {'start':>5} "
            f"{'derivative points':<24} corrector"]
    rows.append(f"{'T':>4} {s.t_start:>12.6g} {lam[0]:>8.3f}   afs={s.afs}")
    for i, st in enumerate(s.steps):
        pts = " ".join(",".join(str(p) for p in d.points) + ("" if d.relaxation.is_identity else f"[{_relax(d.relaxation)}]")
                       for d in st.derivatives) or "-"
        if st.combine != "taylor":
            pts = f"{st.combine}: {pts}"
        c = st.corrector
        corr = "-" if c is None else f"{c.kind} o{c.order}" + (f" {c.combine}" if c.combine != "taylor" else "") + " " + \
            " ".join(",".join(str(p) for p in d.points) for d in c.derivatives)
        rows.append(f"{i:>4} {st.t:>12.6g} {lam[i + 1]:>8.3f} {lam[i + 1] - lam[i]:>7.3f} {st.order:>3} "
                    f"{st.prediction:>5} {st.start:>5} {pts:<24} {corr}")
    rows.append(f"NFE {s.nfe()} ({len(s.steps)} steps, noise schedule {s.noise_schedule})")
    return "\n".join(rows)


def _relax(r) -> str:
    return r.kind if r.kind != "linear" else f"{r.scale:g}{r.slope:+g}h"


# ---- evaluation on the embedded model -----------------------------------------------------------

def _target(reference: str | None = None, space: str | None = None):
    """The embedded digits model, or the model and metric of a search space (``--space``)."""
    from s3_ray.config import MetricConfig, ModelConfig, load_config
    from s3_ray.metrics.evaluate import get_target

    if space is None:
        model, metric = ModelConfig(), MetricConfig(reference=reference or "data")
    else:
        cfg = load_config(space)
        model, metric = cfg.model, cfg.metric.model_copy(update={"reference": reference or cfg.metric.reference})
    return get_target(model.model_dump_json(), metric.model_dump_json())


def cmd_evaluate(a):
    import torch

    from s3_ray.metrics.evaluate import REFERENCE_SOLVER, evaluate
    from s3_ray.usf.schedule import load_schedule

    torch.set_num_threads(1)
    s = load_schedule(a.schedule)
    target = _target(a.reference, space=a.space)
    r = evaluate(s, target, n=a.samples, seed=a.seed)
    flag = "  FAILED (NaN/Inf samples: worst score)" if r["failed"] else ""
    score = (f"FID {r['fid']:.3f}  KID {r['kid']:.5f} ± {r['kid_std']:.5f}" if "fid" in r
             else f"RMSE {r['rmse']:.5f} (vs a {REFERENCE_SOLVER[1]}-NFE solve)")
    print(f"{a.schedule}: NFE {r['nfe']}  {score}  ({a.samples} samples, seed {a.seed}, "
          f"{target.metric_cfg.reference} reference, {r['seconds']:.2f} s){flag}")


def cmd_baselines(a):
    from s3_ray.metrics.baseline_table import baseline_table

    baseline_table(a.nfe, samples=a.samples, seeds=a.seeds, out_dir=a.out_dir)


def cmd_sample(a):
    import torch

    from s3_ray.metrics.fid import uint8_images
    from s3_ray.tracking.plots import image_grid
    from s3_ray.usf.schedule import load_schedule

    torch.set_num_threads(1)
    s = load_schedule(a.schedule)
    try:
        x = _target(space=a.space).sample(s, a.n, a.seed)
    except RuntimeError as e:  # a coefficient beyond float32 (as in evaluate()): the solve blew up
        if "overflow" not in str(e):
            raise
        x = torch.full((1,), float("nan"))
    if not torch.isfinite(x).all():
        raise UsageError(f"{a.schedule}: the schedule produced NaN/Inf samples")
    image_grid(uint8_images(x), a.out, ncol=a.ncol)
    print(f"{a.n} samples (NFE {s.nfe()}) -> {a.out}")


def cmd_train_model(a):
    from s3_ray.models.train import main as train_main

    argv = [a.what, "--out", a.out] + (["--steps", str(a.steps)] if a.steps is not None else [])
    if train_main(argv) != 0:
        raise UsageError("training failed")


# ---- search ---------------------------------------------------------------------------------------

def cmd_search(a):
    from s3_ray.config import load_config, with_overrides
    from s3_ray.search.driver import run_search

    cfg = with_overrides(load_config(a.space), {"budget": ("--budget", a.budget), "name": ("--name", a.name),
                                                "warm_start": ("--warm-start", tuple(a.warm_start) if a.warm_start else None)})
    run_search(cfg, address=a.address, mlflow_uri=a.mlflow_uri, algo=a.algo, resume=a.resume, fresh=a.fresh,
               runs_root=a.runs)


def cmd_report(a):
    """Print the path of a search's report.html (written from the run directory if missing); --open shows it."""
    import webbrowser

    from s3_ray.tracking.report import REPORT, write_report

    run_dir = Path(a.run_dir)
    path = run_dir / REPORT
    if not path.is_file():
        if not (run_dir / "summary.json").is_file() or not (run_dir / "config.json").is_file():
            raise UsageError(f"{run_dir}: not the directory of a finished search (no summary.json or config.json)")
        path = write_report(run_dir)
    print(path.resolve())
    if a.open:
        try:
            webbrowser.get().open(path.resolve().as_uri())
        except webbrowser.Error:
            print("no web browser found on this machine: open the file above where there is one", file=sys.stderr)


def cmd_export(a):
    """A search's best schedules as an S3Scheduler folder, or a pipeline folder using it."""
    from s3_ray.pipelines.export import ExportError, export_diffusers

    try:
        out = export_diffusers(Path(a.run), Path(a.diffusers), pipeline=Path(a.pipeline) if a.pipeline else None,
                               nfes=a.nfe, force=a.force)
    except ExportError as e:
        raise UsageError(str(e)) from None
    what = "pipeline" if a.pipeline else "scheduler"
    print(f"wrote the {what} folder {out}")
    if a.pipeline:
        print(f"load it: import s3_ray; DiffusionPipeline.from_pretrained({str(out)!r})")
    else:
        print(f"load it: pipe.scheduler = s3_ray.S3Scheduler.from_pretrained({str(out)!r})")


# ---- cluster jobs (Ray Jobs API; logic in s3_ray/cluster.py) --------------------------------------

def cmd_submit(a):
    from s3_ray.cluster import ClusterError, submit_search

    try:
        client, job_id, name = submit_search(
            a.address, a.space, mlflow_uri=a.mlflow_uri, budget=a.budget, algo=a.algo, name=a.name, runs=a.runs,
            resume=a.resume, fresh=a.fresh, working_dir=a.working_dir, submission_id=a.submission_id,
            token_file=a.auth_token_file, python=a.python)
        print(f"submitted search {name!r} as job {job_id} to {client.address}")
        print(f"follow it: s3 jobs logs --follow {job_id} --address {client.address}")
        print(f"       or: {client.logs_command(job_id)}")
        if a.wait:
            status = client.follow(job_id)
            print(f"job {job_id}: {status}")
            if status != "SUCCEEDED":
                raise SystemExit(1)
    except ClusterError as e:
        raise UsageError(str(e)) from None


def cmd_jobs(a):
    from s3_ray.cluster import ClusterError, JobsClient, format_jobs

    try:
        client = JobsClient(a.address, a.auth_token_file)
        if a.action == "list":
            print(format_jobs(client.list()))
            return
        if not a.job:
            raise UsageError(f"s3 jobs {a.action} needs a JOB (submission id)")
        if a.action == "status":
            info = client.info(a.job)
            print(f"{a.job}: {client.status(a.job)}" + (f" ({info.message})" if info.message else ""))
        elif a.action == "logs":
            if a.follow:
                status = client.follow(a.job)
                print(f"job {a.job}: {status}", file=sys.stderr)
            else:
                print(client.logs(a.job), end="")
        elif a.action == "stop":
            stopped = client.stop(a.job)
            print(f"{a.job}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
    except ClusterError as e:
        raise UsageError(str(e)) from None


def _cluster_parsers(sub):
    def common(q):
        q.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 "
                       "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")
        q.add_argument("--auth-token-file", help="token of a RAY_AUTH_MODE=token cluster (default: $RAY_AUTH_TOKEN, "
                       "$RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token when RAY_AUTH_MODE=token)")

    su = sub.add_parser("submit", help="run `s3 search` on a Ray cluster as a Ray job (Jobs API)")
    common(su)
    su.add_argument("--space", default="search_spaces/digits.yaml", help="validated here and sent inline")
    su.add_argument("--mlflow-uri", help="tracking URI as seen from the head node (default: sqlite in the run dir)")
    su.add_argument("--budget", type=int_range(1, 10_000_000), help="override the space's number of true evaluations")
    su.add_argument("--algo", choices=("s3", "evolution", "random", "optuna-tpe"), default="s3")
    su.add_argument("--name", help="override the run name (<runs>/<name>/)")
    su.add_argument("--runs", help="run directories root on the cluster; must be storage shared by every node "
                    "(default: runs/ in the job's working directory)")
    g = su.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true")
    g.add_argument("--fresh", action="store_true")
    su.add_argument("--working-dir", help="upload this directory as the job's working dir (default: none, the "
                    "cluster's installed s3_ray)")
    su.add_argument("--submission-id", help="default: Ray's raysubmit_...")
    su.add_argument("--python", default="python", help="python on the cluster that has s3_ray (default: python)")
    su.add_argument("--wait", action="store_true", help="follow the logs; exit 1 unless the job succeeds")
    su.set_defaults(fn=cmd_submit)

    jb = sub.add_parser("jobs", help="list Ray jobs, or show/follow/stop one")
    jb.add_argument("action", choices=("list", "status", "logs", "stop"))
    jb.add_argument("job", nargs="?", help="submission id (raysubmit_...)")
    common(jb)
    jb.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jb.set_defaults(fn=cmd_jobs)


def cmd_mlflow_server(a):
    from s3_ray.tracking.server import ServerError, serve

    try:
        rc = serve(a.host, a.port, a.runs, allowed_hosts=a.allowed_hosts, timeout=a.timeout,
                   backend_store_uri=a.backend_store_uri)
    except ServerError as e:
        raise UsageError(str(e)) from None
    if rc:
        raise UsageError(f"the MLflow server exited with status {rc} (its output is above)")


# ---- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from s3_ray.usf.baselines import ALL_DISCRETIZATIONS, BASELINES

    p = argparse.ArgumentParser(prog="s3", description="USF/S3 solver schedules for diffusion models")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("baseline", help="write a baseline solver as a schedule JSON")
    b.add_argument("name", choices=sorted(BASELINES))
    b.add_argument("--nfe", type=int_range(1, MAX_NFE), required=True)
    b.add_argument("--order", type=int_range(1, MAX_ORDER))
    b.add_argument("--discretization", choices=ALL_DISCRETIZATIONS, default="logsnr_uniform",
                   help="ays_sd15/ays_sdxl: Stable Diffusion's noise schedule only; gits: computed from the model")
    b.add_argument("--noise-schedule", choices=NOISE_NAMES, help="default: the --space model's, else vp_linear")
    b.add_argument("--space", help="search space whose model gives the noise schedule and the GITS teacher")
    b.add_argument("--t-end", type=positive_float)
    b.add_argument("--afs", choices=("none", "zero_x0", "mean_x0"), default="none")
    b.add_argument("--prediction", choices=("noise", "data"))
    b.add_argument("--lower-order-final", action="store_true")
    b.add_argument("--out", type=out_file, default="-", help="output file (default: stdout)")
    b.set_defaults(fn=cmd_baseline)

    sc = sub.add_parser("schedule", help="validate, show or import schedules").add_subparsers(dest="sub", required=True)
    v = sc.add_parser("validate", help="exit 0 if FILE is a valid schedule, else 2 with the reason")
    v.add_argument("file")
    v.set_defaults(fn=cmd_validate)
    s = sc.add_parser("show", help="per-step table of a schedule")
    s.add_argument("file")
    s.add_argument("--noise-schedule", choices=NOISE_NAMES, help="override the schedule's noise schedule for lambda")
    s.set_defaults(fn=cmd_show)
    i = sc.add_parser("import-usf", help="import a schedule of the public USF release")
    i.add_argument("source", help="release key (e.g. score_sde/cifar10_sde_nfe9) or a JSON file")
    i.add_argument("--noise-schedule", choices=NOISE_NAMES, help="required for a file")
    i.add_argument("--out", type=out_file, default="-")
    i.set_defaults(fn=cmd_import_usf)

    e = sub.add_parser("evaluate", help="FID/KID (or RMSE) of a schedule on the embedded digits model or a space's model")
    e.add_argument("--schedule", required=True)
    e.add_argument("--space", help="use this search space's model and metric (default: the embedded digits model)")
    e.add_argument("--samples", type=int_range(2, MAX_SAMPLES), default=1000)
    e.add_argument("--seed", type=int_range(0, MAX_SEED), default=0)
    e.add_argument("--reference", choices=("data", "model"), help="FID reference (default: data, or the space's)")
    e.set_defaults(fn=cmd_evaluate)

    bt = sub.add_parser("baselines", help="table of every baseline x discretisation on the embedded model")
    bt.add_argument("--nfe", type=nfe_list, default="3,4,5,6,8,10")
    bt.add_argument("--samples", type=int_range(2, MAX_SAMPLES), default=1000)
    bt.add_argument("--seeds", type=int_range(1, 100), default=2)
    bt.add_argument("--out-dir", type=out_dir, default="benchmarks/results")
    bt.set_defaults(fn=cmd_baselines)

    sm = sub.add_parser("sample", help="an image grid of a schedule's samples (embedded model or a space's model)")
    sm.add_argument("--schedule", required=True)
    sm.add_argument("--space", help="use this search space's model (default: the embedded digits model)")
    sm.add_argument("--out", type=image_file, required=True)
    sm.add_argument("--n", type=int_range(1, MAX_GRID), default=64)
    sm.add_argument("--ncol", type=int_range(1, MAX_GRID), default=16)
    sm.add_argument("--seed", type=int_range(0, MAX_SEED), default=0)
    sm.set_defaults(fn=cmd_sample)

    tm = sub.add_parser("train-model", help="train the embedded digits diffusion model or feature classifier")
    tm.add_argument("what", choices=("diffusion", "classifier"))
    tm.add_argument("--out", type=out_dir, required=True)
    tm.add_argument("--steps", type=int_range(1, 10_000_000))
    tm.set_defaults(fn=cmd_train_model)

    se = sub.add_parser("search", help="run an S3 search (Ray Tune + MLflow)")
    se.add_argument("--space", default="search_spaces/digits.yaml")
    se.add_argument("--address", help="Ray cluster address (default: a local Ray on 127.0.0.1)")
    se.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite file in the run directory)")
    se.add_argument("--budget", type=int_range(1, 10_000_000), help="override the space's number of true evaluations")
    se.add_argument("--algo", choices=("s3", "evolution", "random", "optuna-tpe"), default="s3")
    se.add_argument("--name", help="override the run name (runs/<name>/)")
    se.add_argument("--runs", type=out_dir, default="runs", help="root directory of run directories")
    se.add_argument("--warm-start", action="append", metavar="RUN_DIR|URI#EXPERIMENT", help=(
        "reuse an earlier search's results (same model, metric and seed): its run directory "
        "(runs/<name>) or its MLflow experiment (<tracking URI>#<name>, or a link copied from the "
        "MLflow UI); repeatable; overrides the space's warm_start"))
    g = se.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the search in runs/<name>/")
    g.add_argument("--fresh", action="store_true", help="delete runs/<name>/ and start over")
    se.set_defaults(fn=cmd_search)

    ms = sub.add_parser("mlflow-server", help="run an MLflow tracking server (sqlite + artifacts under --runs)")
    ms.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    ms.add_argument("--port", type=int_range(1, 65535), default=5000)
    ms.add_argument("--runs", type=out_dir, default="runs", help="directory of mlflow-server.db and mlartifacts/")
    ms.add_argument("--backend-store-uri", help=("where runs are stored: default sqlite:///<runs>/mlflow-server.db; "
                                                 "postgresql://USER[:PASSWORD]@HOST:PORT/DB for a shared server"))
    ms.add_argument("--allowed-hosts", help="Host headers MLflow accepts (e.g. mlflow:5000 behind a network name)")
    ms.add_argument("--timeout", type=positive_float, default=120.0, help="seconds to wait for /health")
    ms.set_defaults(fn=cmd_mlflow_server)

    rp = sub.add_parser("report", help="the path of a search's report.html (regenerated if missing); --open shows it")
    rp.add_argument("run_dir", help="the search's run directory, e.g. runs/digits")
    rp.add_argument("--open", action="store_true", help="open it in a web browser (where this machine has one)")
    rp.set_defaults(fn=cmd_report)
    ex = sub.add_parser("export", help="a search's best schedules as a diffusers S3Scheduler (or pipeline) folder")
    ex.add_argument("--run", required=True, help="the search's run directory, e.g. runs/NAME")
    ex.add_argument("--diffusers", type=out_dir, required=True, metavar="OUT_DIR",
                    help="folder to write (a scheduler folder; with --pipeline, a pipeline folder)")
    ex.add_argument("--pipeline", metavar="PIPE_DIR",
                    help="the original pipeline folder: OUT_DIR becomes a pipeline that links its components")
    ex.add_argument("--nfe", type=nfe_list, help="export only these NFEs (default: every one the run has)")
    ex.add_argument("--force", action="store_true", help="replace an earlier export in OUT_DIR")
    ex.set_defaults(fn=cmd_export)
    _cluster_parsers(sub)
    return p


def one_line(e: BaseException) -> str:
    """The message of a user-input error on one line (a pydantic error as 'field: reason; ...')."""
    from pydantic import ValidationError

    from s3_ray.usf.schedule import format_validation_error

    if isinstance(e, ValidationError):
        return format_validation_error(e)
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from s3_ray.config import ConfigError

    try:
        args.fn(args)
    except (ScheduleError, UsageError, ConfigError, ValueError, OSError) as e:
        if isinstance(e, OSError) and e.filename is None:
            raise  # not a file the user named (e.g. a connection): not an input error
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from s3_ray.search.driver import SearchError

        if not isinstance(e, SearchError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
