"""Malformed inputs, table-driven: schedules, release files, search spaces, checkpoints, CLI flags.

Each case must exit with status 2 and one error line that names the file and/or the field or flag,
print no traceback, and write nothing (the directory tree is unchanged and the output path does not
exist). Cases run in-process through ``s3_ray.cli.main`` (argparse errors raise SystemExit(2)); a
few run through the real ``python -m s3_ray.cli``. Every case is refused before anything starts:
nothing here starts Ray or MLflow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from s3_ray.cli import main
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import get_noise_schedule
from s3_ray.usf.release import load_release

GOOD = json.loads(build_baseline("dpm_solver_pp_2m", get_noise_schedule("vp_linear"), 4).to_json())
GOOD_DISCRETE = build_baseline("ddim", get_noise_schedule("vp_discrete"), 3).to_json()
RELEASE = load_release()["score_sde/cifar10_sde_nfe9"]
NOT_WRITABLE = "/sys/s3-bad-input"  # even root may not create files in sysfs


def sched(path=(), value=None, data=None) -> str:
    """The good schedule's JSON with ``value`` at ``path`` (a tuple of keys and indices)."""
    d = json.loads(json.dumps(GOOD if data is None else data))
    obj = d
    for p in path[:-1]:
        obj = obj[p]
    if path:
        obj[path[-1]] = value
    return json.dumps(d)


def release(path, value) -> str:
    d = json.loads(json.dumps(RELEASE))
    obj = d["schedule"]
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value
    return json.dumps(d)


def deep(n=100_000) -> str:
    return "[" * n + "]" * n


BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8"
LATIN1 = sched(("noise_schedule",), "vp_lin\u00e9ar").replace("\\u00e9", "\u00e9").encode("latin-1")
UTF16 = sched().encode("utf-16")
TOO_BIG = b" " * (4 * 2**20 + 1) + b"{}"
MANY_STEPS = sched(("steps",), [{"t": 1.0 - (i + 1) / 1002, "prediction": "data", "order": 1} for i in range(1001)])

# ---- the table: (id, argv, files written before the run, fragments of the error line) --------------
# In argv and file names, {d} is the case's directory; {out} is an output path that must not appear.
V = ["schedule", "validate", "{d}/s.json"]


def validate(content, *needles, name="s.json"):
    return (["schedule", "validate", f"{{d}}/{name}"], {name: content}, (name, *needles))


