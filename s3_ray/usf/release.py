"""Import the public USF release's searched schedules (field names as in the release).

Supported: noise/data/DPM-Solver-v3 prediction, multistep/singlestep start points, Difference_K
derivative estimates with optional linear relaxation, pseudo/implicit correctors, AFS none/zero/average.
``dpmsolver_v3_prediction`` steps run with the target model's EMS (usf/ems.py; the release ships its own
statistics for its models, which we do not have: we compute ours). Rejected with a "not supported yet"
message: non-trivial skip coefficients (model-specific scales of the release's own search).
"""

from __future__ import annotations

import re
from pathlib import Path

from .schedule import ScheduleError, SolverSchedule, read_json

# Which noise schedule each model family of the release uses (see the data file's "source").
RELEASE_NOISE = {"edm": "edm", "score_sde": "vp_linear", "imagenet256": "vp_discrete", "latent_diffusion": "vp_discrete"}
_PRED = {"noise_prediction": "noise", "data_prediction": "data", "dpmsolver_v3_prediction": "dpmsolver_v3"}
_AFS = {"no_afs": "none", "zero_x0": "zero_x0", "average_x0": "mean_x0", None: "none", False: "none"}


class NotSupportedYet(ScheduleError):
    """A valid release schedule that uses a feature s3-ray does not implement yet."""


def default_release_file() -> Path:
    """The release's schedules, shipped with the package (a copy of shared/data)."""
    return Path(__file__).resolve().parents[1] / "assets" / "usf_release_schedules.json"


def load_release(path=None) -> dict:
    """The release's schedules by key (e.g. ``edm/cifar10_edm_nfe5``)."""
    path = Path(path) if path else default_release_file()
    data = read_json(path)
    if not isinstance(data, dict):
        raise ScheduleError(f"{path}: the release file is a JSON object of schedules by key")
    return data["schedules"] if "schedules" in data else data


def claimed_nfe(key: str) -> int | None:
    m = re.search(r"nfe(\d+)$", key)
    return int(m.group(1)) if m else None


def _derivative(d, where: str, prediction: str) -> dict:
    """One derivative spec. The release's ``linear`` relaxation is R = 1 + c h (h > 0, the step in
    lambda) for every prediction type; ours is R = 1 + slope h~ with h~ = -h for data prediction (h for
    noise and dpmsolver_v3)."""
    if not isinstance(d, dict):
        raise ScheduleError(f"{where}: expected an object, got {type(d).__name__}")
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
        c = _number(d.get("relaxation_coefficient") or 0.0, f"{where}.relaxation_coefficient")
        out["relaxation"] = {"kind": "linear", "slope": -c if prediction == "data" and c else c}
    elif rel is not None:
        raise ScheduleError(f"{where}.relaxation: {rel!r} is not a known relaxation")
    return out


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ScheduleError(f"{where}: expected a number, got {v!r}"[:200])
    return float(v)


def _fields(s) -> dict:
    """The release's per-step lists, checked to be lists of one length (one entry per step)."""
    if not isinstance(s, dict):
        raise ScheduleError(f"a release schedule is a JSON object, got {type(s).__name__}")
    out = {}
    for name in _LISTS:
        if name not in s:
            raise ScheduleError(f"release schedule: missing field {name!r}")
        if not isinstance(s[name], list):
            raise ScheduleError(f"{name}: expected a list, got {type(s[name]).__name__}")
        out[name] = s[name]
    m = len(out["timesteps"]) - 1
    for name in _LISTS[1:]:
        if len(out[name]) != m:
            raise ScheduleError(f"{name}: {len(out[name])} entries for {m} steps")
    return out


_LISTS = ("timesteps", "orders", "prediction_types", "start_points", "derivative_types", "corrector_types")


