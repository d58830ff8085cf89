"""Schedule format: validation messages, canonical JSON, hashing, NFE, release import."""

import copy
import json

import pytest

from s3_ray.usf.baselines import BASELINES, build_baseline
from s3_ray.usf.noise import VPLinear
from s3_ray.usf.release import NotSupportedYet, claimed_nfe, import_release, load_release
from s3_ray.usf.schedule import ScheduleError, SolverSchedule

NOISE = VPLinear()


def good() -> dict:
    return json.loads(build_baseline("unipc_bh2", NOISE, 5).to_json())


def mutate(path, value):
    d = good()
    obj = d
    for p in path[:-1]:
        obj = obj[p]
    if value is DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return d


DELETE = object()

# (mutation, expected fragment of the message: it must name the field)
MALFORMED = [
    (mutate(["format_version"], 2), "format_version: format version 2 is not supported"),
    (mutate(["t_start"], float("nan")), "t_start: must be a finite positive time"),
    (mutate(["t_start"], -1.0), "t_start: must be a finite positive time"),
    (mutate(["steps", 1, "t"], 0.99), "steps[1].t: times must decrease strictly"),
    (mutate(["steps", 2, "t"], float("nan")), "steps[2].t: must be finite"),
    (mutate(["steps", 4, "t"], -0.1), "steps[4].t: must be positive"),
    (mutate(["steps", 0, "t"], 1.5), "steps[0].t: times must decrease strictly"),
    (mutate(["steps", 0, "order"], 2), "steps[0].order: order 2 needs 2 history entries"),
    (mutate(["steps", 2, "order"], 7), "steps[2].order: Input should be less than or equal to 4"),
    (mutate(["steps", 2, "prediction"], "velocity"), "steps[2].prediction: Input should be"),
    (mutate(["afs"], "half_x0"), "afs"),
    (mutate(["steps", 2, "derivatives", 0, "points"], [-1]), "steps[2].derivatives[0].points: index -1 is the start point"),
    (mutate(["steps", 1, "derivatives", 0, "points"], [-3]), "steps[1].derivatives[0].points: index -3 is older than"),
    (mutate(["steps", 2, "derivatives", 0, "points"], [2]), "steps[2].derivatives[0].points: history indices are negative"),
    (mutate(["steps", 2, "derivatives", 0, "points"], [-2, -2]), "history indices must be distinct"),
    (mutate(["steps", 2, "derivatives", 0, "points"], []), "needs at least one history point"),
    (mutate(["steps", 2, "derivatives"], []), "steps[2].derivatives: order 2 needs 1 derivative specs"),
    (mutate(["steps", 2, "start"], -5), "steps[2].start: start point -5 is older"),
    (mutate(["steps", 2, "start"], 0), "steps[2].start: Input should be less than or equal to -1"),
    (mutate(["steps", 2, "corrector", "kind"], "magic"), "steps[2].corrector.kind: Input should be"),
    (mutate(["steps", 2, "corrector", "order"], 9), "steps[2].corrector.order: Input should be less than or equal to 5"),
    (mutate(["steps", 2, "corrector", "derivatives", 0, "points"], [-3]),
     "steps[2].corrector.derivatives: combine=bh2 uses one set"),
    (mutate(["steps", 2, "combine"], "bh3"), "steps[2].combine: Input should be"),
    (mutate(["steps", 2, "derivatives", 0, "relaxation"], {"kind": "linear", "slope": 0.5}),
     "relaxation is not used with combine=bh2"),
    (mutate(["steps", 2, "derivatives", 0, "relaxation"], {"kind": "dpmsolver2", "scale": 2.0}),
     "scale/slope apply only to kind 'linear'"),
    (mutate(["steps", 2, "derivatives", 0, "relaxation"], {"kind": "linear", "slope": float("inf")}),
     "scale and slope must be finite"),
    (mutate(["steps", 2, "surprise"], 1), "steps[2].surprise: Extra inputs are not permitted"),
    (mutate(["steps"], []), "steps"),
    (mutate(["noise_schedule"], DELETE), "noise_schedule: Field required"),
]