SCHEDULES = {
    "t-string": validate(sched(("steps", 0, "t"), "0.5"), "steps[0].t", "valid number"),
    "order-bool": validate(sched(("steps", 1, "order"), True), "steps[1].order", "valid integer"),
    "order-float": validate(sched(("steps", 1, "order"), 2.0), "steps[1].order"),
    "t_start-string": validate(sched(("t_start",), "1"), "t_start"),
    "t_start-bool": validate(sched(("t_start",), True), "t_start"),
    "t_start-above-T": validate(sched(("t_start",), 80.0), "t_start", "above T"),
    "noise-unknown": validate(sched(("noise_schedule",), "vp_linearr"), "noise_schedule", "unknown"),
    "noise-number": validate(sched(("noise_schedule",), 5), "noise_schedule"),
    "version-bool": validate(sched(("format_version",), True), "format_version"),
    "points-string": validate(sched(("steps", 1, "derivatives", 0, "points"), ["-1"]), "steps[1].derivatives[0].points"),
    "points-bool": validate(sched(("steps", 1, "derivatives", 0, "points"), [True]), "steps[1].derivatives[0].points"),
    "slope-string": validate(sched(("steps", 1, "derivatives", 0, "relaxation"), {"slope": "0.1"}), "relaxation.slope"),
    "steps-object": validate(sched(("steps",), {"t": 0.5}), "steps"),
    "steps-too-many": validate(MANY_STEPS, "steps", "at most 1000"),
    "afs-null": validate(sched(("afs",), None), "afs"),
    "corrector-string": validate(sched(("steps", 1, "corrector"), "pseudo"), "steps[1].corrector"),
    "t-nan": validate(sched(("steps", 2, "t"), float("nan")), "steps[2].t", "finite"),
    "extra-key": validate(sched(("speed",), 3), "speed", "Extra inputs"),
    "top-level-list": validate("[1, 2]", "a schedule is a JSON object"),
    "not-json": validate("{nope", "not valid JSON"),
    "empty-file": validate("", "not valid JSON"),
    "deeply-nested": validate(deep(), "not valid JSON"),
    "binary": validate(BINARY, "not UTF-8"),
    "latin-1": validate(LATIN1, "not UTF-8"),
    "utf-16": validate(UTF16, "UTF-16"),
    "too-big": validate(TOO_BIG, "larger than the 4 MB"),
    "missing-file": (V, {}, ("s.json", "cannot read")),
    "dev-zero": (["schedule", "validate", "/dev/zero"], {}, ("/dev/zero", "larger than the 4 MB")),
    "directory": (["schedule", "validate", "{d}/dir.json"], {"dir.json/": None}, ("dir.json", "cannot read")),
    "show-t-string": (["schedule", "show", "{d}/s.json"], {"s.json": sched(("steps", 0, "t"), "0.5")},
                      ("s.json", "steps[0].t")),
    "show-noise-bogus": (["schedule", "show", "{d}/s.json", "--noise-schedule", "bogus"], {"s.json": sched()},
                         ("--noise-schedule",)),
    "evaluate-binary": (["evaluate", "--schedule", "{d}/s.json"], {"s.json": BINARY}, ("s.json", "not UTF-8")),
    "sample-bad-schedule": (["sample", "--schedule", "{d}/s.json", "--out", "{out}.png"],
                            {"s.json": sched(("steps", 1, "order"), "2")}, ("s.json", "steps[1].order")),
}

IMP = ["schedule", "import-usf", "{d}/r.json", "--noise-schedule", "vp_linear", "--out", "{out}.json"]


def imported(content, *needles):
    return (IMP, {"r.json": content}, ("r.json", *needles))


RELEASE_FILES = {
    "release-top-level-list": imported("[]", "JSON object"),
    "release-orders-int": imported(release(("orders",), 3), "orders", "expected a list"),
    "release-corrector-no-type": imported(release(("corrector_types", 0), {"taylor_order": 2}),
                                          "corrector_types[0].type", "missing"),
    "release-deeply-nested": imported(deep(), "nested too deeply"),
    "release-no-timesteps": imported(json.dumps({"schedule": {"orders": []}}), "timesteps"),
    "release-orders-short": imported(release(("orders",), [1, 2]), "orders", "entries for"),
    "release-timestep-string": imported(release(("timesteps", 1), "0.5"), "timesteps[1]", "number"),
    "release-prediction-unknown": imported(release(("prediction_types", 0), "velocity"), "prediction_types[0]"),
    "release-order-bool": imported(release(("orders", 0), True), "steps[0].order"),
    "release-coefficient-string": imported(
        release(("derivative_types", 3, 0), {"estimate": "Difference_1", "active_points": [-2],
                                             "relaxation": "linear", "relaxation_coefficient": "0.1"}),
        "derivative_types[3][0].relaxation_coefficient"),
    "release-start-string": imported(release(("start_points", 0), "x"), "start_points[0]"),
    "release-derivatives-int": imported(release(("derivative_types", 1), 5), "derivative_types[1]"),
    "release-derivative-string": imported(release(("derivative_types", 1), ["d"]), "derivative_types[1][0]"),
    "release-points-int": imported(release(("derivative_types", 3, 0, "active_points"), -2), "active_points"),
    "release-afs-unknown": imported(release(("afs",), "half"), "afs"),
    "release-binary": imported(BINARY, "not UTF-8"),
    "release-unknown-key": (["schedule", "import-usf", "edm/nope", "--out", "{out}.json"], {}, ("edm/nope",)),
    "release-no-noise-schedule": (["schedule", "import-usf", "{d}/r.json", "--out", "{out}.json"],
                                  {"r.json": json.dumps(RELEASE)}, ("noise_schedule: required",)),
    "release-noise-bogus": (["schedule", "import-usf", "{d}/r.json", "--noise-schedule", "bogus"],
                            {"r.json": json.dumps(RELEASE)}, ("--noise-schedule",)),
    "release-out-directory": (["schedule", "import-usf", "score_sde/cifar10_sde_nfe9", "--out", "{d}"], {},
                              ("--out", "is a directory")),
    "release-out-unwritable": (["schedule", "import-usf", "score_sde/cifar10_sde_nfe9", "--out",
                                f"{NOT_WRITABLE}.json"], {}, ("--out", "cannot write")),
}

