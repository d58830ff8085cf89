"""The `s3` command as a user runs it (subprocess: exit codes, no tracebacks)."""

import json
import subprocess
import sys

import pytest

from s3_ray.usf.schedule import load_schedule


def s3(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "s3_ray.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_baseline_validate_show(tmp_path):
    out = tmp_path / "u.json"
    r = s3("baseline", "unipc_bh2", "--nfe", "6", "--discretization", "time_quadratic", "--out", str(out))
    assert r.returncode == 0, r.stderr
    s = load_schedule(out)
    assert s.nfe() == 6 and s.steps[1].combine == "bh2"
    r = s3("schedule", "validate", str(out))
    assert r.returncode == 0 and "NFE 6" in r.stdout
    r = s3("schedule", "show", str(out))
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:6] == ["step", "t", "lambda", "h", "ord", "pred"]
    assert len([ln for ln in lines if ln.strip()[:1].isdigit()]) == 6 and "NFE 6" in lines[-1]


def test_baseline_options(tmp_path):
    out = tmp_path / "e.json"
    r = s3("baseline", "dpm_solver_pp_3m", "--nfe", "5", "--noise-schedule", "edm", "--discretization", "edm",
           "--afs", "zero_x0", "--lower-order-final", "--out", str(out))
    assert r.returncode == 0, r.stderr
    s = load_schedule(out)
    assert s.noise_schedule == "edm" and s.t_start == 80.0 and s.afs == "zero_x0" and s.nfe() == 5
    assert [st.order for st in s.steps] == [1, 2, 3, 3, 2, 1]  # AFS buys a sixth step; lower orders at the end


def test_validate_rejects_with_message_and_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format_version": 1, "noise_schedule": "vp_linear", "t_start": 1.0,
                               "steps": [{"t": 0.5, "prediction": "data", "order": 1}, {"t": 0.7, "prediction": "data", "order": 1}]}))
    r = s3("schedule", "validate", str(bad))
    assert r.returncode == 2
    assert "steps[1].t: times must decrease strictly" in r.stderr and "Traceback" not in r.stderr
    r = s3("schedule", "validate", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("key,nfe", [("score_sde/cifar10_sde_nfe9", 9), ("edm/cifar10_edm_nfe5", 5),
                                     ("edm/cifar10_edm_nfe6", None)])
def test_import_usf(tmp_path, key, nfe):
    out = tmp_path / "r.json"
    r = s3("schedule", "import-usf", key, "--out", str(out))
    if nfe:  # edm nfe5 has DPM-Solver-v3 steps
        assert r.returncode == 0 and f"NFE {nfe} (the release claims {nfe})" in r.stdout
        assert load_schedule(out).nfe() == nfe
    else:  # skip coefficients
        assert r.returncode == 2 and "skip_coefficients: non-trivial" in r.stderr and "Traceback" not in r.stderr


def test_import_usf_from_file(tmp_path):
    from s3_ray.usf.release import load_release

    f = tmp_path / "one.json"
    f.write_text(json.dumps(load_release()["latent_diffusion/lsun_nfe6"]))
    r = s3("schedule", "import-usf", str(f), "--out", str(tmp_path / "o.json"))
    assert r.returncode == 2 and "noise_schedule: required" in r.stderr
    r = s3("schedule", "import-usf", str(f), "--noise-schedule", "vp_discrete", "--out", str(tmp_path / "o.json"))
    assert r.returncode == 0 and load_schedule(tmp_path / "o.json").nfe() == 6
