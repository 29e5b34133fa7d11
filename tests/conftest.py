"""Shared test harness: one real local Ray cluster per test session."""

from __future__ import annotations

import os

import pytest

# Nothing in the suite may reach the internet for weights or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the whole session (started on first use)."""
    import ray

    if not ray.is_initialized():
        # More logical CPUs than cores: replicas mostly wait on I/O or each other in tests.
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
