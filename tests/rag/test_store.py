"""One suite, every backend: Qdrant Edge in-process, Qdrant Edge through its owner actor, and
qdrant-client (":memory:" local mode, the same client API as a server)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from rag.chunking import point_id
from rag.errors import CollectionNotFound
from rag.fusion import fuse_by_document
from rag.store import EdgeStore, PayloadFilter, QdrantServerStore, RemoteStore, SearchSpec, edge_store_actor

TEXTS = {
    "ray": "Ray Serve deploys models as replicas and autoscales them with request load.",
    "qdrant": "Qdrant stores dense and sparse vectors and fuses them in hybrid queries.",
    "paris": "Paris is the capital of France and sits on the river Seine.",
    "berlin": "Berlin is the capital of Germany; the Spree flows through it.",
    "cats": "Cats sleep most of the day and hunt small birds at dusk.",
    "pasta": "Boil the pasta in salted water for nine minutes, then drain it.",
}
DATES = {"ray": "2024-01-10T00:00:00Z", "qdrant": "2024-03-01T00:00:00Z", "paris": "2023-06-01T00:00:00Z",
         "berlin": "2023-07-01T00:00:00Z", "cats": "2022-01-01T00:00:00Z", "pasta": "2021-01-01T00:00:00Z"}


@pytest.fixture(params=["edge", "edge-actor", "qdrant-memory"])
def store(request, tmp_path, settings):
    if request.param == "edge":
        s = EdgeStore(tmp_path / "edge")
        yield s
        s.close()
    elif request.param == "edge-actor":
        request.getfixturevalue("ray_cluster")
        yield RemoteStore(edge_store_actor(settings))
    else:
        yield QdrantServerStore(":memory:")


@pytest.fixture(scope="module")
def points(dense, sparse):
    names = list(TEXTS)
    dv = dense.embed([TEXTS[n] for n in names])
    sv = sparse.embed_documents([TEXTS[n] for n in names])
    out = []
    for i, n in enumerate(names):
        out.append({"id": point_id(n, 0), "dense": dv[i].tolist(), "sparse_indices": sv[i].indices,
                    "sparse_values": sv[i].values,
                    "payload": {"doc_id": n, "doc_hash": "h1", "n_chunks": 1, "chunk_index": 0, "source": f"{n}.txt",
                                "root": "/r", "text": TEXTS[n], "tags": ["geo"] if n in ("paris", "berlin") else ["tech"],
                                "date": DATES[n]}})
    return out


def _spec(dense, sparse, query, **kw):
    return SearchSpec(dense=dense.embed([query])[0].tolist(), sparse=sparse.embed_query(query), **kw)


def test_collections_upsert_idempotent_and_count(store, points):
    store.create_collection("c1", 384)
    store.create_collection("c1", 384)  # again: no-op
    assert "c1" in store.list_collections()
    assert store.upsert("c1", points) == len(points)
    store.upsert("c1", points)  # same ids: no duplicates
    assert store.count("c1") == len(points)
    assert store.count("c1", PayloadFilter(tags=["geo"])) == 2
    states = store.doc_states("c1")
    assert states["paris"]["count"] == 1 and states["paris"]["hashes"] == {"h1"}
    store.drop_collection("c1")
    assert "c1" not in store.list_collections()


def test_delete_stale_and_docs(store, points):
    store.create_collection("c2", 384)
    store.upsert("c2", points)
    newer = dict(points[0], id=point_id("ray", 1))
    newer["payload"] = dict(points[0]["payload"], doc_hash="h2", chunk_index=1)
    store.upsert("c2", [newer])
    store.delete_stale("c2", "ray", "h2")
    assert store.doc_states("c2")["ray"]["hashes"] == {"h2"}
    store.delete_docs("c2", ["cats", "pasta"])
    assert store.count("c2") == len(points) - 2
    assert {p["doc_id"] for p in store.scroll_payloads("c2", ["doc_id"])} == {"ray", "qdrant", "paris", "berlin"}


@pytest.mark.parametrize("mode,fusion", [("dense", "dbsf"), ("sparse", "dbsf"), ("hybrid", "rrf"), ("hybrid", "dbsf"),
                                         ("hybrid", "dbsf-doc")])
def test_search_modes_find_the_right_document(store, points, dense, sparse, mode, fusion):
    store.create_collection("c3", 384)
    store.upsert("c3", points)
    hits = store.search("c3", _spec(dense, sparse, "capital city of Germany", mode=mode, fusion=fusion, limit=3))
    assert hits[0].payload["doc_id"] == "berlin"
    assert len(hits) <= 3 and hits[0].score >= hits[-1].score


def test_document_fusion_fuses_each_lists_chunks_per_document(store, points, dense, sparse):
    """dbsf-doc: the store's answer is rag.fusion's over the store's own single-list searches,
    a document's chunks come together under its score, and filters and weights apply."""
    extra = "Germany's capital Berlin has a parliament, the Bundestag, in the Reichstag building."
    second = {"id": point_id("berlin", 1), "dense": dense.embed([extra])[0].tolist(),
              "sparse_indices": sparse.embed_documents([extra])[0].indices,
              "sparse_values": sparse.embed_documents([extra])[0].values,
              "payload": dict(points[3]["payload"], chunk_index=1, n_chunks=2, text=extra)}
    assert points[3]["payload"]["doc_id"] == "berlin"
    store.create_collection("c6", 384)
    store.upsert("c6", [*points, second])
    query = "capital of Germany parliament"

    def single(mode, **kw):
        hits = store.search("c6", _spec(dense, sparse, query, mode=mode, limit=10, **kw))
        return [(h.id, h.payload["doc_id"], h.score) for h in hits]

    for weights, flt in ((None, None), ([1.0, 0.0], None), ([0.5, 2.0], None), (None, PayloadFilter(tags=["tech"]))):
        expected = fuse_by_document([single("dense", filter=flt), single("sparse", filter=flt)],
                                    [1.0, 1.0] if weights is None else weights)
        hits = store.search("c6", _spec(dense, sparse, query, mode="hybrid", fusion="dbsf-doc", limit=10, prefetch=10,
                                        weights=weights, filter=flt))
        assert [h.id for h in hits] == [c.id for c in expected]
        assert [h.score for h in hits] == pytest.approx([c.score for c in expected])
        assert all("text" in h.payload for h in hits)
    hits = store.search("c6", _spec(dense, sparse, query, mode="hybrid", fusion="dbsf-doc", limit=10, prefetch=10))
    docs = [h.payload["doc_id"] for h in hits]
    assert docs[:2] == ["berlin", "berlin"] and hits[0].score == hits[1].score  # one document, one score
    assert all(docs.index(d) + docs.count(d) - 1 == len(docs) - 1 - docs[::-1].index(d) for d in docs)  # contiguous
    hits = store.search("c6", _spec(dense, sparse, query, mode="hybrid", fusion="dbsf-doc", limit=3, prefetch=10,
                                    filter=PayloadFilter(tags=["tech"]), payload_fields=["doc_id"], with_dense=True))
    assert len(hits) == 3 and {h.payload["doc_id"] for h in hits} <= {"ray", "qdrant", "cats", "pasta"}
    assert set(hits[0].payload) == {"doc_id"} and len(hits[0].dense) == 384


