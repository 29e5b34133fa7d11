"""Session fixtures: one real local Ray cluster per test session, Serve on a free loopback port,
and a tiny random-weight chat model built locally. Plain helpers are in harness.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness import PROVIDER_KEY, free_port

# Nothing in the suite may reach the internet for weights or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Serve's controller gives a new proxy 5 s to answer its readiness check, three times, then kills it
# and starts another: with both test workers starting their clusters at once on two cores, the
# first proxy of one missed it and serve.start failed the session (CI, 2 December 15:38). The
# cluster's processes inherit this from the driver that starts it.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")


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
            address="local",  # a fresh instance, never a running `orfeas up` head
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


@pytest.fixture(scope="module", autouse=True)
def release_module_actors():
    """Kill the detached ORFEAS actors a module created (key store, audit log, store owner, ...,
    one set per data dir) once it ends: left alive, each idle worker held ~0.5 GB and a share of
    the 2 cores for the rest of the session. A test package's shared platform releases its own
    at the package's end (tests/shared_platform/conftest.py overrides this fixture)."""
    from harness import orfeas_actors, release_actors

    before = orfeas_actors()
    yield
    release_actors(orfeas_actors() - before)


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """Serve's HTTP proxy for the session, on a free loopback port."""
    import httpx
    import ray
    from ray import serve

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except (ray.exceptions.ActorDiedError, TimeoutError):
        # The controller killed a proxy that was slow to start (or it is still starting) and
        # starts another itself: wait for it instead of failing every test of this worker.
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Serve's HTTP proxy did not come back within 120 s"
            time.sleep(1)
    return port


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from models.tiny import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture(scope="module")
def provider():
    """A stand-in OpenAI-compatible provider on loopback for the module (tests/provider_server.py)."""
    from provider_server import ProviderServer

    server = ProviderServer(free_port()).start()
    yield server
    server.stop()


CLUSTER_FIXTURES = {"ray_cluster", "serve_port"}


def pytest_collection_modifyitems(config, items):
    """Files that use the Ray cluster (or are marked slow) run first, the short unit files last:
    `make test`'s two workers take a file at a time, and the many short files even out the end."""
    heavy = {item.path for item in items
             if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in heavy)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, except that a test package (a directory with `__init__.py`) is one unit of
    work: its files share package-scoped fixtures (tests/shared_platform/), so one worker runs
    them all and deploys their platform once."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class PackageScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            package = (config.rootpath / path).parent
            return str(package.relative_to(config.rootpath)) if (package / "__init__.py").exists() else path

    return PackageScheduling(config, log)
