"""Peers of S3 (issue 15): iPNDM as a schedule, Align Your Steps grids, GITS grids and their cache.

References are computed here independently of the code under test: a literal iPNDM loop, the exact
Gaussian ODE solution, brute force over every grid, the published AYS timesteps."""

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch

from s3_ray.cli import main
from s3_ray.models.adapter import ModelAdapter
from s3_ray.models.analytic import GaussianData, GaussianMixture
from s3_ray.usf import gits
from s3_ray.usf.ays import loglinear_interp, published_sigmas
from s3_ray.usf.baselines import DISCRETIZATIONS, build_baseline, discretize
from s3_ray.usf.noise import EDM, VPDiscrete, VPLinear, get_noise_schedule
from s3_ray.usf.sampler import SamplerPlan, sample
from s3_ray.usf.schedule import SolverSchedule

F64 = torch.float64
torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# iPNDM

AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def literal_ipndm(eps, noise, times, x_T, max_order=4, afs="none"):
    """The published update, written out: on x~ = x / alpha with s~ = sigma / alpha,
    x~ += (s~_next - s~_cur) * AB_k(eps history), k = min(max_order, i + 1)."""
    a = [float(noise.alpha(t)) for t in times]
    s = [float(noise.sigma(t)) / ai for t, ai in zip(times, a)]
    x, buf = x_T / a[0], []
    for i in range(len(times) - 1):
        d = x / s[0] if (afs == "zero_x0" and i == 0) else eps(x * a[i], float(times[i]))
        k = min(max_order, i + 1)
        hist = [d] + buf[::-1]  # newest first
        x = x + (s[i + 1] - s[i]) * sum(w * h for w, h in zip(AB[k], hist))
        buf = (buf + [d])[-(max_order - 1):] if max_order > 1 else []
    return x * a[-1]


def gmm(noise):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 4, generator=g, dtype=F64)
    return GaussianMixture(noise, [0.3, 0.3, 0.4], means, [0.2, 0.3, 0.5])


@pytest.mark.parametrize("noise", [VPLinear(), EDM()], ids=lambda n: n.name)
def test_ipndm_schedule_equals_the_published_update(noise):
    data = gmm(noise)
    model = ModelAdapter(data.net, noise, output="x0")
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * float(noise.sigma(noise.T))
    worst = 0.0
    for nfe, order, disc, afs in [(3, 4, "logsnr_uniform", "none"), (5, 4, "edm", "none"), (10, 4, "time_quadratic", "none"),
                                  (6, 3, "logsnr_uniform", "none"), (6, 2, "edm", "none"), (4, 1, "edm", "none"),
                                  (5, 4, "edm", "zero_x0")]:
        s = build_baseline("ipndm", noise, nfe, order=order, discretization=disc, afs=afs)
        s = SolverSchedule.from_json(s.to_json())  # exactly a schedule: survives its JSON
        assert s.nfe() == nfe
        ours = sample(s, model, noise, x_T)
        ref = literal_ipndm(data.eps, noise, s.times, x_T, order, afs)
        worst = max(worst, float((ours - ref).abs().max()))
    print(f"{noise.name}: max |schedule - literal iPNDM| = {worst:.1e}")
    assert worst < 1e-12


def test_ipndm_refuses_data_prediction():
    with pytest.raises(ValueError, match="prediction"):
        build_baseline("ipndm", VPLinear(), 5, prediction="data")


def test_ipndm_local_order_on_sigma_uniform_steps():
    """One order-k step from the exact trajectory, on equal steps in s~ (EDM sigma): error O(h^(k+1))."""
    noise = EDM()
    data = GaussianData(noise, mean=torch.tensor([0.5, -1.0, 2.0, 0.0]), var=torch.tensor([0.05, 0.5, 1.0, 2.0]))
    model = ModelAdapter(data.net, noise, output="x0")
    x0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=F64) * 2.0
    hs = [0.2, 0.1, 0.05, 0.025]
    slopes = {}
    for k in (1, 2, 3, 4):
        errs = []
        for h in hs:
            grid = np.array([2.0 - j * h for j in range(k + 1)])
            s = build_baseline("ipndm", noise, k, order=k, grid=grid)
            plan = SamplerPlan(s, noise)
            xs = [data.solve(x0, 2.0, float(t)) for t in grid]
            eps = [model(x, float(t)) for x, t in zip(xs, grid)]
            u = plan.steps[-1].predictor
            assert not u.use_x0
            x_hat = u.a * xs[u.start] + sum(b * eps[j] for j, b in u.terms)
            errs.append(float((x_hat - xs[-1]).abs().max()))
        slopes[k] = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    print("local slopes", {k: round(v, 2) for k, v in slopes.items()})
    for k, v in slopes.items():
        assert abs(v - (k + 1)) < 0.3, (k, v)