def test_windows_score_a_chunk_by_its_best_window(store, points, dense, sparse):
    """rag.dense_window_tokens: a chunk whose own vector misses the question but one of whose
    windows matches it comes first in the dense list when the query asks for windows; without
    them, or on a collection made without windows, the one vector per chunk ranks as before."""
    question = "Which river flows through Berlin?"
    hidden = dict(points[4], dense_windows=[points[4]["dense"], dense.embed(["The Spree river flows through Berlin."])[0].tolist()])
    assert hidden["payload"]["doc_id"] == "cats"
    rest = [dict(p, dense_windows=[p["dense"]]) for p in points if p["payload"]["doc_id"] != "cats"]
    store.create_collection("w1", 384, windows=True)
    assert "dense_windows" in store.dense_vectors("w1")
    store.upsert("w1", [*rest, hidden])
    def docs(mode, **kw):
        return [h.payload["doc_id"] for h in store.search("w1", _spec(dense, sparse, question, mode=mode, limit=6, **kw))]

    assert docs("dense", windows=True)[0] == "cats" and docs("dense")[0] == "berlin"
    assert docs("hybrid", windows=True).index("cats") < docs("hybrid").index("cats")  # BM25 still says Berlin
    store.create_collection("w2", 384)
    store.upsert("w2", points)
    assert "dense_windows" not in store.dense_vectors("w2")
    with_windows = store.search("w2", _spec(dense, sparse, question, mode="dense", limit=3, windows=True))
    assert [h.id for h in with_windows] == [h.id for h in store.search("w2", _spec(dense, sparse, question,
                                                                                   mode="dense", limit=3))]


