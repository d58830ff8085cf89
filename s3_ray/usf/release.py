"""Import the public USF release's searched schedules (field names as in the release).

Supported: noise/data prediction, multistep/singlestep start points, Difference_K derivative
estimates with optional linear relaxation, pseudo/implicit correctors, AFS none/zero/average.
Rejected with a "not supported yet" message: ``dpmsolver_v3_prediction`` steps and non-trivial
skip coefficients (both need model-specific statistics this project does not have yet).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .schedule import ScheduleError, SolverSchedule

# Which noise schedule each model family of the release uses (see the data file's "source").
RELEASE_NOISE = {"edm": "edm", "score_sde": "vp_linear", "imagenet256": "vp_discrete", "latent_diffusion": "vp_discrete"}
_PRED = {"noise_prediction": "noise", "data_prediction": "data"}
_AFS = {"no_afs": "none", "zero_x0": "zero_x0", "average_x0": "mean_x0", None: "none", False: "none"}


class NotSupportedYet(ScheduleError):
    """A valid release schedule that uses a feature s3-ray does not implement yet."""


def default_release_file() -> Path:
    """The release's schedules, shipped with the package (a copy of shared/data)."""
    return Path(__file__).resolve().parents[1] / "assets" / "usf_release_schedules.json"


def load_release(path=None) -> dict:
    """The release's schedules by key (e.g. ``edm/cifar10_edm_nfe5``)."""
    path = Path(path) if path else default_release_file()
    with open(path) as f:
        data = json.load(f)
    return data["schedules"] if "schedules" in data else data


def claimed_nfe(key: str) -> int | None:
    m = re.search(r"nfe(\d+)$", key)
    return int(m.group(1)) if m else None


def _derivative(d: dict, where: str) -> dict:
    pts = d.get("active_points")
    if not isinstance(pts, list):
        raise ScheduleError(f"{where}.active_points: missing or not a list")
    est = d.get("estimate", "")
    m = re.fullmatch(r"Difference_(\d+)", str(est))
    if not m or int(m.group(1)) != len(pts):
        raise ScheduleError(f"{where}.estimate: {est!r} does not match {len(pts)} active points")
    rel = d.get("relaxation")
    out = {"points": pts}
    if rel == "linear":
        out["relaxation"] = {"kind": "linear", "slope": float(d.get("relaxation_coefficient") or 0.0)}
    elif rel is not None:
        raise ScheduleError(f"{where}.relaxation: {rel!r} is not a known relaxation")
    return out


def import_release_schedule(entry: dict, noise_schedule: str) -> SolverSchedule:
    """Convert one release schedule (``{"schedule": {...}}`` or the inner dict) to a SolverSchedule."""
    s = entry.get("schedule", entry)
    try:
        ts, orders, preds = s["timesteps"], s["orders"], s["prediction_types"]
        starts, derivs, corrs = s["start_points"], s["derivative_types"], s["corrector_types"]
    except KeyError as e:
        raise ScheduleError(f"release schedule: missing field {e.args[0]!r}") from None
    m = len(ts) - 1
    for name, v in (("orders", orders), ("prediction_types", preds), ("start_points", starts),
                    ("derivative_types", derivs), ("corrector_types", corrs)):
        if len(v) != m:
            raise ScheduleError(f"{name}: {len(v)} entries for {m} steps")
    skip = s.get("skip_coefficients")
    if skip is not None and any(float(c) != 1.0 for c in skip):
        raise NotSupportedYet("skip_coefficients: non-trivial skip coefficients are not supported yet")
    afs = s.get("afs")
    if afs not in _AFS:
        raise ScheduleError(f"afs: unknown value {afs!r}")
    steps = []
    for i in range(m):
        if preds[i] == "dpmsolver_v3_prediction":
            raise NotSupportedYet(f"steps[{i}].prediction: dpmsolver_v3_prediction is not supported yet")
        if preds[i] not in _PRED:
            raise ScheduleError(f"steps[{i}].prediction: unknown prediction type {preds[i]!r}")
        step = {"t": float(ts[i + 1]), "prediction": _PRED[preds[i]], "order": orders[i], "start": starts[i],
                "derivatives": [_derivative(d, f"steps[{i}].derivatives[{n}]") for n, d in enumerate(derivs[i])]}
        c = corrs[i]
        if c["type"] != "no_corrector":
            if c.get("start_point", starts[i] - 1) != starts[i] - 1:
                raise ScheduleError(f"steps[{i}].corrector.start_point: {c['start_point']} is not the step's start shifted by one")
            step["corrector"] = {"kind": c["type"], "order": c["taylor_order"],
                                 "derivatives": [_derivative(d, f"steps[{i}].corrector.derivatives[{n}]")
                                                 for n, d in enumerate(c.get("derivative_type") or [])]}
        steps.append(step)
    return SolverSchedule.from_dict(
        {"noise_schedule": noise_schedule, "t_start": float(ts[0]), "afs": _AFS[afs], "steps": steps})


def import_release(key_or_file: str, noise_schedule: str | None = None, release_path=None) -> SolverSchedule:
    """Import by release key (``edm/cifar10_edm_nfe5``) or from a JSON file holding one release
    schedule (then ``noise_schedule`` is required)."""
    p = Path(key_or_file)
    if p.suffix == ".json" and p.exists():
        if noise_schedule is None:
            raise ScheduleError("noise_schedule: required when importing a file (edm, vp_linear, vp_discrete, ...)")
        with open(p) as f:
            return import_release_schedule(json.load(f), noise_schedule)
    schedules = load_release(release_path)
    if key_or_file not in schedules:
        raise ScheduleError(f"{key_or_file!r} is neither a release key nor a .json file (keys look like {next(iter(schedules))!r})")
    family = key_or_file.split("/", 1)[0]
    return import_release_schedule(schedules[key_or_file], noise_schedule or RELEASE_NOISE[family])
