"""The re-encryption pass of a data-key rotation on both store backends, in process (Qdrant
Edge and qdrant-client's local mode; the cluster path is in test_at_rest.py)."""

from __future__ import annotations

import uuid

import pytest

from rag.encrypted_store import ENCRYPTED_FIELDS, EncryptedStore
from rag.reencrypt import _pass
from rag.store import EdgeStore, QdrantServerStore
from security.crypto import FieldCipher, token_key_id
from security.keyproviders import LocalKeyProvider
from security.keyring import KeyRing


@pytest.mark.parametrize("backend", ["edge", "memory"])
def test_pass_moves_every_chunk_but_subject_ones_to_the_new_key(tmp_path, backend):
    ring = KeyRing(tmp_path / "dk.json", LocalKeyProvider(tmp_path / "kek.json"))
    inner = EdgeStore(tmp_path / "edge") if backend == "edge" else QdrantServerStore(":memory:")
    store = EncryptedStore(inner, FieldCipher(ring))
    store.create_collection("docs__v1", 4)
    store.upsert("docs__v1", [{
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"d{i}")), "dense": [0.1 * i + 0.1, 0.2, 0.3, 0.4],
        "sparse_indices": [1, 2], "sparse_values": [0.5, 0.5],
        "payload": {"doc_id": f"d{i}", "chunk_index": 0, "text": f"secret text {i}", "title": "T", "section": "",
                    "tags": ["subject:s1"] if i == 4 else [], "source": "s", "root": "r", "doc_hash": "h",
                    "n_chunks": 1}} for i in range(5)])
    old = ring.current("collection:docs")[0]
    new = ring.rotate_data_key("collection:docs")["key_id"]
    assert _pass(store, "docs__v1", old, False) == 4  # counted, not moved
    assert _pass(store, "docs__v1", old, True) == 4 and _pass(store, "docs__v1", old, False) == 0
    raw = inner.scroll_payloads("docs__v1", list(ENCRYPTED_FIELDS) + ["tags"])
    keys = {token_key_id(p["text"]) for p in raw if not p["tags"]}
    assert keys == {new} and {token_key_id(p["text"]) for p in raw if p["tags"]} == {ring.current("subject:s1")[0]}
    assert sorted(p["text"] for p in store.scroll_payloads("docs__v1", ["text"])) == [f"secret text {i}" for i in range(5)]
    if backend == "edge":
        inner.close()


def test_plaintext_chunks_are_refused_with_what_to_do_and_re_ingest_rewrites_them(tmp_path):
    """A collection ingested before encryption at rest was on: reading it is a clear
    `collection_unreadable` error (it was a bare 500 "internal error" in `make demo` on an old data
    directory), and the next ingest re-writes its documents instead of skipping them as unchanged."""
    from config import Settings
    from rag.errors import CollectionUnreadable
    from rag.ingest import index_hash, indexing_params
    from rag.store import SearchSpec

    inner = QdrantServerStore(":memory:")
    inner.create_collection("docs__v1", 4)
    inner.upsert("docs__v1", [{"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "d0")), "dense": [0.1, 0.2, 0.3, 0.4],
                               "sparse_indices": [1], "sparse_values": [1.0],
                               "payload": {"doc_id": "d0", "chunk_index": 0, "text": "old plaintext", "title": "T",
                                           "section": "", "source": "s", "root": "r", "doc_hash": "h"}}])
    store = EncryptedStore(inner, FieldCipher(KeyRing(tmp_path / "dk.json", LocalKeyProvider(tmp_path / "kek.json"))))
    with pytest.raises(CollectionUnreadable, match=r"'docs' holds chunks stored without encryption.*orfeas ingest") as e:
        store.search("docs__v1", SearchSpec(mode="dense", dense=[0.1, 0.2, 0.3, 0.4], limit=1))
    assert e.value.status == 500 and e.value.code == "collection_unreadable"
    plain, encrypted = Settings(encryption={"enabled": False}), Settings()
    assert index_hash("h", indexing_params(plain)) != index_hash("h", indexing_params(encrypted))