B = ["baseline", "ddim", "--nfe", "3"]
FLAGS = {
    "baseline-t-end-negative": (B + ["--t-end", "-1", "--out", "{out}.json"], {}, ("--t-end",)),
    "baseline-t-end-nan": (B + ["--t-end", "nan", "--out", "{out}.json"], {}, ("--t-end",)),
    "baseline-t-end-above-T": (B + ["--t-end", "5", "--out", "{out}.json"], {}, ("--t-end", "below T")),
    "baseline-collapsing-times": (["baseline", "ddim", "--nfe", "500", "--t-end", "0.9999999999999999", "--out",
                                   "{out}.json"], {}, ("steps[", "times must decrease strictly")),  # pydantic, one line
    "baseline-nfe-0": (["baseline", "ddim", "--nfe", "0", "--out", "{out}.json"], {}, ("--nfe",)),
    "baseline-nfe-word": (["baseline", "ddim", "--nfe", "x", "--out", "{out}.json"], {}, ("--nfe",)),
    "baseline-nfe-huge": (["baseline", "ddim", "--nfe", "100000", "--out", "{out}.json"], {}, ("--nfe",)),
    "baseline-order-9": (B + ["--order", "9", "--out", "{out}.json"], {}, ("--order",)),
    "baseline-noise-bogus": (B + ["--noise-schedule", "bogus", "--out", "{out}.json"], {}, ("--noise-schedule",)),
    "baseline-name-bogus": (["baseline", "bogus", "--nfe", "3", "--out", "{out}.json"], {}, ("name",)),
    "baseline-out-directory": (B + ["--out", "{d}"], {}, ("--out", "is a directory")),
    "baseline-out-no-parent": (B + ["--out", "{d}/missing/x.json"], {}, ("--out", "does not exist")),
    "baseline-out-under-file": (B + ["--out", "{d}/f.txt/x.json"], {"f.txt": "x"}, ("--out", "not a directory")),
    "baseline-out-unwritable": (B + ["--out", f"{NOT_WRITABLE}.json"], {}, ("--out", "cannot write")),
    "evaluate-samples-negative": (["evaluate", "--schedule", "{d}/s.json", "--samples", "-5"], {"s.json": sched()},
                                  ("--samples",)),
    "evaluate-samples-0": (["evaluate", "--schedule", "{d}/s.json", "--samples", "0"], {"s.json": sched()},
                           ("--samples",)),
    "evaluate-samples-1": (["evaluate", "--schedule", "{d}/s.json", "--samples", "1"], {"s.json": sched()},
                           ("--samples",)),
    "evaluate-samples-1e9": (["evaluate", "--schedule", "{d}/s.json", "--samples", "1000000000"],
                             {"s.json": sched()}, ("--samples",)),
    "evaluate-samples-10^9": (["evaluate", "--schedule", "{d}/s.json", "--samples", "10^9"], {"s.json": sched()},
                              ("--samples",)),
    "evaluate-seed-negative": (["evaluate", "--schedule", "{d}/s.json", "--seed", "-1"], {"s.json": sched()},
                               ("--seed",)),
    "sample-n-0": (["sample", "--schedule", "{d}/s.json", "--n", "0", "--out", "{out}.png"], {"s.json": sched()},
                   ("--n",)),
    "sample-ncol-0": (["sample", "--schedule", "{d}/s.json", "--ncol", "0", "--out", "{out}.png"],
                      {"s.json": sched()}, ("--ncol",)),
    "sample-out-not-image": (["sample", "--schedule", "{d}/s.json", "--out", "{out}.xyz"], {"s.json": sched()},
                             ("--out", "not an image")),
    "sample-out-directory": (["sample", "--schedule", "{d}/s.json", "--out", "{d}/g.png"],
                             {"s.json": sched(), "g.png/": None}, ("--out", "is a directory")),
    "baselines-seeds-0": (["baselines", "--seeds", "0", "--out-dir", "{out}"], {}, ("--seeds",)),
    "baselines-samples-1": (["baselines", "--samples", "1", "--out-dir", "{out}"], {}, ("--samples",)),
    "baselines-nfe-word": (["baselines", "--nfe", "3,x", "--out-dir", "{out}"], {}, ("--nfe",)),
    "baselines-nfe-0": (["baselines", "--nfe", "0", "--out-dir", "{out}"], {}, ("--nfe",)),
    "baselines-out-dir-file": (["baselines", "--out-dir", "{d}/f.txt"], {"f.txt": "x"},
                               ("--out-dir", "not a directory")),
    "baselines-out-dir-unwritable": (["baselines", "--out-dir", NOT_WRITABLE], {}, ("--out-dir", "cannot write")),
    "train-steps-negative": (["train-model", "diffusion", "--out", "{out}", "--steps", "-1"], {}, ("--steps",)),
    "train-steps-0": (["train-model", "classifier", "--out", "{out}", "--steps", "0"], {}, ("--steps",)),
    "train-out-file": (["train-model", "diffusion", "--out", "{d}/f.txt", "--steps", "1"], {"f.txt": "x"},
                       ("--out", "not a directory")),
    "train-out-unwritable": (["train-model", "diffusion", "--out", NOT_WRITABLE, "--steps", "1"], {},
                             ("--out", "cannot write")),
    "search-budget-0": (["search", "--budget", "0", "--runs", "{out}"], {}, ("--budget",)),
    "search-budget-negative": (["search", "--budget", "-3", "--runs", "{out}"], {}, ("--budget",)),
    "search-runs-file": (["search", "--runs", "{d}/f.txt"], {"f.txt": "x"}, ("--runs", "not a directory")),
    "search-runs-unwritable": (["search", "--runs", NOT_WRITABLE], {}, ("--runs", "cannot write")),
    "search-algo-bogus": (["search", "--algo", "bogus", "--runs", "{out}"], {}, ("--algo",)),
    "mlflow-port-negative": (["mlflow-server", "--port", "-1", "--runs", "{out}"], {}, ("--port",)),
    "mlflow-port-70000": (["mlflow-server", "--port", "70000", "--runs", "{out}"], {}, ("--port",)),
    "mlflow-port-word": (["mlflow-server", "--port", "http", "--runs", "{out}"], {}, ("--port",)),
    "mlflow-host-bogus": (["mlflow-server", "--host", "bogus.invalid", "--port", "5999", "--runs", "{out}"], {},
                          ("--host bogus.invalid", "resolve")),
    "mlflow-host-not-local": (["mlflow-server", "--host", "192.0.2.1", "--port", "5999", "--runs", "{out}"], {},
                              ("--host 192.0.2.1", "cannot listen")),
    "mlflow-runs-file": (["mlflow-server", "--runs", "{d}/f.txt"], {"f.txt": "x"}, ("--runs", "not a directory")),
    "mlflow-runs-unwritable": (["mlflow-server", "--runs", NOT_WRITABLE], {}, ("--runs", "cannot write")),
    "mlflow-timeout-0": (["mlflow-server", "--timeout", "0", "--runs", "{out}"], {}, ("--timeout",)),
}

