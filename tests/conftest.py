"""Shared fixtures: one real local Ray for the whole suite, the committed CIFAR-10 sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "data" / "cifar10-sample"

# Keep Ray quiet and local in tests: no usage stats, no dashboard.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray started once for the suite (starting Ray costs seconds), the way the
    commands start theirs (``start_local_ray``: loopback only, a private token file)."""
    import ray

    from pipelines.cluster.session import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
