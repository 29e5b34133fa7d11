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
def deployed(settings, autoscaling: bool = False):
    """Deploy the settings' applications on the session cluster; remove them afterwards.

    Fixed replica counts unless `autoscaling`: left on, the policy scaled test models (a broken one
    too) to 2-4 replicas in the suite's bursts, each start 10-70 s of the two cores, and a chaos
    kill met a replica the policy had just added. tests/test_scaling_live.py runs the policy live.
    The settings object is changed in place, so a redeploy of it (a restart) keeps the counts."""
    from ray import serve

    from cluster.deploy import deploy, wait_running

    settings.autoscaling.enabled = autoscaling
    names = deploy(settings)
    try:
        states = wait_running(names, timeout_s=300)
        assert all(s == "RUNNING" for s in states.values()), states
        yield names
    finally:
        for name in names:
            serve.delete(name)


def orfeas_actors() -> set[str]:
    """The names of the live named actors in ORFEAS's namespace."""
    import ray

    from config.names import ACTOR_NAMESPACE

    if not ray.is_initialized():
        return set()
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ACTOR_NAMESPACE}


def release_actors(names: set[str]) -> None:
    """Kill these ORFEAS actors for good (those already gone are skipped)."""
    import ray

    from config.names import ACTOR_NAMESPACE

    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=ACTOR_NAMESPACE), no_restart=True)
        except ValueError:  # gone already
            pass


def make_key(settings, role: str = "admin", models: list[str] | None = None, name: str = "") -> tuple[dict, str]:
    import ray

    from security.keys import keystore

    return ray.get(keystore(settings.resolved_data_dir()).create.remote(role, models, name))


def platform_settings(data_dir, serve_port: int, **fields):
    """Settings of a test platform on the session's Serve port: keys looked up on every request,
    the RAG and agents apps off unless `fields` turn them on; a section in `fields` is merged into
    these defaults."""
    from config import Settings

    base = {"data_dir": data_dir, "serve": {"host": "127.0.0.1", "port": serve_port}, "auth": {"key_cache_s": 0},
            "rag": {"enabled": False}, "agents": {"enabled": False}}
    for name, value in fields.items():
        base[name] = {**base[name], **value} if isinstance(base.get(name), dict) and isinstance(value, dict) else value
    return Settings(**base)


def remote_model(provider, model_id: str, source: str, **kw):
    """A catalog entry for the stand-in provider (tests/provider_server.py) serving `source`."""
    from config import ModelSpec

    return ModelSpec(id=model_id, engine="openai", base_url=provider.base_url, source=source,
                     api_key_env="ORFEAS_TEST_PROVIDER_KEY", **kw)
