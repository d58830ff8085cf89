"""Reproducible training of the shipped digits networks (one CPU thread, fixed seeds).

    python -m s3_ray.models.train diffusion --out DIR [--steps N]
    python -m s3_ray.models.train diffusion_cfg --out DIR [--steps N]
    python -m s3_ray.models.train classifier --out DIR [--steps N]

Writes ``DIR/digits_unet.safetensors`` / ``DIR/digits_cfg_unet.safetensors`` (class-conditional,
for classifier-free guidance) / ``DIR/digits_classifier.safetensors`` and a metadata JSON beside
each. The shipped files in ``s3_ray/assets`` were made with the defaults.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from s3_ray.models.digits import (
    CFG_UNET_ARCH,
    CLASSIFIER_ARCH,
    UNET_ARCH,
    DigitsClassifier,
    DigitsUNet,
    load_digits_data,
    n_params,
    save_weights,
)
from s3_ray.progress import Progress

T_MIN = 1e-3  # training times t ~ U(T_MIN, 1)
CFG_STEPS = 5000  # the class-conditional UNet's default training length


def _lr_lambda(steps: int, warmup: int):
    def f(i):
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    return f


def _check_steps(steps: int) -> None:
    if steps < 1:  # zero steps would save the untrained initial weights
        raise ValueError(f"steps: must be at least 1, got {steps}")


def _env() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}


def _vp_coeffs(schedule, t: torch.Tensor):
    la = torch.from_numpy(np.asarray(schedule.log_alpha(t.double().numpy()))).float()
    return la.exp()[:, None, None, None], torch.from_numpy(schedule.sigma(t.double().numpy())).float()[
        :, None, None, None
    ]


@torch.no_grad()
def eps_loss(net, x0: torch.Tensor, schedule, seed: int = 1, reps: int = 4, y: torch.Tensor | None = None) -> float:
    """Mean ε-MSE of ``net`` on ``x0`` with a fixed-seed draw of (t, ε), ``reps`` draws per image
    (``y``: the images' labels, for a class-conditional net)."""
    g = torch.Generator().manual_seed(seed)
    tot = 0.0
    for _ in range(reps):
        t = T_MIN + (1 - T_MIN) * torch.rand(len(x0), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a, s = _vp_coeffs(schedule, t)
        tot += F.mse_loss(net(a * x0 + s * eps, t, *(() if y is None else (y,))), eps).item()
    return tot / reps


def train_diffusion(out_dir, steps: int = 11000, batch: int = 128, seed: int = 0, lr: float = 2e-3,
                    ema_decay: float = 0.999, warmup: int = 200, log_every: int = 100,
                    label_dropout: float | None = None) -> dict:
    """Train the ε-prediction UNet on the digits train split (VP linear schedule); save the EMA
    weights to ``out_dir/digits_unet.safetensors`` (+ ``.json``) and return the metadata.

    ``label_dropout`` (e.g. 0.1): train the class-conditional UNet instead, each label replaced by
    the "no label" entry with that probability so one network has both branches classifier-free
    guidance needs; saved as ``digits_cfg_unet.safetensors``."""
    from s3_ray.usf.noise import VPLinear

    _check_steps(steps)
    conditional = label_dropout is not None
    if conditional and not 0.0 < label_dropout < 1.0:
        raise ValueError(f"label_dropout: must be in (0, 1), got {label_dropout}")
    arch = CFG_UNET_ARCH if conditional else UNET_ARCH
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    (x_tr, y_tr), (x_ho, y_ho), sha = load_digits_data()
    x_tr, x_ho, y_tr, y_ho = map(torch.from_numpy, (x_tr, x_ho, y_tr, y_ho))
    schedule = VPLinear()
    net = DigitsUNet(**arch)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    t0, run = time.time(), []
    progress = Progress(steps, "train diffusion", "steps")  # the loss: mean of the last log_every steps
    for i in range(steps):
        idx = torch.randint(len(x_tr), (batch,), generator=g)
        x0 = x_tr[idx]
        t = T_MIN + (1 - T_MIN) * torch.rand(batch, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a, s = _vp_coeffs(schedule, t)
        if conditional:
            y = torch.where(torch.rand(batch, generator=g) < label_dropout, arch["n_classes"], y_tr[idx])
            loss = F.mse_loss(net(a * x0 + s * eps, t, y), eps)
        else:
            loss = F.mse_loss(net(a * x0 + s * eps, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - ema_decay)
        run.append(loss.item())
        shown = log_every and (i + 1) % log_every == 0
        progress.update(1, f"loss {np.mean(run[-log_every:]):.4f}" if shown else None)
    progress.close()
    ema.eval()
    losses = {"train_last500_mean": float(np.mean(run[-500:])),
              "ema_train_eps_mse": eps_loss(ema, x_tr, schedule),
              "ema_heldout_eps_mse": eps_loss(ema, x_ho, schedule)}
    if conditional:  # the above is the unconditional branch
        losses |= {"ema_train_eps_mse_conditional": eps_loss(ema, x_tr, schedule, y=y_tr),
                   "ema_heldout_eps_mse_conditional": eps_loss(ema, x_ho, schedule, y=y_ho)}
    meta = {
        "arch": arch,
        "noise_schedule": schedule.spec(),
        "prediction": "eps",
        "time_input": "continuous t in (0, 1]; the network embeds time_scale * t",
        "data": {"name": "sklearn_digits", "sha256": sha, "split": "default_rng(0).permutation, first 397 held out",
                 "n_train": len(x_tr), "range": [-1.0, 1.0]},
        "training": {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "optimizer": "AdamW(wd=0)",
                     "lr_schedule": f"linear warmup {warmup} + cosine", "ema_decay": ema_decay,
                     "t_sampling": f"U({T_MIN}, 1)", "grad_clip": 1.0, "seconds": round(time.time() - t0, 1),
                     **({"label_dropout": label_dropout} if conditional else {}), **_env()},
        "final_losses": losses,
        "n_params": n_params(ema),
    }
    name = "digits_cfg_unet" if conditional else "digits_unet"
    save_weights(ema, Path(out_dir) / f"{name}.safetensors", meta)
    return meta


@torch.no_grad()
def accuracy(net, x: torch.Tensor, y: torch.Tensor) -> float:
    return (net(x).argmax(1) == y).float().mean().item()


def train_classifier(out_dir, steps: int = 3000, batch: int = 128, seed: int = 0, lr: float = 2e-3,
                     weight_decay: float = 1e-2) -> dict:
    """Train the digits classifier (FID feature extractor) on the train split; save it to
    ``out_dir/digits_classifier.safetensors`` (+ ``.json`` with the held-out accuracy)."""
    _check_steps(steps)
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    (x_tr, y_tr), (x_ho, y_ho), sha = load_digits_data()
    x_tr, y_tr, x_ho, y_ho = map(torch.from_numpy, (x_tr, y_tr, x_ho, y_ho))
    net = DigitsClassifier(**CLASSIFIER_ARCH)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, 100))
    t0 = time.time()
    progress = Progress(steps, "train classifier", "steps")
    for i in range(steps):
        idx = torch.randint(len(x_tr), (batch,), generator=g)
        loss = F.cross_entropy(net(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.update(1, f"loss {loss.item():.4f}" if (i + 1) % 100 == 0 else None)
    progress.close()
    net.eval()
    with torch.no_grad():
        net.feat_scale.fill_(net.embed(x_tr).pow(2).mean().sqrt().item())
    meta = {
        "arch": CLASSIFIER_ARCH,
        "feature_layer": f"penultimate ReLU(fc) / feat_scale, {CLASSIFIER_ARCH['feat_dim']}-d",
        "feat_scale": net.feat_scale.item(),
        "input": "1x8x8 in [-1, 1] (uint8 u -> u / 127.5 - 1)",
        "data": {"name": "sklearn_digits", "sha256": sha, "n_train": len(x_tr), "n_heldout": len(x_ho)},
        "training": {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "weight_decay": weight_decay,
                     "seconds": round(time.time() - t0, 1), **_env()},
        "train_accuracy": accuracy(net, x_tr, y_tr),
        "heldout_accuracy": accuracy(net, x_ho, y_ho),
        "final_loss": F.cross_entropy(net(x_tr), y_tr).item(),
        "n_params": n_params(net),
    }
    save_weights(net, Path(out_dir) / "digits_classifier.safetensors", meta)
    return meta


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m s3_ray.models.train", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["diffusion", "diffusion_cfg", "classifier"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--batch", type=_positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    fn = train_classifier if a.what == "classifier" else train_diffusion
    kw = {"batch": a.batch, "seed": a.seed} | ({"steps": a.steps} if a.steps is not None else {})
    if a.what == "diffusion_cfg":
        kw = {"steps": CFG_STEPS, "label_dropout": 0.1} | kw
    meta = fn(a.out, **kw)
    keys = ("heldout_accuracy", "n_params") if a.what == "classifier" else ("final_losses", "n_params")
    print({k: meta[k] for k in keys})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
