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
