"""The solver schedule: every decision of one USF solver, as a validated pydantic model.

A schedule of M steps goes t_start = t_0 > t_1 > ... > t_M. Step i ends at ``steps[i].t``.
History entries (one per visited time, newest = -1) are indexed relative to the newest entry:
before step i there are i + 1 entries (t_0 .. t_i); a corrector sees one more (t_{i+1} as -1).

Canonical JSON (sorted keys, exact float repr) is the storage format; ``schedule_hash`` is the
sha256 of it. Validation errors name the step and field, e.g. ``steps[3].derivatives[1].points``.
JSON is validated with strict types (a number is not a string, an integer not a boolean; an integer
is a valid float), a file is read up to ``MAX_FILE_BYTES``, and a schedule has at most ``MAX_STEPS``
steps, all within (0, T] of its named noise schedule.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .noise import NOISE_SCHEDULES, get_noise_schedule

FORMAT_VERSION = 1
MAX_ORDER = 4  # predictor Taylor order
MAX_CORRECTOR_ORDER = 5  # a corrector may go one order above its predictor
MAX_STEPS = 1000  # the 100-NFE reference solves have 100 steps; searches use at most 64
MAX_FILE_BYTES = 4 * 2**20  # a 1000-step schedule file is about 0.3 MB
NOISE_NAMES = tuple(sorted([*NOISE_SCHEDULES, "vp_discrete"]))
T_TOLERANCE = 1e-6  # relative: the release's EDM schedules start at float32(80) = 80.0000076

Prediction = Literal["noise", "data", "dpmsolver_v3"]  # v3: needs the model's EMS (usf/ems.py)
Combine = Literal["taylor", "bh1", "bh2"]


class ScheduleError(ValueError):
    """A schedule (or schedule file) is malformed; the message names the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Relaxation(_Strict):
    """Factor R applied to one derivative estimate: F^(n) <- R F^(n).

    ``linear``: R = scale + slope * h~.  Named factors (``scale``/``slope`` unused):
    ``dpmsolver2``/``unipc_bh2``: R = h~ (e^h~ - 1) / (2 (e^h~ - 1 - h~)); ``unipc_bh1``:
    R = h~^2 / (2 (e^h~ - 1 - h~)). Here h~ is the argument of the step's phi-functions:
    h~ = h for noise prediction and h~ = -h for data prediction (h = lambda_t - lambda_s > 0);
    dpmsolver_v3 steps take only ``linear`` with h~ = h (as the public USF release does).
    """

    kind: Literal["linear", "dpmsolver2", "unipc_bh1", "unipc_bh2"] = "linear"
    scale: float = 1.0
    slope: float = 0.0

    @model_validator(mode="after")
    def _check(self):
        if not (math.isfinite(self.scale) and math.isfinite(self.slope)):
            raise ValueError("scale and slope must be finite numbers")
        if self.kind != "linear" and (self.scale != 1.0 or self.slope != 0.0):
            raise ValueError(f"scale/slope apply only to kind 'linear', not {self.kind!r}")
        return self

    @property
    def is_identity(self) -> bool:
        return self.kind == "linear" and self.scale == 1.0 and self.slope == 0.0