@pytest.mark.parametrize("noise", [VPLinear(), EDM()], ids=lambda n: n.name)
def test_ipndm_global_order_is_two(noise):
    """Fixed equal-step weights on steps that are not equal in s~, and the Euler/AB2/AB3 warm-up,
    make iPNDM second order globally (GMM, float64, logSNR grid, T -> lambda = 1)."""
    data = gmm(noise)
    model = ModelAdapter(data.net, noise, output="x0")
    t_end = float(noise.inverse_lambda(1.0))
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * float(noise.sigma(noise.T))
    steps, errs = [32, 64, 128, 256], []
    for n in steps:
        s = build_baseline("ipndm", noise, n, t_end=t_end)
        errs.append(float((sample(s, model, noise, x_T) - data.solve(x_T, s.t_start, s.t_end)).abs().max()))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    print(f"{noise.name} ipndm global slope {slope:.2f}, errors {[f'{e:.1e}' for e in errs]}")
    assert abs(slope - 2) < 0.25


# ---------------------------------------------------------------------------------------------
# Align Your Steps

SD = VPDiscrete.from_diffusers_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                       "num_train_timesteps": 1000})
PUBLISHED_TIMESTEPS = {"ays_sd15": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24],
                       "ays_sdxl": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13]}


@pytest.mark.parametrize("name", ["ays_sd15", "ays_sdxl"])
def test_ays_reproduces_the_published_10_steps(name):
    pub = published_sigmas(name)
    assert list(loglinear_interp(pub, 11)) == pub  # the published values themselves
    t = discretize(SD, 10, name)
    sig = np.exp(-SD.lambda_(t))
    assert np.max(np.abs(sig[1:-1] / np.array(pub[1:-1]) - 1)) < 1e-9
    assert abs(sig[0] - pub[0]) < 5e-4 and abs(sig[-1] - pub[-1]) < 5e-4  # SD's sigma_max/min, 3 decimals
    # the other published artefact: the 10-step integer training steps (label = N t - 1)
    labels = SD.time_label(t[:-1])
    assert np.max(np.abs(labels - np.array(PUBLISHED_TIMESTEPS[name]))) < 1.0, labels  # sigmas have 3 decimals


@pytest.mark.parametrize("name", ["ays_sd15", "ays_sdxl"])
def test_ays_interpolation_is_loglinear_and_monotone(name):
    pub = np.log(published_sigmas(name))
    for n in range(4, 31):
        t = discretize(SD, n, name)
        assert len(t) == n + 1 and t[0] == SD.T and t[-1] == SD.t_end_default
        assert np.all(np.diff(t) < 0)
        sig = np.exp(-SD.lambda_(t[1:-1]))
        assert np.all(np.diff(sig) < 0)
        ref = []  # log sigma, linear between the published points at uniform positions
        for k in range(1, n):
            u = 10 * k / n
            i = min(int(u), 9)
            ref.append(math.exp(pub[i] + (u - i) * (pub[i + 1] - pub[i])))
        assert np.max(np.abs(sig / np.array(ref) - 1)) < 1e-9, n
    s = build_baseline("dpm_solver_pp_2m", SD, 8, discretization=name)
    assert s.nfe() == 8 and s.t_start == SD.T


def test_ays_refused_for_other_noise_schedules(capsys):
    for noise in (VPLinear(), EDM(), get_noise_schedule("vp_discrete"),
                  VPDiscrete.from_diffusers_config({"beta_schedule": "scaled_linear", "beta_start": 0.0001,
                                                    "beta_end": 0.012})):
        with pytest.raises(ValueError, match=rf"discretization 'ays_sd15'.*noise schedule '{noise.name}'"):
            build_baseline("ddim", noise, 10, discretization="ays_sd15")
    with pytest.raises(ValueError, match="t_end"):
        build_baseline("ddim", SD, 10, discretization="ays_sdxl", t_end=0.002)
    assert main(["baseline", "ddim", "--nfe", "5", "--discretization", "ays_sdxl", "--noise-schedule", "vp_discrete"]) == 2
    err = capsys.readouterr().err
    assert "ays_sdxl" in err and "vp_discrete" in err


# ---------------------------------------------------------------------------------------------
# GITS


