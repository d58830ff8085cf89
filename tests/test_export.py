"""``s3 export --diffusers``: a run's best schedules as an ``S3Scheduler`` folder or a pipeline folder.

The run directories here are written as a search writes them (``config.json`` = the SearchConfig,
``best/nfe<k>.json``) from baseline schedules, so each refusal can be checked without a search; the
search-then-export path is in tests/test_pipeline_target.py::test_search_on_a_pipeline.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s3_ray.cli import main
from s3_ray.config import SearchConfig
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import noise_from_diffusers_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
GUIDANCE = 3.0


def s3_process(*args) -> subprocess.CompletedProcess:
    """The `s3` command as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "s3_ray.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def s3(*args) -> subprocess.CompletedProcess:
    """`s3` in this process (its main(), exit status and output as the command's): the refusals, fast."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def pipeline_noise(pipe_dir: Path):
    return noise_from_diffusers_config(json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text()))


def write_run(run_dir: Path, model: dict, schedules) -> Path:
    """A run directory as the search leaves it: config.json and best/nfe<k>.json."""
    cfg = SearchConfig.model_validate({"name": run_dir.name, "model": model, "nfe": sorted(s.nfe() for s in schedules),
                                       "metric": {"kind": "rmse", "samples": [8]}})
    (run_dir / "best").mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
    for s in schedules:
        s.save(run_dir / "best" / f"nfe{s.nfe()}.json")
    return run_dir


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a red cat\nblue dog on grass\n")
    return p


@pytest.fixture
def sd_run(tiny_sd, prompts, tmp_path):
    noise = pipeline_noise(tiny_sd)
    best = [build_baseline("unipc_bh2", noise, 3, discretization="logsnr_uniform"),
            build_baseline("dpm_solver_pp_2m", noise, 4, discretization="time_quadratic", afs="zero_x0")]
    model = {"kind": "diffusers_pipeline", "pipeline": str(tiny_sd), "prompts": str(prompts),
             "guidance_scale": GUIDANCE}
    return write_run(tmp_path / "runs" / "sd", model, best), best


def test_scheduler_folder_round_trip(sd_run, tiny_sd, tmp_path):
    from s3_ray import S3Scheduler

    run_dir, best = sd_run
    out = tmp_path / "export" / "scheduler"
    r = s3("export", "--run", str(run_dir), "--diffusers", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["scheduler_config.json"]
    sched = S3Scheduler.from_pretrained(str(out))
    assert sched.nfes == (3, 4)
    assert [sched.schedule_for(s.nfe()).to_json() for s in best] == [s.to_json() for s in best]
    assert sched.noise.spec() == pipeline_noise(tiny_sd).spec() and sched.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="num_inference_steps=5; held NFEs: 3, 4"):
        sched.set_timesteps(5)
    # Only the NFEs asked for; an NFE the run does not have is refused by name.
    out4 = tmp_path / "export" / "only4"
    assert s3("export", "--run", str(run_dir), "--diffusers", str(out4), "--nfe", "4").returncode == 0
    assert S3Scheduler.from_pretrained(str(out4)).nfes == (4,)
    r = s3("export", "--run", str(run_dir), "--diffusers", str(tmp_path / "export" / "n7"), "--nfe", "7")
    assert r.returncode == 2 and "--nfe" in r.stderr and "[7]" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "export" / "n7").exists()


def test_pipeline_folder_loads_with_diffusion_pipeline(sd_run, tiny_sd, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    import s3_ray  # noqa: F401  (DiffusionPipeline resolves ["s3_ray", "S3Scheduler"] by importing it)
    from s3_ray import S3Scheduler

    run_dir, best = sd_run
    out = tmp_path / "export" / "pipe"
    r = s3_process("export", "--run", str(run_dir), "--diffusers", str(out), "--pipeline", str(tiny_sd))
    assert r.returncode == 0, r.stderr
    assert "DiffusionPipeline.from_pretrained" in r.stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["s3_ray", "S3Scheduler"] and index["_class_name"] == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert (out / name).is_symlink() and (out / name).resolve() == (tiny_sd / name).resolve()
    copied = [p for p in out.rglob("*.safetensors") if not any(q.is_symlink() for q in (p, *p.parents))]
    assert copied == []  # no weights copied

    pipe = DiffusionPipeline.from_pretrained(str(out), use_safetensors=True, local_files_only=True)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, S3Scheduler)
    assert pipe.scheduler.nfes == (3, 4)
    ref = StableDiffusionPipeline.from_pretrained(str(tiny_sd), use_safetensors=True, local_files_only=True)
    ref.scheduler = S3Scheduler.from_config(ref.scheduler.config, schedules=best)
    images = []
    for p in (pipe, ref):
        p.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images.append(torch.as_tensor(p(["a red cat", "blue dog on grass"], height=8, width=8, num_inference_steps=4,
                                            guidance_scale=GUIDANCE, output_type="np",
                                            generator=torch.Generator().manual_seed(0)).images))
    assert images[0].shape == (2, 8, 8, 3) and bool(torch.isfinite(images[0]).all())
    assert torch.equal(images[0], images[1])


def test_refusals_name_the_field_and_write_nothing(sd_run, tiny_sd, tiny_ddpm, tmp_path):
    run_dir, _ = sd_run
    out = tmp_path / "out"

    def refused(*args, expect):
        r = s3("export", *args)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert expect in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.export-")]

    refused("--run", str(tmp_path / "nowhere"), "--diffusers", str(out), expect="not a finished search")
    # AFS zero_x0 in a DDPMPipeline (its loop never calls scale_model_input): refused, naming the NFE and field.
    noise = pipeline_noise(tiny_ddpm)
    afs_run = write_run(tmp_path / "runs" / "ddpm", {"kind": "diffusers_pipeline", "pipeline": str(tiny_ddpm)},
                        [build_baseline("dpm_solver_pp_2m", noise, 4, afs="zero_x0")])
    refused("--run", str(afs_run), "--diffusers", str(out), expect="NFE 4: afs: 'zero_x0'")
    r = s3_process("export", "--run", str(afs_run), "--diffusers", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error: NFE 4: afs") and "Traceback" not in r.stderr
    refused("--run", str(afs_run), "--diffusers", str(out), "--pipeline", str(tiny_ddpm), expect="DDPMPipeline")
    # Schedules searched on the DDPM table do not go onto the SD pipeline's scaled_linear table.
    plain_run = write_run(tmp_path / "runs" / "ddpm2", {"kind": "diffusers_pipeline", "pipeline": str(tiny_ddpm)},
                          [build_baseline("dpm_solver_pp_2m", noise, 4)])
    refused("--run", str(plain_run), "--diffusers", str(out), "--pipeline", str(tiny_sd),
            expect="--pipeline: ")
    r = s3("export", "--run", str(plain_run), "--diffusers", str(out), "--pipeline", str(tiny_sd))
    assert "noise schedule" in r.stderr
    # A pipeline folder without a model_index.json; a run without a schedule file.
    refused("--run", str(run_dir), "--diffusers", str(out), "--pipeline", str(tiny_sd / "unet"),
            expect="--pipeline")
    empty = tmp_path / "runs" / "empty"
    (empty / "best").mkdir(parents=True)
    refused("--run", str(empty), "--diffusers", str(out), expect="best/nfe*.json")
    (empty / "best" / "nfe3.json").write_text('{"noise_schedule": "vp_discrete", "steps": "many"}')
    refused("--run", str(empty), "--diffusers", str(out), expect="nfe3.json")


def test_an_earlier_export_is_replaced_only_with_force(sd_run, tmp_path):
    run_dir, _ = sd_run
    out = tmp_path / "out"
    assert s3("export", "--run", str(run_dir), "--diffusers", str(out), "--nfe", "3").returncode == 0
    r = s3("export", "--run", str(run_dir), "--diffusers", str(out))
    assert r.returncode == 2 and "--force" in r.stderr
    assert s3("export", "--run", str(run_dir), "--diffusers", str(out), "--force").returncode == 0
    from s3_ray import S3Scheduler

    assert S3Scheduler.from_pretrained(str(out)).nfes == (3, 4)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = s3("export", "--run", str(run_dir), "--diffusers", str(other), "--force")
    assert r.returncode == 2 and "not an earlier export" in r.stderr
    assert (other / "notes.txt").read_text() == "keep me"
