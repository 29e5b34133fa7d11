"""The RAG answer caches (rag.cache): the exact cache's TTL, LRU and keys that never cross
tenants, versions, models or requests; the semantic cache's threshold, tenancy, TTL, LRU and
invalidation; and collection versions read from a real Qdrant Edge store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rag.cache import AnswerCache, SemanticCache, cache_key, collection_version, semantic_variant, tenant_of
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


def point(i, text=None):
    return {"id": f"00000000-0000-0000-0000-00000000000{i}", "dense": [1.0, 0.0, 0.0, 0.0],
            "sparse_indices": [1], "sparse_values": [1.0], "payload": {"text": text or str(i)}}


def test_the_collection_version_changes_with_an_ingest_and_an_alias_flip(tmp_path):
    store = EdgeStore(tmp_path / "edge")
    try:
        store.create_collection("kb__v1", 4)
        store.upsert("kb__v1", [point(1)])
        store.set_alias("kb", "kb__v1")
        v1 = collection_version(store, "kb")
        assert v1.startswith("kb__v1:") and collection_version(store, "kb") == v1  # reading changes nothing
        store.upsert("kb__v1", [point(2)])
        v1b = collection_version(store, "kb")
        store.create_collection("kb__v2", 4)
        store.upsert("kb__v2", [point(1), point(2)])
        store.set_alias("kb", "kb__v2")
        assert len({v1, v1b, collection_version(store, "kb")}) == 3
    finally:
        store.close()


def test_a_rewrite_that_keeps_the_point_count_is_a_new_version_and_so_is_a_restart(tmp_path):
    """The known risk of the count-based version: a re-ingest that rewrites chunks in place with
    the same count kept serving the old answer until its TTL."""
    store = EdgeStore(tmp_path / "edge")
    try:
        store.create_collection("kb__v1", 4)
        store.upsert("kb__v1", [point(1, "old text")])
        store.set_alias("kb", "kb__v1")
        before = collection_version(store, "kb")
        store.upsert("kb__v1", [point(1, "new text")])  # same id, same count, other content
        assert store.count("kb__v1") == 1
        rewritten = collection_version(store, "kb")
        assert rewritten != before
        store.delete_docs("kb__v1", ["no-such-doc"])  # a delete (even of nothing) is a write too
        assert collection_version(store, "kb") != rewritten
    finally:
        store.close()
    reopened = EdgeStore(tmp_path / "edge")  # a restarted owner: its counters start again, its id differs
    try:
        assert collection_version(reopened, "kb") not in (before, rewritten)
    finally:
        reopened.close()


def unit(angle: float) -> np.ndarray:
    """A unit vector at `angle` radians from (1, 0, 0, 0): cosine to it is cos(angle)."""
    return np.array([math.cos(angle), math.sin(angle), 0.0, 0.0], dtype=np.float32)


def test_a_similar_question_hits_from_the_threshold_up_and_the_closest_entry_wins():
    cache = SemanticCache(threshold=0.9, ttl_s=60, max_entries=10)
    cache.put("team:a", "kb", "v1", "x", unit(0.0), "answer-0")
    cache.put("team:a", "kb", "v1", "x", unit(0.8), "answer-0.8")
    value, sim = cache.get("team:a", "kb", "v1", "x", unit(0.1))
    assert value == "answer-0" and sim == pytest.approx(math.cos(0.1), abs=1e-5)
    assert cache.get("team:a", "kb", "v1", "x", unit(0.7))[0] == "answer-0.8"
    assert cache.get("team:a", "kb", "v1", "x", 3 * unit(0.0))[0] == "answer-0"  # scale does not matter
    below = math.acos(0.9) + 0.01  # just under the threshold from both entries' view: a miss
    far = SemanticCache(threshold=0.9, ttl_s=60, max_entries=10)
    far.put("team:a", "kb", "v1", "x", unit(0.0), "answer-0")
    assert far.get("team:a", "kb", "v1", "x", unit(below)) is None
    assert far.get("team:a", "kb", "v1", "x", unit(math.acos(0.9) - 0.01))[0] == "answer-0"


def test_semantic_entries_never_cross_tenants_collections_or_variants():
    cache = SemanticCache(threshold=0.9, ttl_s=60, max_entries=10)
    cache.put(tenant_of("t1", "k1"), "kb", "v1", "x", unit(0.0), "t1's")
    assert cache.get(tenant_of("t1", "k2"), "kb", "v1", "x", unit(0.0))[0] == "t1's"  # a team shares its answers
    assert cache.get(tenant_of("t2", "k1"), "kb", "v1", "x", unit(0.0)) is None
    assert cache.get(tenant_of("", "k1"), "kb", "v1", "x", unit(0.0)) is None  # key k1 alone is not team t1
    assert cache.get(tenant_of("t1", "k2", per="key"), "kb", "v1", "x", unit(0.0)) is None  # per: key
    assert cache.get(tenant_of("t1", "k1"), "other", "v1", "x", unit(0.0)) is None
    assert cache.get(tenant_of("t1", "k1"), "kb", "v1", "y", unit(0.0)) is None


def test_the_variant_holds_the_model_the_embedder_and_every_field_but_the_question():
    body = {"query": "q", "top_k": 3, "filters": None}
    base = semantic_variant("m", "minilm/fp32", body)
    assert base == semantic_variant("m", "minilm/fp32", {**body, "query": "another wording"})
    assert len({base, semantic_variant("m2", "minilm/fp32", body), semantic_variant(None, "minilm/fp32", body),
                semantic_variant("m", "minilm/int8", body),
                semantic_variant("m", "minilm/fp32", {**body, "top_k": 4})}) == 5


def test_semantic_entries_expire_and_a_new_collection_version_drops_the_old_ones():
    now = [0.0]
    cache = SemanticCache(threshold=0.9, ttl_s=10, max_entries=10, clock=lambda: now[0])
    cache.put("team:a", "kb", "v1", "x", unit(0.0), "a")
    cache.put("team:a", "kb", "v1", "y", unit(0.0), "a-other-model")
    cache.put("team:b", "kb", "v1", "x", unit(0.0), "b")
    now[0] = 9.9
    assert cache.get("team:a", "kb", "v1", "x", unit(0.0))[0] == "a"
    assert cache.get("team:a", "kb", "v2", "x", unit(0.0)) is None  # re-ingested: the old answers are gone
    assert cache.get("team:a", "kb", "v1", "x", unit(0.0)) is None and cache.get("team:a", "kb", "v1", "y", unit(0.0)) is None
    assert len(cache) == 1  # team b's entry waits for its own lookup (or the TTL, or the LRU)
    now[0] = 10.0
    assert cache.get("team:b", "kb", "v1", "x", unit(0.0)) is None and len(cache) == 0


def test_semantic_memory_is_bounded_least_recently_used_out_first():
    cache = SemanticCache(threshold=0.99, ttl_s=60, max_entries=3)
    for i in range(3):
        cache.put("team:a", "kb", "v1", "x", unit(i * 0.5), i)
    assert cache.get("team:a", "kb", "v1", "x", unit(0.0))[0] == 0  # 0 is now the most recently used
    cache.put("team:a", "kb", "v1", "x", unit(1.5), 3)  # evicts 1, the least recently used
    assert len(cache) == 3 and cache.get("team:a", "kb", "v1", "x", unit(0.5)) is None
    assert [cache.get("team:a", "kb", "v1", "x", unit(a))[0] for a in (0.0, 1.0, 1.5)] == [0, 2, 3]


@pytest.mark.parametrize("make, match", [
    (lambda: SemanticCache(threshold=0, ttl_s=1, max_entries=1), "threshold"),
    (lambda: SemanticCache(threshold=1.5, ttl_s=1, max_entries=1), "threshold"),
    (lambda: SemanticCache(0.9, 1, 1).put("t", "kb", "v", "x", np.zeros(4), 1), "non-zero"),
    (lambda: SemanticCache(0.9, 1, 1).get("t", "kb", "v", "x", [float("nan")] * 4), "finite"),
])
def test_bad_thresholds_and_vectors_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