def test_filters_source_tags_dates(store, points, dense, sparse):
    store.create_collection("c4", 384)
    store.upsert("c4", points)
    q = "capital city"
    hits = store.search("c4", _spec(dense, sparse, q, mode="dense", limit=10, filter=PayloadFilter(tags=["tech"])))
    assert {h.payload["doc_id"] for h in hits} == {"ray", "qdrant", "cats", "pasta"}
    hits = store.search("c4", _spec(dense, sparse, q, mode="hybrid", limit=10, filter=PayloadFilter(sources=["paris.txt"])))
    assert [h.payload["doc_id"] for h in hits] == ["paris"]
    flt = PayloadFilter(date_from=datetime(2023, 1, 1, tzinfo=timezone.utc), date_to=datetime(2023, 12, 31, tzinfo=timezone.utc))
    hits = store.search("c4", _spec(dense, sparse, q, mode="dense", limit=10, filter=flt))
    assert {h.payload["doc_id"] for h in hits} == {"paris", "berlin"}


def test_aliases_and_resolve(store, points):
    store.create_collection("docs__v1", 384)
    store.create_collection("docs__v2", 384)
    store.set_alias("docs", "docs__v1")
    assert store.resolve("docs") == "docs__v1"
    store.set_alias("docs", "docs__v2")
    assert store.list_aliases()["docs"] == "docs__v2" and store.resolve("docs") == "docs__v2"
    assert store.resolve("docs__v1") == "docs__v1"
    with pytest.raises(CollectionNotFound):
        store.resolve("nope")
    with pytest.raises(CollectionNotFound):
        store.set_alias("other", "missing")


def test_search_resolved_follows_the_alias_in_one_call(store, points, dense, sparse):
    store.create_collection("kb__v1", 384)
    store.create_collection("kb__v2", 384)
    store.upsert("kb__v2", points)
    spec = _spec(dense, sparse, "pasta", mode="hybrid", limit=3)
    store.set_alias("kb", "kb__v1")
    assert store.search_resolved("kb", spec) == ("kb__v1", [])
    store.set_alias("kb", "kb__v2")
    physical, hits = store.search_resolved("kb", spec)
    assert physical == "kb__v2" and [h.id for h in hits] == [h.id for h in store.search("kb__v2", spec)]
    assert hits and "pasta" in hits[0].payload["text"].lower()
    with pytest.raises(CollectionNotFound):
        store.search_resolved("nope", spec)


def test_vectors_returned_for_mmr(store, points, dense, sparse):
    store.create_collection("c5", 384)
    store.upsert("c5", points)
    hits = store.search("c5", _spec(dense, sparse, "pasta", mode="hybrid", limit=2, with_dense=True))
    assert hits and len(hits[0].dense) == 384
