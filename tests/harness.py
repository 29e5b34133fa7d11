"""Plain helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
from contextlib import contextmanager

# The stand-in provider's API key. Replicas read provider keys from their environment, which
# they inherit from the cluster's runtime env (set before any replica starts).
PROVIDER_KEY = "sk-test-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    from security.keys import keystore

    return ray.get(keystore(settings.resolved_data_dir()).create.remote(role, models, name))
