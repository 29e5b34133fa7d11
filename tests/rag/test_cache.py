"""The exact RAG answer cache (rag.cache): TTL, LRU, keys that never cross tenants, versions,
models or requests, and collection versions read from a real Qdrant Edge store."""

from __future__ import annotations

from rag.cache import AnswerCache, cache_key, collection_version, tenant_of
from rag.store import EdgeStore


def test_entries_expire_after_the_ttl_and_the_least_recently_used_go_first():
    now = [100.0]
    cache = AnswerCache(ttl_s=10, max_entries=2, clock=lambda: now[0])
    cache.put("a", {"answer": 1})
    cache.put("b", {"answer": 2})
    assert cache.get("a") == {"answer": 1}  # a is now the most recently used
    cache.put("c", {"answer": 3})
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and len(cache) == 2
    now[0] = 109.9
    assert cache.get("a") == {"answer": 1}
    now[0] = 110.0
    assert cache.get("a") is None and len(cache) == 1


def test_keys_separate_tenants_versions_models_and_requests_but_not_key_order():
    base = cache_key(tenant_of("", "k1"), "docs__v1:10", "m", {"query": "q", "top_k": 3})
    assert base == cache_key("key:k1", "docs__v1:10", "m", {"top_k": 3, "query": "q"})
    others = [cache_key(tenant_of("", "k2"), "docs__v1:10", "m", {"query": "q", "top_k": 3}),
              cache_key(tenant_of("k1", "k1"), "docs__v1:10", "m", {"query": "q", "top_k": 3}),  # team k1 ≠ key k1
              cache_key("key:k1", "docs__v2:10", "m", {"query": "q", "top_k": 3}),
              cache_key("key:k1", "docs__v1:11", "m", {"query": "q", "top_k": 3}),
              cache_key("key:k1", "docs__v1:10", None, {"query": "q", "top_k": 3}),
              cache_key("key:k1", "docs__v1:10", "m", {"query": "q", "top_k": 4})]
    assert len({base, *others}) == 7


def test_the_collection_version_changes_with_an_ingest_and_an_alias_flip(tmp_path):
    store = EdgeStore(tmp_path / "edge")
    try:
        def point(i):
            return {"id": f"00000000-0000-0000-0000-00000000000{i}", "dense": [1.0, 0.0, 0.0, 0.0],
                    "sparse_indices": [1], "sparse_values": [1.0], "payload": {"text": str(i)}}

        store.create_collection("kb__v1", 4)
        store.upsert("kb__v1", [point(1)])
        store.set_alias("kb", "kb__v1")
        v1 = collection_version(store, "kb")
        assert v1 == "kb__v1:1" and collection_version(store, "kb") == v1
        store.upsert("kb__v1", [point(2)])
        v1b = collection_version(store, "kb")
        store.create_collection("kb__v2", 4)
        store.upsert("kb__v2", [point(1), point(2)])
        store.set_alias("kb", "kb__v2")
        assert len({v1, v1b, collection_version(store, "kb")}) == 3
    finally:
        store.close()