def gaussian(noise):
    data = GaussianData(noise, mean=torch.tensor([0.5, -1.0, 2.0, 0.0]), var=torch.tensor([0.05, 0.5, 1.0, 2.0]))
    model = ModelAdapter(data.net, noise, output="x0")
    x_T = torch.randn(200, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * float(noise.sigma(noise.T))
    return data, model, x_T


def spread(x):
    """RMS distance of the samples [B, d] from their mean."""
    return float(((x - x.mean(0)) ** 2).mean().sqrt())


def objective(name, noise, nfe, teacher, path, coeff=1.0):
    """The GITS objective of the grid teacher.times[path], evaluated directly: each step of the
    solver built on that grid, from the exact states and model outputs at its grid points; the error
    in x / alpha, times the spread of the teacher at the end over its spread at the step's end."""
    s = build_baseline(name, noise, nfe, grid=teacher.times[path])
    plan = SamplerPlan(s, noise)
    X = [teacher.x[q] for q in path]
    E = [teacher.eps[q] for q in path]
    X0 = [(x - plan.sigmas[e] * E[e]) / plan.alphas[e] for e, x in enumerate(X)]
    total = 0.0
    for m, ps in enumerate(plan.steps):
        u = ps.predictor
        F = X0 if u.use_x0 else E
        x = u.a * X[u.start] + sum(b * F[j] for j, b in u.terms)
        a = plan.alphas[m + 1]
        gain = spread(teacher.x[-1] / plan.alphas[-1]) / spread(X[m + 1] / a)
        total += coeff**m * gain * float(((x - X[m + 1]) / a).norm(dim=1).mean())
    return total


def test_dp_path_equals_brute_force_on_random_costs():
    rng = np.random.default_rng(0)
    N = 9
    for K in (2, 3, 4):
        for trial in range(3):
            costs = [rng.uniform(0.1, 1.0, size=(1, N, N))] + [rng.uniform(0.1, 1.0, size=(N, N, N)) for _ in range(K - 1)]
            coeff = 1.15 if trial else 1.0
            path, best = gits.dp_path(costs, N, coeff)
            brute = min((sum(coeff**m * costs[m][0 if m == 0 else p[m - 1], p[m], p[m + 1]] for m in range(K)), p)
                        for mid in itertools.combinations(range(1, N - 1), K - 1) for p in [(0, *mid, N - 1)])
            assert abs(best - brute[0]) < 1e-12 and tuple(path) == brute[1]


@pytest.mark.parametrize("name", ["ddim", "dpm_solver_pp_2m"])
def test_gits_dp_equals_brute_force_on_the_gaussian(name):
    noise = VPLinear()
    data, model, x_T = gaussian(noise)
    teacher = gits.analytic_teacher(data.solve, model, x_T, gits.candidate_times(noise, 12))
    for nfe in (3, 4):
        r = gits.gits_grid(model, noise, name, nfe, teacher=teacher)
        brute = min((objective(name, noise, nfe, teacher, p), p)
                    for mid in itertools.combinations(range(1, 11), nfe - 1) for p in [[0, *mid, 11]])
        print(f"{name} NFE {nfe}: DP {r.cost:.6f} {r.path}, brute force {brute[0]:.6f} {brute[1]}")
        assert abs(r.cost - brute[0]) <= 1e-12 * brute[0] and r.path == brute[1]
        assert abs(sum(r.step_costs) - r.cost) <= 1e-12 * r.cost


@pytest.mark.parametrize("name", ["ddim", "dpm_solver_pp_2m"])
def test_gits_objective_no_worse_than_fixed_discretizations(name):
    """Candidates = a coarse EDM grid plus every fixed discretisation's times: the DP's grid has an
    objective no larger than that of each fixed grid (evaluated directly)."""
    noise = VPLinear()
    data, model, x_T = gaussian(noise)
    for nfe in (4, 5, 6):
        fixed = {d: discretize(noise, nfe, d) for d in DISCRETIZATIONS}
        cand = np.unique(np.concatenate([gits.candidate_times(noise, 9), *fixed.values()]))[::-1].copy()
        teacher = gits.analytic_teacher(data.solve, model, x_T, cand)
        r = gits.gits_grid(model, noise, name, nfe, teacher=teacher)
        for d, g in fixed.items():
            path = [int(np.flatnonzero(cand == t)[0]) for t in g]
            fo = objective(name, noise, nfe, teacher, path)
            print(f"{name} NFE {nfe}: gits {r.cost:.4f}  {d} {fo:.4f}")
            assert r.cost <= fo * (1 + 1e-12), (d, r.cost, fo)


@pytest.mark.parametrize("noise", [VPLinear(), EDM()], ids=lambda n: n.name)
def test_gits_ddim_final_error_beats_fixed_discretizations(noise):
    """The sample error at t_end (vs the exact solution) of DDIM on its GITS grid is below DDIM's on
    every fixed discretisation at NFE 4-6 (31 EDM candidates)."""
    data, model, x_T = gaussian(noise)
    teacher = gits.analytic_teacher(data.solve, model, x_T, gits.candidate_times(noise, 31))

    def err(s):
        return float((sample(s, model, noise, x_T) - data.solve(x_T, s.t_start, s.t_end)).norm(dim=1).mean())

    for nfe in (4, 5, 6):
        g = err(build_baseline("ddim", noise, nfe, grid=gits.gits_grid(model, noise, "ddim", nfe, teacher=teacher).times))
        fixed = {d: err(build_baseline("ddim", noise, nfe, discretization=d)) for d in DISCRETIZATIONS}
        print(f"{noise.name} DDIM NFE {nfe}: gits {g:.4f}", {d: round(v, 4) for d, v in fixed.items()})
        assert g <= min(fixed.values())


def test_gits_teacher_trajectory_follows_the_exact_solution():
    noise = VPLinear()
    data, model, x_T = gaussian(noise)
    times = gits.candidate_times(noise, 16)
    exact = torch.stack([x_T[:32]] + [data.solve(x_T[:32], float(times[0]), float(t)) for t in times[1:]])
    scale = torch.as_tensor(noise.alpha(times))[:, None, None]
    errs = {}
    for refine in (2, 8):
        tea = gits.teacher_trajectory(model, noise, x_T[:32], times, refine=refine)
        errs[refine] = float(((tea.x - exact) / scale).abs().max() / (exact / scale).abs().max())
    print("teacher relative errors", errs)
    assert errs[8] < 1e-6 and errs[8] < errs[2] / 20  # third order: 4x the steps, 64x smaller
    assert torch.allclose(tea.eps[5], model(tea.x[5], float(times[5])))


@pytest.mark.parametrize("name, opts", [("unipc_bh2", {}), ("dpm_solver_pp_2s", {}), ("ipndm", {}),
                                        ("ddim", {"afs": "zero_x0"}), ("dpm_solver_pp_3m", {}),
                                        ("dpm_solver_pp_2m", {"cost": "euler"})])
def test_gits_grid_for_other_builders(name, opts):
    noise = EDM()
    data, model, x_T = gaussian(noise)
    teacher = gits.analytic_teacher(data.solve, model, x_T[:50], gits.candidate_times(noise, 10))
    r = gits.gits_grid(model, noise, name, 4, teacher=teacher, **opts)
    build_opts = {k: v for k, v in opts.items() if k != "cost"}
    s = build_baseline(name, noise, 4, grid=r.times, **build_opts)
    assert s.nfe() == 4 and r.times[0] == noise.T and r.times[-1] == noise.t_end_default
    assert np.isfinite(r.cost) and r.cost > 0
    if name in ("ipndm", "dpm_solver_pp_3m"):  # read two nodes back: costed by the order-2 member
        assert r.cost_options["order"] == 2


# ---- the cache -------------------------------------------------------------------------------

def test_gits_cache(tmp_path, monkeypatch):
    noise = VPLinear()
    data, model, _ = gaussian(noise)
    calls = []
    real = gits.gits_grid

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(gits, "gits_grid", counting)
    kw = dict(cache_dir=tmp_path, shape=(4,), n_samples=32, n_candidates=8)
    t1 = gits.cached_gits_grid(model, noise, "ddim", 3, model_hash="A", **kw)
    assert len(calls) == 1 and len(t1) == 4
    files = list(tmp_path.glob("gits-*.json"))
    assert len(files) == 1
    assert np.array_equal(gits.cached_gits_grid(model, noise, "ddim", 3, model_hash="A", **kw), t1)
    assert len(calls) == 1  # from the file
    gits.cached_gits_grid(model, noise, "ddim", 3, model_hash="B", **kw)  # another model: recomputed
    assert len(calls) == 2 and len(list(tmp_path.glob("gits-*.json"))) == 2
    f = files[0]
    good = json.loads(f.read_text())
    for bad in (b"{not json", b"\xff\xfe\x00", json.dumps({**good, "format": "other"}).encode(),
                json.dumps({**good, "key": {**good["key"], "model": "B"}}).encode(),
                json.dumps({**good, "times": good["times"][::-1]}).encode(),
                json.dumps({**good, "times": good["times"][:-1]}).encode()):
        f.write_bytes(bad)
        n = len(calls)
        with pytest.warns(UserWarning, match="GITS cache not used"):
            t = gits.cached_gits_grid(model, noise, "ddim", 3, model_hash="A", **kw)
        assert len(calls) == n + 1 and np.array_equal(t, t1)
        assert json.loads(f.read_text())["times"] == good["times"]  # rewritten
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gits.cached_gits_grid(model, noise, "ddim", 3, model_hash="A", **kw)  # valid again: no warning


def test_cli_baseline_gits_on_a_space(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path / "cache"))
    space = tmp_path / "gmm.yaml"
    space.write_text("name: g\nmodel: {kind: gmm}\nmetric: {kind: rmse, samples: [64]}\nnfe: [4]\nbudget: 10\n")
    out = tmp_path / "s.json"
    argv = ["baseline", "ddim", "--nfe", "4", "--discretization", "gits", "--space", str(space), "--out", str(out)]
    assert main(argv) == 0
    s = SolverSchedule.from_json(out.read_text())
    assert s.nfe() == 4 and s.noise_schedule == "vp_linear"
    assert len(list((tmp_path / "cache" / "gits").glob("gits-ddim-nfe4-*.json"))) == 1
    default = build_baseline("ddim", VPLinear(), 4)
    assert s.times != default.times
    assert main(argv) == 0 and SolverSchedule.from_json(out.read_text()) == s  # from the cache


