"""Figures for people: score vs NFE, a schedule diagram, and image grids (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_axis(ax) -> None:
    """Log-scale y ticks written as plain numbers (0.9, 1.2), not 9 x 10^-1."""
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def image_grid(images_u8, path, ncol: int = 16, scale: int = 4) -> Path:
    """Save uint8 images [N, C, H, W] (C = 1 or 3) as one PNG grid, each pixel scaled up."""
    from PIL import Image

    x = np.asarray(images_u8)
    n, c, h, w = x.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    pad = 1
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    img.save(path)
    return path


def fid_vs_nfe_plot(summary: dict, path) -> Path:
    """Searched schedule, every baseline (thin; colour = builder, line style = discretisation), the best
    baseline per NFE and the converged level."""
    plt = _plt()
    rows = summary["rows"]
    nfe = [r["nfe"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    curves: dict[str, list] = {}
    for e in summary.get("all", []):
        if e["kind"] == "baseline" and np.isfinite(e["score"]):
            curves.setdefault(e["label"], []).append((e["nfe"], e["score"]))
    builders = sorted({lab.split("/")[0] for lab in curves})
    styles = ["-", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    discs = sorted({lab.split("/")[-1] for lab in curves})
    for lab, pts in sorted(curves.items()):
        builder, disc = lab.split("/")[0], lab.split("/")[-1]
        ax.plot(*zip(*sorted(pts)), color=plt.cm.tab10(builders.index(builder) % 10), ls=styles[discs.index(disc) % len(styles)],
                lw=0.9, marker=".", ms=4, alpha=0.7, label=lab)
    ax.plot(nfe, [r["best_baseline_score"] for r in rows], "s--", color="k", mfc="none", label="best tuned baseline")
    for r in rows:  # whom S3 has to beat at each NFE, by name
        if r["best_baseline"]:
            ax.annotate(r["best_baseline"], (r["nfe"], r["best_baseline_score"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=6)
    s = [(r["nfe"], r["searched"]) for r in rows if r["searched"] is not None]
    if s:
        ax.plot(*zip(*s), "o-", color="tab:red", lw=2.5, label="S3 (searched)")
    front = summary.get("pareto") or []
    if front:
        ax.plot([p["nfe"] for p in front], [p["score"] for p in front], "*", color="gold", mec="k", ms=13, zorder=5,
                label="Pareto front (best per NFE)")
    ax.axhline(summary["converged"], color="gray", lw=1.2, ls="--", label="converged")
    ax.set_xlabel("NFE")
    ax.set_ylabel(summary["metric"].upper())
    ax.set_yscale("log")
    plain_log_axis(ax)
    ax.set_xticks(nfe)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def schedule_diagram(schedule_files, path) -> Path:
    """One row per schedule: steps as segments in logSNR, coloured by order, marked by prediction
    type (o data, x noise), with a ring where a corrector follows."""
    from s3_ray.usf.noise import get_noise_schedule
    from s3_ray.usf.schedule import load_schedule

    plt = _plt()
    files = list(schedule_files)
    fig, ax = plt.subplots(figsize=(7, 0.7 * max(len(files), 1) + 1.6))
    colors = {1: "tab:blue", 2: "tab:green", 3: "tab:orange", 4: "tab:red"}
    for row, f in enumerate(files):
        s = load_schedule(f)
        lam = get_noise_schedule(s.noise_schedule).lambda_(np.array(s.times))
        for i, st in enumerate(s.steps):
            ax.plot([lam[i], lam[i + 1]], [row, row], color=colors[st.order], lw=4)
            ax.plot(lam[i + 1], row, "o" if st.prediction == "data" else "x", color="k", ms=5)
            if st.corrector is not None:
                ax.plot(lam[i + 1], row, "o", mfc="none", mec="purple", ms=10)
        ax.text(lam[0], row + 0.25, f"{Path(f).stem} (NFE {s.nfe()}, afs={s.afs})", fontsize=7)
    ax.set_yticks([])
    ax.set_ylim(-0.6, len(files) - 0.2)
    ax.set_xlabel("logSNR lambda")
    ax.set_title("order: 1 blue, 2 green, 3 orange, 4 red; o data, x noise prediction; ring = corrector", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
