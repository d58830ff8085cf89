import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_search(tmp_path_factory):
    """One small real search on a pseudo-terminal, shared by the progress and browser tests."""
    from tests.search_helpers import small_search_in_pty

    return small_search_in_pty(tmp_path_factory.mktemp("small-search"))


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory):
    """A saved DDPMPipeline folder with random weights (tests/tiny_pipelines.py)."""
    from tests.tiny_pipelines import build_ddpm

    return build_ddpm(tmp_path_factory.mktemp("pipelines") / "ddpm")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A saved StableDiffusionPipeline folder with random weights (tests/tiny_pipelines.py)."""
    from tests.tiny_pipelines import build_sd

    return build_sd(tmp_path_factory.mktemp("pipelines") / "sd")


@pytest.fixture(scope="session")
def tiny_flow(tmp_path_factory):
    """A saved DDPMPipeline folder with a FlowMatchEulerDiscreteScheduler (tests/tiny_pipelines.py)."""
    from tests.tiny_pipelines import build_flow

    return build_flow(tmp_path_factory.mktemp("pipelines") / "flow")
