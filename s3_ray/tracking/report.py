"""The search report: ``runs/<name>/report.html``, one self-contained page (images inlined as data URIs).

It holds the summary table against every baseline, FID vs NFE, samples of S3 / the best baseline / the
converged solver from the same initial noise per NFE, the exported schedules and the search's own curve
(best score vs evaluations). ``report.json`` beside it records what the sample panels were drawn from
(seed, schedules), and ``compare/nfe<k>.npz`` the initial noise and each panel's images.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np

from s3_ray.tracking.plots import _plt, fid_vs_nfe_plot, plain_log_axis, schedule_diagram

REPORT = "report.html"
REPORT_DATA = "report.json"
COMPARE_DIR = "compare"
PANEL_SAMPLES = 16  # images per panel (a 4 x 4 grid)
GRID_SEED_OFFSET = 20_000  # the noise seed of the sample grids: config seed + this (as the driver's grids/)
PLOTS = ("score_vs_nfe.png", "schedules.png", "search_curve.png")


def tune_records(tune_dir) -> list[tuple[str, dict, dict]]:
    """(trial key, config, last result) of every full-evaluation trial that reported (not screening
    trials), read from Tune's ``result.json`` files."""
    out = []
    for f in Path(tune_dir).glob("*/result.json"):
        lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
        if not lines:
            continue
        result = json.loads(lines[-1])
        config = result.get("config", {})
        if "score" in result and "trial_key" in config and "screen" not in config:  # full evaluations only
            out.append((config["trial_key"], config, result))
    return sorted(out, key=lambda r: r[0])


def write_report(run_dir, summary: dict | None = None, records=None) -> Path:
    """Write the plots, ``report.json`` and ``report.html`` of a finished search; returns the report's path.

    ``summary`` defaults to the run's ``summary.json``, ``records`` (trial key, config, result) to
    Tune's results in ``tune/``."""
    from s3_ray.config import SearchConfig

    run_dir = Path(run_dir)
    cfg = SearchConfig.model_validate_json((run_dir / "config.json").read_text())
    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text())
    if records is None:
        records = tune_records(run_dir / "tune")
    records = sorted(records, key=lambda r: r[0])  # trial keys start with the suggestion index
    fid_vs_nfe_plot(summary, run_dir / "score_vs_nfe.png")
    schedule_diagram(sorted((run_dir / "best").glob("nfe*.json")), run_dir / "schedules.png")
    search_curve_plot(records, summary["metric"], run_dir / "search_curve.png")
    panels = comparison_panels(cfg, summary, records, run_dir / COMPARE_DIR)
    (run_dir / REPORT_DATA).write_text(json.dumps({"name": summary["name"], "panels": panels}, indent=1))
    path = run_dir / REPORT
    path.write_text(report_html(summary, run_dir, panels))
    return path


# ---- figures ------------------------------------------------------------------------------------

def search_curve_plot(records, metric: str, path) -> Path:
    """Best score so far per NFE against the number of evaluations, in suggestion order."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    best: dict[int, list[tuple[int, float]]] = {}
    stage = None
    for i, (_, c, r) in enumerate(records, 1):
        if c.get("stage") != stage and i > 1:  # a new stage of the searcher starts here
            ax.axvline(i - 0.5, color="gray", lw=0.6, ls=":")
        stage = c.get("stage")
        if r.get("failed") or not math.isfinite(r["score"]):
            continue
        pts = best.setdefault(c["nfe"], [])
        if not pts or r["score"] < pts[-1][1]:
            pts.append((i, r["score"]))
    for nfe, pts in sorted(best.items()):
        xs, ys = zip(*(pts + [(len(records), pts[-1][1])]))
        ax.step(xs, ys, where="post", marker="o", ms=3, label=f"NFE {nfe}")
    ax.set_xlabel("evaluations (in the order the searcher proposed them)")
    ax.set_ylabel(f"best {metric.upper()} so far (search samples)")
    ax.set_yscale("log")
    plain_log_axis(ax)
    ax.set_title("dotted: a new stage of the searcher", fontsize=8)
    if best:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _tile(images_u8: np.ndarray, ncol: int = 4) -> np.ndarray:
    """uint8 [N, C, H, W] -> one H x W (x 3) array, ``ncol`` images a row, 1-pixel white gaps."""
    n, c, h, w = images_u8.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = images_u8[i].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def comparison_panels(cfg, summary: dict, records, out_dir: Path, n: int = PANEL_SAMPLES) -> list[dict]:
    """Per NFE, samples of the best searched schedule, the best baseline and the converged solver, all
    from the same initial noise (one seed): a PNG and an ``.npz`` (``x_T`` and ``panel<i>``) in
    ``out_dir``. Returns what each figure was drawn from; [] for a model without images."""
    import torch

    from s3_ray.metrics.evaluate import REFERENCE_SOLVER, get_target
    from s3_ray.metrics.fid import uint8_images
    from s3_ray.usf.baselines import build_baseline
    from s3_ray.usf.schedule import SolverSchedule

    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    if not target.is_image:
        return []
    torch.set_num_threads(1)
    out_dir.mkdir(exist_ok=True)
    seed = cfg.seed + GRID_SEED_OFFSET
    by_hash = {c["schedule_hash"][:10]: c["schedule"] for _, c, _ in records}
    converged = build_baseline(REFERENCE_SOLVER[0], target.noise, REFERENCE_SOLVER[1])
    metric, plt, out = summary["metric"].upper(), _plt(), []
    solved: dict[str, np.ndarray] = {}  # schedule hash -> images (the converged panel is the same at every NFE)

    def images_of(s) -> np.ndarray:
        if s.schedule_hash() not in solved:
            solved[s.schedule_hash()] = uint8_images(target.sample(s, n, seed)).numpy()
        return solved[s.schedule_hash()]

    for row in summary["rows"]:
        chosen = []  # (kind, label, score, schedule)
        if row.get("searched_hash") in by_hash:
            chosen.append(("S3", row["searched_hash"], row["searched"], SolverSchedule.from_json(by_hash[row["searched_hash"]])))
        if row.get("best_baseline"):
            name, disc = row["best_baseline"].split("/")
            chosen.append(("best baseline", row["best_baseline"], row["best_baseline_score"],
                           build_baseline(name, target.noise, row["nfe"], discretization=disc)))
        chosen.append(("converged", f"{REFERENCE_SOLVER[0]}, NFE {REFERENCE_SOLVER[1]}", summary["converged"], converged))
        x_T = target.noise_batch(n, seed)
        images = [images_of(s) for *_, s in chosen]
        npz = out_dir / f"nfe{row['nfe']}.npz"
        np.savez(npz, x_T=x_T.numpy(), **{f"panel{i}": im for i, im in enumerate(images)})
        fig, axes = plt.subplots(1, len(chosen), figsize=(2.6 * len(chosen), 3.0), squeeze=False)
        for ax, (kind, label, score, _), im in zip(axes[0], chosen, images):
            ax.imshow(_tile(im), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(f"{kind}\n{label}\n{metric} {score:.3g}", fontsize=7)
            ax.axis("off")
        fig.suptitle(f"NFE {row['nfe']}: the same {n} initial noises (seed {seed})", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.94))
        png = out_dir / f"nfe{row['nfe']}.png"
        fig.savefig(png, dpi=100)
        plt.close(fig)
        out.append({"nfe": row["nfe"], "seed": seed, "n": n, "png": str(png.relative_to(out_dir.parent)),
                    "npz": str(npz.relative_to(out_dir.parent)),
                    "panels": [{"kind": kind, "label": label, "score": score, "schedule": _save(s, out_dir)}
                               for kind, label, score, s in chosen]})
    return out


def _save(schedule, out_dir: Path) -> str:
    """Save a panel's schedule as ``<out_dir>/<hash[:16]>.json``; returns that path relative to the run dir."""
    path = out_dir / f"{schedule.schedule_hash()[:16]}.json"
    schedule.save(path)
    return str(path.relative_to(out_dir.parent))