# ---------------------------------------------------------------------------------------------
# Peers in a search space: validated with the space, seeded by the searcher

GMM_SPACE = {"name": "g", "model": {"kind": "gmm"}, "metric": {"kind": "rmse", "samples": [64]}, "nfe": [3, 4],
             "budget": 40, "random_init": 2, "baselines": ["ddim", "dpm_solver_pp_2m"],
             "discretizations": ["logsnr_uniform", "gits"]}


def test_peer_discretizations_in_a_search_space_are_checked():
    from s3_ray.config import ConfigError, parse_config

    assert parse_config(GMM_SPACE).discretizations == ("logsnr_uniform", "gits")
    with pytest.raises(ConfigError, match=r"discretizations: .*ays_sd15.*vp_discrete"):
        parse_config({**GMM_SPACE, "discretizations": ["ays_sd15"]})  # the gmm model is vp_linear
    with pytest.raises(ConfigError, match=r"discretizations: unknown value\(s\) \['gitz'\]"):
        parse_config({**GMM_SPACE, "discretizations": ["gitz"]})
    pipe = {**GMM_SPACE, "model": {"kind": "diffusers_pipeline", "pipeline": "/nonexistent"},
            "metric": {"kind": "rmse", "samples": [8]}}
    with pytest.raises(ConfigError, match=r"discretizations: 'gits' needs the model as eps\(x, t\)"):
        parse_config(pipe)


