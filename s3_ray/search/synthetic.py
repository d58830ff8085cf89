"""Synthetic trials (a benchmark tool, ``synthetic:`` in a search space): the trial scores its
schedule on the cheap ``gmm`` model, then sleeps until a drawn duration has passed. The duration
depends only on the trial key and the search seed, so a simulation (``simulate.py``) and a real
Ray run of the same search see the same trial lengths."""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np

from s3_ray.config import SyntheticConfig


def trial_duration(cfg: SyntheticConfig, trial_key: str, seed: int) -> float:
    """Seconds trial ``trial_key`` lasts: lognormal(median, sigma), times ``straggler_factor``
    with probability ``straggler_prob``."""
    digest = hashlib.sha256(f"{seed}:{trial_key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    d = cfg.median_s * math.exp(cfg.sigma * rng.standard_normal())
    return d * cfg.straggler_factor if rng.random() < cfg.straggler_prob else d


def pad_to_duration(cfg: SyntheticConfig, trial_key: str, seed: int, started_at: float) -> None:
    """Sleep until ``trial_duration`` has passed since ``started_at`` (``time.time()``)."""
    left = started_at + trial_duration(cfg, trial_key, seed) - time.time()
    if left > 0:
        time.sleep(left)