EV = ["evaluate", "--schedule", "{d}/s.json", "--space", "{d}/space.yaml", "--samples", "4"]


def space(content, *needles):
    return (EV, {"s.json": sched(), "space.yaml": content}, ("space.yaml", *needles))


SPACES = {
    "space-budget-word": space("budget: lots\n", "budget"),
    "space-budget-0": space("budget: 0\n", "budget"),
    "space-nfe-0": space("nfe: [0]\n", "nfe"),
    "space-nfe-word": space("nfe: five\n", "nfe"),
    "space-unknown-key": space("budgett: 10\n", "budgett", "Extra inputs"),
    "space-model-number": space("model: 3\n", "model"),
    "space-model-kind": space("model: {kind: resnet}\n", "model.kind"),
    "space-crossover-prob": space("operators: {crossover_prob: 2}\n", "operators.crossover_prob"),
    "space-max-order": space("decisions: {max_order: 9}\n", "decisions.max_order"),
    "space-metric-samples": space("metric: {samples: [1]}\n", "metric.samples"),
    "space-name-path": space("name: ../x\n", "name"),
    "space-list": space("- 1\n- 2\n", "mapping"),
    "space-not-yaml": space("a: [\n", "not valid YAML"),
    "space-binary": space(BINARY, "not UTF-8"),
    "space-deeply-nested": space(deep(20_000), "not valid YAML"),
    "space-missing": (EV, {"s.json": sched()}, ("space.yaml", "cannot read")),
}