def test_searcher_seeds_the_gits_grids_computed_on_the_model(tmp_path, monkeypatch):
    from s3_ray.config import parse_config
    from s3_ray.search.searcher import S3Searcher
    from s3_ray.search.seed_baselines import _gits_task, baseline_schedules

    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path / "cache"))
    cfg = parse_config(GMM_SPACE)
    grids = _gits_task(cfg.model.model_dump_json(), cfg.metric.model_dump_json(), list(cfg.baselines), list(cfg.nfe))
    assert sorted(grids) == ["ddim/3", "ddim/4", "dpm_solver_pp_2m/3", "dpm_solver_pp_2m/4"]
    assert len(list((tmp_path / "cache" / "gits").glob("gits-*.json"))) == 4
    noise = VPLinear()
    for key, times in grids.items():  # a GITS grid is not one of the fixed discretisations
        name, nfe = key.split("/")
        assert all(not np.allclose(times, build_baseline(name, noise, int(nfe), discretization=d).times)
                   for d in DISCRETIZATIONS)
    searcher = S3Searcher(cfg, gits_grids=grids)
    seeded = [SolverSchedule.from_json(p["schedule"]) for p in searcher.queue if p["source"] == "baseline"]
    for key, times in grids.items():
        name, nfe = key.split("/")
        assert build_baseline(name, noise, int(nfe), grid=times) in seeded
    assert len(seeded) == len(baseline_schedules(cfg, noise, grids)) == 8
    with pytest.raises(ValueError, match="discretizations: no GITS grid for ddim at NFE 3"):
        S3Searcher(cfg)
