"""The ``s3`` command. Thin: parses arguments and calls the layers below.

Errors in user input (schedules, configs, checkpoints) exit with status 2 and one message, no
traceback.
"""

from __future__ import annotations

import argparse
import sys

from s3_ray.usf.schedule import ScheduleError


class UsageError(Exception):
    """Bad user input: printed as one line, exit status 2."""


def _noise(name: str):
    from s3_ray.usf.noise import get_noise_schedule

    return get_noise_schedule(name)


# ---- schedules ---------------------------------------------------------------------------------

def cmd_baseline(a):
    from s3_ray.usf.baselines import build_baseline

    noise = _noise(a.noise_schedule)
    s = build_baseline(a.name, noise, a.nfe, order=a.order, discretization=a.discretization, t_end=a.t_end,
                       afs=a.afs, lower_order_final=a.lower_order_final or None, prediction=a.prediction)
    _write(s, a.out)
    print(f"{a.name}: {len(s.steps)} steps, NFE {s.nfe()} -> {a.out}")


def cmd_validate(a):
    from s3_ray.usf.schedule import load_schedule

    s = load_schedule(a.file)
    print(f"{a.file}: valid, {len(s.steps)} steps, NFE {s.nfe()}, hash {s.schedule_hash()[:12]}")


def cmd_show(a):
    from s3_ray.usf.schedule import load_schedule

    s = load_schedule(a.file)
    print(format_schedule_table(s, _noise(a.noise_schedule or s.noise_schedule)))


def cmd_import_usf(a):
    from s3_ray.usf.release import claimed_nfe, import_release

    s = import_release(a.source, noise_schedule=a.noise_schedule)
    _write(s, a.out)
    claim = claimed_nfe(a.source)
    extra = f" (the release claims {claim})" if claim is not None else ""
    print(f"{a.source}: {len(s.steps)} steps, NFE {s.nfe()}{extra} -> {a.out}")


def _write(s, out):
    if out in (None, "-"):
        print(s.to_json(indent=1))
    else:
        s.save(out)


def format_schedule_table(s, noise) -> str:
    """Per-step table: t, lambda, h, order, prediction, start, derivative points, corrector; and NFE."""
    import numpy as np

    lam = noise.lambda_(np.array(s.times))
    rows = [f"{'step':>4} {'t':>12} {'lambda':>8} {'h':>7} {'ord':>3} {'pred':>5} {'start':>5} "
            f"{'derivative points':<24} corrector"]
    rows.append(f"{'T':>4} {s.t_start:>12.6g} {lam[0]:>8.3f}   afs={s.afs}")
    for i, st in enumerate(s.steps):
        pts = " ".join(",".join(str(p) for p in d.points) + ("" if d.relaxation.is_identity else f"[{_relax(d.relaxation)}]")
                       for d in st.derivatives) or "-"
        if st.combine != "taylor":
            pts = f"{st.combine}: {pts}"
        c = st.corrector
        corr = "-" if c is None else f"{c.kind} o{c.order}" + (f" {c.combine}" if c.combine != "taylor" else "") + " " + \
            " ".join(",".join(str(p) for p in d.points) for d in c.derivatives)
        rows.append(f"{i:>4} {st.t:>12.6g} {lam[i + 1]:>8.3f} {lam[i + 1] - lam[i]:>7.3f} {st.order:>3} "
                    f"{st.prediction:>5} {st.start:>5} {pts:<24} {corr}")
    rows.append(f"NFE {s.nfe()} ({len(s.steps)} steps, noise schedule {s.noise_schedule})")
    return "\n".join(rows)


def _relax(r) -> str:
    return r.kind if r.kind != "linear" else f"{r.scale:g}{r.slope:+g}h"


# ---- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from s3_ray.usf.baselines import BASELINES, DISCRETIZATIONS

    p = argparse.ArgumentParser(prog="s3", description="USF/S3 solver schedules for diffusion models")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("baseline", help="write a baseline solver as a schedule JSON")
    b.add_argument("name", choices=sorted(BASELINES))
    b.add_argument("--nfe", type=int, required=True)
    b.add_argument("--order", type=int)
    b.add_argument("--discretization", choices=DISCRETIZATIONS, default="logsnr_uniform")
    b.add_argument("--noise-schedule", default="vp_linear")
    b.add_argument("--t-end", type=float)
    b.add_argument("--afs", choices=("none", "zero_x0", "mean_x0"), default="none")
    b.add_argument("--prediction", choices=("noise", "data"))
    b.add_argument("--lower-order-final", action="store_true")
    b.add_argument("--out", default="-", help="output file (default: stdout)")
    b.set_defaults(fn=cmd_baseline)

    sc = sub.add_parser("schedule", help="validate, show or import schedules").add_subparsers(dest="sub", required=True)
    v = sc.add_parser("validate", help="exit 0 if FILE is a valid schedule, else 2 with the reason")
    v.add_argument("file")
    v.set_defaults(fn=cmd_validate)
    s = sc.add_parser("show", help="per-step table of a schedule")
    s.add_argument("file")
    s.add_argument("--noise-schedule", help="override the schedule's noise schedule for lambda")
    s.set_defaults(fn=cmd_show)
    i = sc.add_parser("import-usf", help="import a schedule of the public USF release")
    i.add_argument("source", help="release key (e.g. score_sde/cifar10_sde_nfe9) or a JSON file")
    i.add_argument("--noise-schedule", help="required for a file: edm, vp_linear, vp_discrete, ...")
    i.add_argument("--out", default="-")
    i.set_defaults(fn=cmd_import_usf)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ScheduleError, UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