def checkpoint_space(ckpt: str) -> str:
    return json.dumps({"model": {"kind": "checkpoint", "checkpoint": ckpt, "noise_schedule": "vp_discrete",
                                 "time_label": "discrete"}, "metric": {"kind": "rmse"}})


CK = ["evaluate", "--schedule", "{d}/s.json", "--space", "{d}/ck.yaml", "--samples", "4"]
CHECKPOINTS = {  # the checkpoint variants are made by the `unets` fixture under {d}/../unets/
    "checkpoint-missing-tensors": ("missing", ("model.checkpoint", "lack tensors", "conv_in.weight")),
    "checkpoint-absent": ("absent", ("model.checkpoint", "does not exist")),
    "checkpoint-pickled": ("pickled", ("model.checkpoint", "refused")),
    "checkpoint-corrupt": ("corrupt", ("model.checkpoint", "cannot load")),
    "checkpoint-config-not-json": ("badconfig", ("model.checkpoint", "config.json")),
    "checkpoint-conditional": ("conditional", ("model.checkpoint", "_class_name")),
}

CASES = {**SCHEDULES, **RELEASE_FILES, **FLAGS, **SPACES}


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1 for p in root.rglob("*")}


def prepare(d: Path, argv, files) -> list[str]:
    for name, content in files.items():
        if name.endswith("/"):
            (d / name).mkdir()
        elif isinstance(content, bytes):
            (d / name).write_bytes(content)
        else:
            (d / name).write_text(content)
    return [a.replace("{d}", str(d)).replace("{out}", str(d / "out")) for a in argv]


def run_in_process(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def assert_refused(rc, text, needles, d: Path, before: dict):
    assert rc == 2, text
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if "error:" in ln]
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert tree(d) == before, "a file was written"
    assert not any(p.name.startswith("out") for p in d.iterdir())
    assert not Path(NOT_WRITABLE).exists() and not Path(f"{NOT_WRITABLE}.json").exists()


@pytest.fixture
def case_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "case"
    d.mkdir()
    monkeypatch.chdir(d)  # default outputs (runs/, benchmarks/results/) would land here
    return d


