"""Shared test harness: one real local Ray cluster per test session, Serve on a free loopback
port, a tiny random-weight chat model built locally, and a helper to deploy a platform."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest

# Nothing in the suite may reach the internet for weights or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The stand-in provider's API key. Replicas read provider keys from their environment, which
# they inherit from the cluster's runtime env (set before any replica starts).
PROVIDER_KEY = "sk-test-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(metrics_port):
    """A local Ray cluster shared by the whole session (started on first use)."""
    import ray

    if not ray.is_initialized():
        # More logical CPUs than cores: test replicas mostly wait on each other.
        ray.init(
            num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                      "TOKENIZERS_PARALLELISM": "false",
                                      "ORFEAS_TEST_PROVIDER_KEY": PROVIDER_KEY}},
        )
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """Serve's HTTP proxy for the session, on a free loopback port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from models.tiny import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat")


@contextmanager
def deployed(settings):
    """Deploy the settings' applications on the session cluster; remove them afterwards."""
    from ray import serve

    from cluster.deploy import deploy, wait_running

    names = deploy(settings)
    try:
        states = wait_running(names, timeout_s=300)
        assert all(s == "RUNNING" for s in states.values()), states
        yield names
    finally:
        for name in names:
            serve.delete(name)


def make_key(settings, role: str = "admin", models: list[str] | None = None, name: str = "") -> tuple[dict, str]:
    import ray

    from cluster.keys import keystore

    return ray.get(keystore(settings.resolved_data_dir()).create.remote(role, models, name))
