"""report.html from a run directory made by hand (no Ray): the sample panels of one NFE start from the
same initial noise, the page is self-contained with one summary row per NFE, `s3 report` writes it."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from s3_ray.cli import main
from s3_ray.config import load_config
from s3_ray.metrics.evaluate import get_target
from s3_ray.metrics.fid import uint8_images
from s3_ray.tracking.report import write_report
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import VPLinear
from s3_ray.usf.sampler import SamplerPlan
from s3_ray.usf.schedule import load_schedule

ROOT = Path(__file__).resolve().parents[1]
NFES = (3, 4)
BASELINES = ("dpm_solver_pp_2m/logsnr_uniform", "unipc_bh2/logsnr_uniform")


def fake_run(run_dir: Path) -> dict:
    """A finished search's files: config.json, summary.json, best/, and Tune's result.json per trial
    (the 'searched' schedule of each NFE is a DDIM here; the scores are made up)."""
    cfg = load_config(ROOT / "search_spaces" / "smoke.yaml").model_copy(update={"nfe": NFES, "name": "fake"})
    (run_dir / "best").mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json())
    noise, rows, every = VPLinear(), [], []
    for i, nfe in enumerate(NFES):
        s = build_baseline("ddim", noise, nfe, discretization="time_quadratic")
        h = s.schedule_hash()
        s.save(run_dir / "best" / f"nfe{nfe}.json")
        config = {"trial_key": f"{i:05d}-{h[:10]}", "schedule": s.to_json(), "schedule_hash": h, "nfe": nfe,
                  "source": "predictor", "stage": 0}
        trial = run_dir / "tune" / f"trainable_{i}"
        trial.mkdir(parents=True)
        (trial / "result.json").write_text(json.dumps({"score": 2.0 - i, "fid": 2.0 - i, "config": config}) + "\n")
        rows.append({"nfe": nfe, "searched": 1.5 - i, "searched_hash": h[:10], "best_baseline": BASELINES[1],
                     "best_baseline_score": 1.8 - i, "exported": h[:10], "ratio": (1.5 - i) / (1.8 - i)})
        every += [{"nfe": nfe, "kind": "searched", "label": h[:10], "score": 1.5 - i}]
        every += [{"nfe": nfe, "kind": "baseline", "label": b, "score": 1.8 - i + k} for k, b in enumerate(BASELINES)]
    summary = {"name": "fake", "metric": "fid", "reference": "data", "final_samples": 200, "final_seeds": [10_000],
               "converged": 0.3, "rows": rows, "predictor_tau": [], "trials": len(NFES), "all": every}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "fake"
    fake_run(run_dir)
    write_report(run_dir)
    return run_dir


def test_panels_of_one_nfe_start_from_the_same_noise(report):
    data = json.loads((report / "report.json").read_text())
    cfg = load_config(ROOT / "search_spaces" / "smoke.yaml")
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    assert [p["nfe"] for p in data["panels"]] == list(NFES)
    for entry in data["panels"]:
        assert [p["kind"] for p in entry["panels"]] == ["S3", "best baseline", "converged"]
        saved = np.load(report / entry["npz"])
        x_T = torch.from_numpy(saved["x_T"])
        assert torch.equal(x_T, target.noise_batch(entry["n"], entry["seed"]))  # the recorded seed's noise
        for i, panel in enumerate(entry["panels"]):
            # solving this panel's schedule from the saved x_T gives exactly its images
            plan = SamplerPlan(load_schedule(report / panel["schedule"]), target.noise)
            x = plan.run(target.model, x_T, data_mean=target.data_mean.to(target.dtype))
            assert np.array_equal(uint8_images(x).numpy(), saved[f"panel{i}"]), (entry["nfe"], panel["kind"])
        # and the three solvers differ (else the check above proves nothing)
        assert not np.array_equal(saved["panel0"], saved["panel2"])
    searched = load_schedule(report / data["panels"][0]["panels"][0]["schedule"])
    assert searched.schedule_hash() == load_schedule(report / "best" / "nfe3.json").schedule_hash()


def test_report_is_one_self_contained_page(report):
    html = (report / "report.html").read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)
    assert html.count('src="data:image/png;base64,') == 3 + len(NFES)  # FID vs NFE, schedules, curve; a grid per NFE
    body = html.split('<table id="summary">')[1].split("</table>")[0]
    assert body.count("<tr><td>") == len(NFES)
    assert all(b.replace("/", "/<br>") in body for b in BASELINES)  # a column for every baseline


def test_s3_report_writes_a_missing_report(report, capsys):
    (report / "report.html").unlink()
    assert main(["report", str(report)]) == 0
    assert capsys.readouterr().out.strip() == str((report / "report.html").resolve())
    assert (report / "report.html").is_file()
    assert main(["report", str(report / "best")]) == 2  # not a run directory
    assert "not the directory of a finished search" in capsys.readouterr().err