@pytest.mark.parametrize("argv,files,needles", CASES.values(), ids=CASES.keys())
def test_refused(argv, files, needles, case_dir, capsys):
    argv = prepare(case_dir, argv, files)
    before = tree(case_dir)
    rc, text = run_in_process(argv, capsys)
    assert_refused(rc, text, needles, case_dir, before)


@pytest.fixture(scope="module")
def unets(tmp_path_factory) -> Path:
    """Checkpoint variants of one small diffusers UNet2DModel (safetensors)."""
    import torch
    from diffusers import UNet2DModel
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("unets")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    for name in ("missing", "corrupt", "badconfig", "conditional"):
        unet.save_pretrained(root / name, safe_serialization=True)
    unet.save_pretrained(root / "pickled", safe_serialization=False)
    weights = next((root / "missing").glob("*.safetensors"))
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("conv_in.")}, weights)
    next((root / "corrupt").glob("*.safetensors")).write_bytes(b"not safetensors")
    (root / "badconfig" / "config.json").write_bytes(BINARY)
    cfg = root / "conditional" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "UNet2DConditionModel"}))
    return root


@pytest.mark.parametrize("variant,needles", CHECKPOINTS.values(), ids=CHECKPOINTS.keys())
def test_refused_checkpoint(variant, needles, unets, case_dir, capsys):
    files = {"s.json": GOOD_DISCRETE, "ck.yaml": checkpoint_space(str(unets / variant))}
    argv = prepare(case_dir, CK, files)
    before, ckpt_before = tree(case_dir), tree(unets)
    rc, text = run_in_process(argv, capsys)
    assert_refused(rc, text, needles, case_dir, before)
    assert tree(unets) == ckpt_before


SUBPROCESS = ["baseline-t-end-nan", "binary", "mlflow-port-70000", "release-deeply-nested"]


@pytest.mark.parametrize("key", SUBPROCESS)
def test_refused_as_a_user_runs_it(key, case_dir):
    argv, files, needles = CASES[key]
    argv = prepare(case_dir, argv, files)
    before = tree(case_dir)
    r = subprocess.run([sys.executable, "-m", "s3_ray.cli", *argv], capture_output=True, text=True, cwd=case_dir)
    assert_refused(r.returncode, r.stdout + r.stderr, needles, case_dir, before)


def test_table_size():
    assert len(CASES) + len(CHECKPOINTS) >= 60


def test_legitimate_inputs_still_load(case_dir, capsys):
    """Integers for float fields, a UTF-8 byte-order mark and our own canonical JSON are valid."""
    (case_dir / "ints.json").write_text(sched(("t_start",), 1))
    (case_dir / "bom.json").write_bytes(b"\xef\xbb\xbf" + sched().encode())
    (case_dir / "edm.json").write_text(sched(data={**GOOD, "noise_schedule": "edm", "t_start": 80.00000762939453}))
    for name in ("ints.json", "bom.json", "edm.json"):
        assert main(["schedule", "validate", str(case_dir / name)]) == 0, capsys.readouterr().err
    assert main(["baseline", "ddim", "--nfe", "3", "--out", str(case_dir / "b.json")]) == 0
    assert main(["schedule", "validate", str(case_dir / "b.json")]) == 0