def _corrector(c, start, pred: str, i: int) -> dict | None:
    where = f"corrector_types[{i}]"
    if not isinstance(c, dict) or "type" not in c:
        raise ScheduleError(f"{where}.type: missing (an object with 'type': no_corrector, pseudo or implicit)")
    if c["type"] == "no_corrector":
        return None
    if c.get("start_point", start - 1) != start - 1:
        raise ScheduleError(f"{where}.start_point: {c['start_point']!r} is not the step's start shifted by one")
    derivs = c.get("derivative_type") or []
    if not isinstance(derivs, list):
        raise ScheduleError(f"{where}.derivative_type: expected a list, got {type(derivs).__name__}")
    return {"kind": c["type"], "order": c.get("taylor_order"),
            "derivatives": [_derivative(d, f"{where}.derivative_type[{n}]", pred) for n, d in enumerate(derivs)]}


def import_release_schedule(entry, noise_schedule: str) -> SolverSchedule:
    """Convert one release schedule (``{"schedule": {...}}`` or the inner dict) to a SolverSchedule."""
    if not isinstance(entry, dict):
        raise ScheduleError(f"a release schedule is a JSON object, got {type(entry).__name__}")
    s = entry.get("schedule", entry)
    f = _fields(s)
    ts = [_number(v, f"timesteps[{i}]") for i, v in enumerate(f["timesteps"])]
    skip = s.get("skip_coefficients")
    if skip is not None and not isinstance(skip, list):
        raise ScheduleError(f"skip_coefficients: expected a list, got {type(skip).__name__}")
    if skip is not None and any(_number(c, "skip_coefficients") != 1.0 for c in skip):
        raise NotSupportedYet("skip_coefficients: non-trivial skip coefficients (scales on the release's own "
                              "networks' skip connections, not solver decisions) are not supported")
    afs = s.get("afs")
    if not isinstance(afs, (str, bool, type(None))) or afs not in _AFS:
        raise ScheduleError(f"afs: unknown value {afs!r}"[:200])
    steps = []
    for i in range(len(ts) - 1):
        pred, start, derivs = f["prediction_types"][i], f["start_points"][i], f["derivative_types"][i]
        if not isinstance(pred, str) or pred not in _PRED:
            raise ScheduleError(f"prediction_types[{i}]: unknown prediction type {pred!r}"[:200])
        if not isinstance(derivs, list):
            raise ScheduleError(f"derivative_types[{i}]: expected a list, got {type(derivs).__name__}")
        if isinstance(start, bool) or not isinstance(start, int):
            raise ScheduleError(f"start_points[{i}]: expected an integer, got {start!r}"[:200])
        p = _PRED[pred]
        step = {"t": ts[i + 1], "prediction": p, "order": f["orders"][i], "start": start,
                "derivatives": [_derivative(d, f"derivative_types[{i}][{n}]", p) for n, d in enumerate(derivs)]}
        corrector = _corrector(f["corrector_types"][i], start, p, i)
        if corrector is not None:
            step["corrector"] = corrector
        steps.append(step)
    return SolverSchedule.from_dict(
        {"noise_schedule": noise_schedule, "t_start": ts[0], "afs": _AFS[afs], "steps": steps})


def import_release(key_or_file: str, noise_schedule: str | None = None, release_path=None) -> SolverSchedule:
    """Import by release key (``edm/cifar10_edm_nfe5``) or from a JSON file holding one release
    schedule (then ``noise_schedule`` is required)."""
    p = Path(key_or_file)
    if p.suffix == ".json" and p.exists():
        if noise_schedule is None:
            raise ScheduleError("noise_schedule: required when importing a file (edm, vp_linear, vp_discrete, ...)")
        data = read_json(p)
        try:
            return import_release_schedule(data, noise_schedule)
        except NotSupportedYet as e:
            raise NotSupportedYet(f"{p}: {e}") from None
        except ScheduleError as e:
            raise ScheduleError(f"{p}: {e}") from None
    schedules = load_release(release_path)
    if key_or_file not in schedules:
        raise ScheduleError(f"{key_or_file!r} is neither a release key nor a .json file (keys look like {next(iter(schedules))!r})")
    family = key_or_file.split("/", 1)[0]
    return import_release_schedule(schedules[key_or_file], noise_schedule or RELEASE_NOISE[family])