class Derivative(_Strict):
    """Estimate of one derivative F^(n) at the start point from history ``points`` (relative
    indices, distinct, not the start point): the n-th derivative of the interpolating polynomial
    through the start point and these K >= n points."""

    points: tuple[int, ...]
    relaxation: Relaxation = Relaxation()

    @field_validator("points")
    @classmethod
    def _points(cls, v):
        if len(v) == 0:
            raise ValueError("needs at least one history point")
        if any(p >= 0 for p in v):
            raise ValueError(f"history indices are negative (-1 = newest), got {list(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"history indices must be distinct, got {list(v)}")
        return tuple(sorted(v, reverse=True))


class Corrector(_Strict):
    """UniC-style correction after the predictor, from the step's start point (shifted by the new
    entry) with ``order`` and derivative sets that may use the new point -1.

    ``pseudo`` keeps the model output evaluated at the predicted state; ``implicit`` re-evaluates
    the model at the corrected state (one more NFE)."""

    kind: Literal["pseudo", "implicit"]
    order: int = Field(ge=2, le=MAX_CORRECTOR_ORDER)
    derivatives: tuple[Derivative, ...] = ()
    combine: Combine = "taylor"


class Step(_Strict):
    """One predictor step ending at time ``t`` (optionally followed by a corrector)."""

    t: float
    prediction: Prediction
    order: int = Field(ge=1, le=MAX_ORDER)
    start: int = Field(default=-1, le=-1)
    derivatives: tuple[Derivative, ...] = ()
    combine: Combine = "taylor"
    corrector: Corrector | None = None


class SolverSchedule(_Strict):
    """A complete USF solver (see module docstring)."""

    format_version: int = FORMAT_VERSION
    noise_schedule: str = Field(min_length=1)
    t_start: float
    afs: Literal["none", "zero_x0", "mean_x0"] = "none"
    steps: tuple[Step, ...] = Field(min_length=1, max_length=MAX_STEPS)

    @field_validator("format_version")
    @classmethod
    def _version(cls, v):
        if v != FORMAT_VERSION:
            raise ValueError(f"format version {v} is not supported (this s3-ray reads version {FORMAT_VERSION})")
        return v

    @model_validator(mode="after")
    def _check(self):
        _validate_schedule(self)
        return self

    # ---- derived quantities -------------------------------------------------------------
    @property
    def times(self) -> list[float]:
        """t_0 = t_start, t_1, ..., t_M."""
        return [self.t_start, *(s.t for s in self.steps)]

    @property
    def t_end(self) -> float:
        return self.steps[-1].t

    def nfe(self) -> int:
        """Model evaluations: [AFS = none] + (M - 1) + [corrector on last step] + #implicit."""
        implicit = sum(1 for s in self.steps if s.corrector is not None and s.corrector.kind == "implicit")
        return int(self.afs == "none") + (len(self.steps) - 1) + int(self.steps[-1].corrector is not None) + implicit

    # ---- serialisation ------------------------------------------------------------------
    def to_json(self, indent: int | None = None) -> str:
        """Canonical JSON: sorted keys, every field present, exact float round-trip."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=indent, allow_nan=False)

    def schedule_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str | bytes) -> SolverSchedule:
        """Parse and validate JSON text with strict types (ScheduleError names the field)."""
        try:
            return cls.model_validate_json(text, strict=True)
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "json_invalid":
                raise ScheduleError(f"not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}") from None
            if first["type"] == "model_type" and not first["loc"]:
                raise ScheduleError("a schedule is a JSON object") from None
            raise ScheduleError(format_validation_error(e)) from None

    @classmethod
    def from_dict(cls, data) -> SolverSchedule:
        """Validate a JSON-like dict exactly as its JSON text would be (strict types)."""
        if not isinstance(data, dict):
            raise ScheduleError("a schedule is a JSON object")
        try:
            text = json.dumps(data)
        except (TypeError, ValueError, RecursionError) as e:
            raise ScheduleError(f"not JSON data ({e})") from None
        return cls.from_json(text)

    def save(self, path) -> None:
        with open(path, "w") as f:
            f.write(self.to_json(indent=1) + "\n")


def read_text(path, limit: int = MAX_FILE_BYTES, error=ScheduleError) -> str:
    """The UTF-8 text of a user's file, read up to ``limit`` bytes; ``error`` (naming the file) if
    it cannot be read, is larger, or is not UTF-8 (a UTF-8 byte-order mark is dropped)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > limit:
        raise error(f"{path}: larger than the {limit // 2**20} MB this command reads")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise error(f"{path}: UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                    "save it as UTF-8") from None


def read_json(path, error=ScheduleError):
    """A user's JSON file (bounded, UTF-8, nesting-safe) as Python data; ``error`` names the file."""
    text = read_text(path, error=error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None


def load_schedule(path) -> SolverSchedule:
    """Read and validate a schedule JSON file (ScheduleError names the file and the field)."""
    text = read_text(path)
    try:
        return SolverSchedule.from_json(text)
    except ScheduleError as e:
        raise ScheduleError(f"{path}: {e}") from None


def format_validation_error(e: ValidationError) -> str:
    """One line: ``field: reason`` per error (a wrong type also shows the value given), '; '-joined."""
    lines = []
    for err in e.errors():
        loc = _format_loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"].endswith("_type") and isinstance(err.get("input"), (str, int, float, type(None))):
            msg += f", got {err['input']!r}"[:80]
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def _format_loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after",) or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _fail(where: str, msg: str):
    # Raised inside a model validator: pydantic turns it into a ValidationError whose message we keep.
    raise ValueError(f"{where}: {msg}")


def _check_points(where: str, derivs, order: int, start: int, history: int, combine: str):
    if len(derivs) != order - 1:
        _fail(f"{where}.derivatives", f"order {order} needs {order - 1} derivative specs, got {len(derivs)}")
    for n, d in enumerate(derivs, start=1):
        w = f"{where}.derivatives[{n - 1}].points"
        if len(d.points) < n:
            _fail(w, f"derivative {n} needs at least {n} points, got {len(d.points)}")
        for p in d.points:
            if p < -history:
                _fail(w, f"index {p} is older than the {history} history entries available")
            if p == start:
                _fail(w, f"index {p} is the start point itself")
    if combine != "taylor" and derivs:
        first = derivs[0].points
        if len(first) != order - 1 or any(d.points != first for d in derivs):
            _fail(f"{where}.derivatives", f"combine={combine} uses one set of exactly {order - 1} points shared by all derivative specs")
        if any(not d.relaxation.is_identity for d in derivs):
            _fail(f"{where}.derivatives", f"relaxation is not used with combine={combine}")


def _check_v3(where: str, st):
    """DPM-Solver-v3 steps expand g with Taylor terms: no UniPC combination, linear relaxations only."""
    for w, combine, derivs in ((where, st.combine, st.derivatives),
                               *(((f"{where}.corrector", st.corrector.combine, st.corrector.derivatives),)
                                 if st.corrector is not None else ())):
        if combine != "taylor":
            _fail(f"{w}.combine", f"prediction 'dpmsolver_v3' uses combine 'taylor', got {combine!r}")
        for n, d in enumerate(derivs):
            if d.relaxation.kind != "linear":
                _fail(f"{w}.derivatives[{n}].relaxation.kind",
                      f"{d.relaxation.kind!r} is defined for noise/data prediction; dpmsolver_v3 takes 'linear'")


@lru_cache(maxsize=8)
def _noise_by_name(name: str):
    return get_noise_schedule(name)  # ValueError naming the known schedules


def _validate_schedule(s: SolverSchedule):
    if not (math.isfinite(s.t_start) and s.t_start > 0):
        _fail("t_start", f"must be a finite positive time, got {s.t_start}")
    try:
        T = _noise_by_name(s.noise_schedule).T
    except ValueError as e:
        _fail("noise_schedule", str(e))
    if s.t_start > T * (1 + T_TOLERANCE):
        _fail("t_start", f"{s.t_start!r} is above T = {T:g} of noise schedule {s.noise_schedule!r}")
    prev = s.t_start
    last = len(s.steps) - 1
    for i, st in enumerate(s.steps):
        w = f"steps[{i}]"
        if not math.isfinite(st.t):
            _fail(f"{w}.t", f"must be finite, got {st.t}")
        if st.t <= 0:
            _fail(f"{w}.t", f"must be positive, got {st.t}")
        if not st.t < prev:
            _fail(f"{w}.t", f"times must decrease strictly: {st.t!r} follows {prev!r}")
        prev = st.t
        history = i + 1
        if st.start < -history:
            _fail(f"{w}.start", f"start point {st.start} is older than the {history} history entries available")
        if st.order > history:
            _fail(f"{w}.order", f"order {st.order} needs {st.order} history entries, only {history} available")
        _check_points(w, st.derivatives, st.order, st.start, history, st.combine)
        c = st.corrector
        if st.prediction == "dpmsolver_v3":
            _check_v3(w, st)
        if c is not None:
            wc = f"{w}.corrector"
            if c.kind == "implicit" and i == last:
                _fail(f"{wc}.kind", "an implicit corrector on the last step re-evaluates a model output that is never used; use 'pseudo'")
            _check_points(wc, c.derivatives, c.order, st.start - 1, history + 1, c.combine)
            if not any(-1 in d.points for d in c.derivatives):
                _fail(f"{wc}.derivatives", "a corrector must use the new point -1 in at least one derivative set")