# ---- diffusers pipeline targets: `s3 search` refuses before anything starts (no run directory) ----
# Variants of the tiny pipelines (tests/tiny_pipelines.py) are made by the `pipes` fixture under
# {d}/../pipes/; "sd" and "ddpm" are the good ones.
PIPE_SPACES = {
    "pipeline-pickled": ("pickled", {}, ("model.pipeline", "refused", "diffusion_pytorch_model.bin")),
    "pipeline-unsupported-class": ("unsupported", {}, ("model.pipeline", "_class_name", "DDIMPipeline")),
    "pipeline-unknown-beta-schedule": ("beta", {}, ("scheduler_config.json", "beta_schedule", "cosine_bogus")),
    "pipeline-absent": ("absent", {}, ("model.pipeline", "does not exist")),
    "pipeline-prompts-empty": ("sd", {"prompts": "\n  \n"}, ("model.prompts", "prompts.txt", "no prompt")),
    "pipeline-prompts-binary": ("sd", {"prompts": BINARY}, ("model.prompts", "prompts.txt", "not UTF-8")),
    "pipeline-prompts-nul": ("sd", {"prompts": "a cat\nx\x00y\n"}, ("model.prompts", "prompts.txt", "line 2")),
    "pipeline-prompts-missing": ("sd", {}, ("model.prompts", "prompts.txt", "cannot read")),
    "pipeline-image-size": ("sd", {"prompts": "a cat\n", "model": {"image_size": [12, 12]}}, ("model.image_size",)),
    "pipeline-afs-ddpm": ("ddpm", {"decisions": {"afs": ["none", "zero_x0"]}}, ("decisions.afs", "DDPMPipeline")),
    "pipeline-noise-schedule": ("ddpm", {"model": {"noise_schedule": "flow"}}, ("model.noise_schedule", "flow")),
    "pipeline-fid-no-weights": ("ddpm", {"metric": {"kind": "fid", "reference": "model",
                                                    "feature_extractor": "inception-v3-compat",
                                                    "feature_extractor_weights_path": "{d}/inception.pth"}},
                                ("metric.feature_extractor_weights_path", "inception.pth")),
    "pipeline-seed-afs": ("ddpm", {"seed_schedules": ["{d}/seed.json"], "seed_file": build_baseline(
        "ddim", get_noise_schedule("vp_discrete"), 3, afs="zero_x0").to_json()},
        ("seed_schedules[0]", "seed.json", "DDPMPipeline", "afs")),
    "pipeline-fid-data": ("ddpm", {"metric": {"kind": "fid", "reference": "data"}}, ("p.yaml", "metric.reference")),
}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory, tiny_ddpm, tiny_sd) -> Path:
    import shutil

    from diffusers import DDPMPipeline

    root = tmp_path_factory.mktemp("pipes")
    (root / "sd").symlink_to(tiny_sd)
    (root / "ddpm").symlink_to(tiny_ddpm)
    DDPMPipeline.from_pretrained(tiny_ddpm).save_pretrained(root / "pickled", safe_serialization=False)
    for name in ("unsupported", "beta"):
        shutil.copytree(tiny_ddpm, root / name)
    index = root / "unsupported" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "DDIMPipeline"}))
    sched = root / "beta" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "beta_schedule": "cosine_bogus"}))
    return root


@pytest.mark.parametrize("variant,extra,needles", PIPE_SPACES.values(), ids=PIPE_SPACES.keys())
def test_refused_pipeline_search(variant, extra, needles, pipes, case_dir, capsys):
    import yaml

    extra = {k: json.loads(json.dumps(v).replace("{d}", str(case_dir))) if isinstance(v, (dict, list)) else v
             for k, v in extra.items()}
    model = {"kind": "diffusers_pipeline", "pipeline": str(pipes / variant), **extra.pop("model", {})}
    files = {"seed.json": extra.pop("seed_file")} if "seed_file" in extra else {}
    if variant == "sd":
        model.update(prompts=str(case_dir / "prompts.txt"), guidance_scale=2.0)
        if "prompts" in extra:
            files["prompts.txt"] = extra.pop("prompts")
    space_yaml = {"name": "pipe", "model": model, "metric": {"kind": "rmse", "samples": [4]}, "nfe": [3], **extra}
    files["p.yaml"] = yaml.safe_dump(space_yaml)
    argv = prepare(case_dir, ["search", "--space", "{d}/p.yaml", "--runs", "{d}/runs"], files)
    before, pipes_before = tree(case_dir), tree(pipes)
    rc, text = run_in_process(argv, capsys)
    assert_refused(rc, text, needles, case_dir, before)
    assert not (case_dir / "runs").exists() and tree(pipes) == pipes_before
    print(text.strip())