# ---- the page -----------------------------------------------------------------------------------

def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def summary_table(summary: dict) -> str:
    """One row per NFE: S3, the best baseline, the ratio, the converged score, then every baseline's score."""
    labels = sorted({e["label"] for e in summary.get("all", []) if e["kind"] == "baseline"})
    score = {(e["nfe"], e["label"]): e["score"] for e in summary.get("all", []) if e["kind"] == "baseline"}
    metric = html.escape(summary["metric"].upper())
    head = ["NFE", f"S3 {metric}", "best baseline", f"its {metric}", "S3 / baseline", "converged"]
    head += [html.escape(lab).replace("/", "/<br>") for lab in labels]
    rows = []
    for r in summary["rows"]:
        cells = [str(r["nfe"]), f"<b>{_num(r['searched'])}</b>", html.escape(str(r["best_baseline"])),
                 _num(r["best_baseline_score"]), "-" if r["ratio"] is None else f"{r['ratio']:.2f}", _num(summary["converged"])]
        for lab in labels:
            v = _num(score.get((r["nfe"], lab)))
            cells.append(f"<b>{v}</b>" if lab == r["best_baseline"] else v)
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<div class="wide"><table id="summary"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) +
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }}
h2 {{ margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
.wide {{ overflow-x: auto; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ background: #f3f3f3; }}
img {{ max-width: min(100%, 860px); display: block; margin: 0.5em 0; }}
.note {{ color: #555; font-size: 13px; }}
</style></head><body>
<h1>{title}</h1>
<p class="note">{intro}</p>
<h2>Summary</h2>
{table}
<p class="note">Bold in a row: the S3 score and the best baseline. The exported schedules are in <code>best/nfe&lt;k&gt;.json</code>.</p>
<h2>Samples from the same initial noise</h2>
<p class="note">The panels of one NFE start from identical noise x_T (seed in the caption): what differs is the solver.</p>
{grids}
<h2>{metric} vs NFE</h2>
{fid_plot}
<h2>Exported schedules</h2>
{schedules}
<h2>The search</h2>
{curve}
<p class="note">{trials} trials; {taus}</p>
</body></html>
"""


def report_html(summary: dict, run_dir: Path, panels: list[dict]) -> str:
    metric = summary["metric"].upper()
    intro = (f"{metric} against the {summary['reference']} reference, {summary['final_samples']} samples x "
             f"{len(summary['final_seeds'])} fresh seed(s) per candidate; converged {metric} (reference solver): "
             f"{_num(summary['converged'])}.")
    taus = [t for t in summary.get("predictor_tau", []) if t.get("kendall_tau") is not None]
    tau_text = ("predictor Kendall tau per stage (held-out): " +
                ", ".join(f"stage {t['stage']}: {_num(t['kendall_tau'])}" for t in taus)) if taus else "no predictor stages"
    grids = "\n".join(_img(run_dir / p["png"], f"NFE {p['nfe']} samples") for p in panels) or \
        '<p class="note">(no images: the model is not an image model)</p>'
    return PAGE.format(
        title=html.escape(f"{summary['name']}: S3 search report"), intro=html.escape(intro), metric=html.escape(metric),
        table=summary_table(summary), fid_plot=_img(run_dir / "score_vs_nfe.png", f"{metric} vs NFE"), grids=grids,
        schedules=_img(run_dir / "schedules.png", "schedules"), curve=_img(run_dir / "search_curve.png", "search curve"),
        trials=summary.get("trials", "?"), taus=html.escape(tau_text))