@pytest.mark.parametrize("data,fragment", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed_rejected_with_named_field(data, fragment):
    with pytest.raises(ScheduleError) as e:
        SolverSchedule.from_dict(data)
    assert fragment in str(e.value), str(e.value)


def test_more_malformed():
    # implicit corrector on the last step; corrector without the new point; bad JSON; not an object
    d = json.loads(build_baseline("dpm_solver_pp_2m", NOISE, 3).to_json())
    d["steps"][-1]["corrector"] = {"kind": "implicit", "order": 2, "derivatives": [{"points": [-1]}]}
    with pytest.raises(ScheduleError, match=r"steps\[2\]\.corrector\.kind: an implicit corrector on the last step"):
        SolverSchedule.from_dict(d)
    d["steps"][1]["corrector"] = {"kind": "pseudo", "order": 2, "derivatives": [{"points": [-3]}]}
    d["steps"][-1]["corrector"] = None
    with pytest.raises(ScheduleError, match=r"steps\[1\]\.corrector\.derivatives: a corrector must use the new point"):
        SolverSchedule.from_dict(d)
    with pytest.raises(ScheduleError, match="not valid JSON"):
        SolverSchedule.from_json("{nope")
    with pytest.raises(ScheduleError, match="a schedule is a JSON object"):
        SolverSchedule.from_json("[1, 2]")


def test_canonical_json_and_hash_stable():
    s = build_baseline("dpm_solver_pp_3m", NOISE, 7, afs="zero_x0")
    text = s.to_json()
    s2 = SolverSchedule.from_json(text)
    assert s2 == s and s2.to_json() == text and s2.schedule_hash() == s.schedule_hash()
    # key order and whitespace do not matter; float values round-trip exactly
    shuffled = json.dumps(json.loads(text), indent=3, sort_keys=False)
    assert SolverSchedule.from_json(shuffled).schedule_hash() == s.schedule_hash()
    assert [st.t for st in s2.steps] == [st.t for st in s.steps]
    other = build_baseline("dpm_solver_pp_3m", NOISE, 7, afs="none")
    assert other.schedule_hash() != s.schedule_hash()


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("nfe", [3, 5, 10])
@pytest.mark.parametrize("afs", ["none", "zero_x0"])
def test_baselines_hit_their_nfe(name, nfe, afs):
    s = build_baseline(name, NOISE, nfe, afs=afs)
    assert s.nfe() == nfe


def test_nfe_formula_counts_last_corrector_and_implicit():
    d = json.loads(build_baseline("dpm_solver_pp_2m", NOISE, 4).to_json())
    base = SolverSchedule.from_dict(d).nfe()
    d2 = copy.deepcopy(d)
    d2["steps"][-1]["corrector"] = {"kind": "pseudo", "order": 2, "derivatives": [{"points": [-1]}]}
    assert SolverSchedule.from_dict(d2).nfe() == base + 1
    d3 = copy.deepcopy(d)
    d3["steps"][1]["corrector"] = {"kind": "implicit", "order": 3, "derivatives": [{"points": [-1, -3]}, {"points": [-1, -3]}]}
    assert SolverSchedule.from_dict(d3).nfe() == base + 1


# The release schedules s3-ray runs (10 of them with DPM-Solver-v3 steps); the other 26 scale their
# networks' skip connections, which is not a solver decision.
IMPORTABLE = {"imagenet256/imagenet256_nfe4", "latent_diffusion/lsun_nfe6", "latent_diffusion/lsun_nfe9",
              "score_sde/cifar10_sde_nfe9", "edm/cifar10_edm_nfe3", "edm/cifar10_edm_nfe4", "edm/cifar10_edm_nfe5",
              "latent_diffusion/lsun_nfe10", "latent_diffusion/lsun_nfe5",
              "latent_diffusion/lsun_nfe7", "latent_diffusion/lsun_nfe8", "latent_diffusion/stable_diffusion_nfe7",
              "score_sde/cifar10_sde_nfe3", "score_sde/cifar10_sde_nfe8"}
SKIP_REASON = ("skip_coefficients: non-trivial skip coefficients (scales on the release's own networks' skip "
               "connections, not solver decisions) are not supported")


def test_release_schedules_import_exactly_the_supported_set_and_refusals_give_the_reason():
    release = load_release()
    assert len(release) == 40 and IMPORTABLE <= set(release)
    imported, with_v3 = set(), set()
    for key, entry in release.items():
        raw = entry["schedule"]
        skip = any(float(c) != 1.0 for c in raw.get("skip_coefficients") or [])
        v3 = [i for i, p in enumerate(raw["prediction_types"]) if p == "dpmsolver_v3_prediction"]
        try:
            s = import_release(key)
        except NotSupportedYet as e:
            assert skip and str(e) == SKIP_REASON, (key, str(e))
            continue
        assert not skip, key
        assert s.nfe() == claimed_nfe(key), key
        assert s.times == [float(t) for t in raw["timesteps"]], key
        assert [st.order for st in s.steps] == raw["orders"], key
        assert [i for i, st in enumerate(s.steps) if st.prediction == "dpmsolver_v3"] == v3, key
        imported.add(key)
        with_v3 |= {key} if v3 else set()
    assert imported == IMPORTABLE
    assert len(imported) == 14 and len(with_v3) == 10, (len(imported), len(with_v3))


def test_release_import_is_runnable(tmp_path):
    import torch

    from s3_ray.models.adapter import ModelAdapter
    from s3_ray.models.analytic import GaussianData
    from s3_ray.usf.sampler import sample

    s = import_release("score_sde/cifar10_sde_nfe9")
    data = GaussianData(NOISE, mean=torch.zeros(3, dtype=torch.float64), var=torch.ones(3, dtype=torch.float64))
    m = ModelAdapter(data.net, NOISE, output="x0")
    out = sample(s, m, NOISE, torch.randn(5, 3, dtype=torch.float64), data_mean=torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(out).all() and m.calls == 9
    path = tmp_path / "s.json"
    s.save(path)
    assert SolverSchedule.from_json(path.read_text()) == s


def _release_derivative(points, c=None):
    d = {"estimate": f"Difference_{len(points)}", "active_points": points, "relaxation": None}
    return d if c is None else {**d, "relaxation": "linear", "relaxation_coefficient": c}


# The release's linear relaxation R = 1 + c h (h > 0, the step in lambda), for both prediction types.
RELAXED_RELEASE = {"schedule": {
    "timesteps": [1.0, 0.6, 0.3, 0.1, 0.02],
    "orders": [1, 2, 2, 2],
    "prediction_types": ["noise_prediction", "data_prediction", "noise_prediction", "data_prediction"],
    "start_points": [-1, -1, -1, -1],
    "derivative_types": [[], [_release_derivative([-2], 0.25)], [_release_derivative([-2], -0.2)],
                         [_release_derivative([-2], 0.5)]],
    "corrector_types": [
        {"type": "pseudo", "start_point": -2, "taylor_order": 2, "derivative_type": [_release_derivative([-1], 0.3)]},
        {"type": "pseudo", "start_point": -2, "taylor_order": 3,
         "derivative_type": [_release_derivative([-3, -1], -0.4), _release_derivative([-3, -1])]},
        {"type": "no_corrector", "start_point": None, "taylor_order": None, "derivative_type": None},
        {"type": "no_corrector", "start_point": None, "taylor_order": None, "derivative_type": None}],
    "afs": "no_afs"}}


def _fixed_factors(d: dict) -> dict:
    """The same schedule with every release coefficient c replaced by the constant factor 1 + c h,
    h = lambda(t_{i+1}) - lambda(t_i) from the timesteps (no h~ convention involved)."""
    ts = d["timesteps"]
    lam = [float(NOISE.lambda_(t)) for t in ts]
    out = {"noise_schedule": "vp_linear", "t_start": ts[0], "steps": []}

    def spec(r, h):
        rel = {} if r["relaxation"] is None else {"relaxation": {"scale": 1 + r["relaxation_coefficient"] * h}}
        return {"points": r["active_points"], **rel}

    for i in range(len(ts) - 1):
        h = lam[i + 1] - lam[i]
        c = d["corrector_types"][i]
        step = {"t": ts[i + 1], "prediction": d["prediction_types"][i].removesuffix("_prediction"),
                "order": d["orders"][i], "derivatives": [spec(r, h) for r in d["derivative_types"][i]]}
        if c["type"] != "no_corrector":
            step["corrector"] = {"kind": c["type"], "order": c["taylor_order"],
                                 "derivatives": [spec(r, h) for r in c["derivative_type"]]}
        out["steps"].append(step)
    return out


def test_release_linear_relaxation_is_one_plus_c_h_for_both_predictions():
    from s3_ray.usf.release import import_release_schedule
    from s3_ray.usf.sampler import SamplerPlan

    imported = import_release_schedule(RELAXED_RELEASE, "vp_linear")
    slopes = [(st.prediction, st.derivatives[0].relaxation.slope) for st in imported.steps[1:]]
    assert slopes == [("data", -0.25), ("noise", -0.2), ("data", -0.5)]  # data steps: slope = -c
    expected = SolverSchedule.from_dict(_fixed_factors(RELAXED_RELEASE["schedule"]))
    assert any(not d.relaxation.is_identity for st in expected.steps for d in st.derivatives)
    ours, ref = SamplerPlan(imported, NOISE), SamplerPlan(expected, NOISE)
    for i, (a, b) in enumerate(zip(ours.steps, ref.steps)):
        for kind in ("predictor", "corrector"):
            ua, ub = getattr(a, kind), getattr(b, kind)
            assert (ua is None) == (ub is None), (i, kind)
            if ua is not None:
                assert ua.start == ub.start and ua.a == pytest.approx(ub.a, rel=1e-13)
                assert dict(ua.terms) == pytest.approx(dict(ub.terms), rel=1e-12), (i, kind)
