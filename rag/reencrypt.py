"""Data-key rotation for a collection: a new data key, every chunk's encrypted fields rewritten
under it, then the old key destroyed (the library behind `jobs.reencrypt` and
`orfeas encryption rotate-data-key`).

Online: queries keep working throughout (a chunk decrypts under the old or the new key, both
live until the end). Writers cache a scope's current key for `encryption.key_cache_s`, so the
pass starts only after that long; a final pass checks that no chunk still names the old key
before it is destroyed (else it is kept, retired, and the result says so). Chunks under a data
subject's own key are left as they are: that key is rotated or shredded on its own.
"""

from __future__ import annotations

import time
from typing import Any

from config import Settings
from rag.encrypted_store import ENCRYPTED_FIELDS, EncryptedStore, chunk_record_id
from rag.versions import parse_physical
from security.crypto import is_token, token_key_id
from security.encryption import collection_scope, subject_of

PAGE = 512


def _collections(store, name: str) -> list[str]:
    return [c for c in store.list_collections() if c == name or (parse_physical(c) or ("",))[0] == name]


def _pass(store: EncryptedStore, physical: str, old: str, rewrite: bool) -> int:
    """Chunks of `physical` still under key `old` (rewritten under the current key when `rewrite`)."""
    cipher, inner = store.cipher, store.inner
    scope = collection_scope(store_logical(physical))
    fields = list(ENCRYPTED_FIELDS) + ["doc_id", "chunk_index", "tags"]
    found, offset = 0, None
    while True:
        points, offset = inner.scroll_point_payloads(physical, fields, offset, PAGE)
        updates = []
        for p in points:
            pl = p["payload"]
            if subject_of(pl.get("tags"), store.subject_prefix):
                continue
            stale = {f: pl[f] for f in ENCRYPTED_FIELDS if is_token(pl.get(f)) and token_key_id(pl[f]) == old}
            if not stale:
                continue
            found += 1
            if rewrite:
                rid = chunk_record_id(pl)
                updates.append({"id": p["id"], "payload": {f: cipher.reencrypt(v, scope=scope, record_id=rid, field=f)
                                                           for f, v in stale.items()}})
        if updates:
            inner.set_payloads(physical, updates)
        if offset is None or not points:
            return found


def store_logical(physical: str) -> str:
    p = parse_physical(physical)
    return p[0] if p else physical


def reencrypt_collection(settings: Settings, collection: str, *, actor: str = "job") -> dict[str, Any]:
    import ray

    from rag.store import open_store
    from security.audit import audit_event
    from security.keyring import key_service

    store = open_store(settings)
    if not isinstance(store, EncryptedStore):
        raise ValueError("encryption is off (encryption.enabled): there is no data key to rotate")
    targets = _collections(store, collection)
    if not targets:
        raise ValueError(f"collection {collection!r} does not exist")
    svc = key_service(settings)
    rot = ray.get(svc.call.remote("rotate_data_key", collection_scope(collection)))
    old = rot["retired"]
    store.cipher.keys.forget()  # this process now encrypts under the new key
    time.sleep(settings.encryption.key_cache_s)  # every other writer has dropped the old one by now
    t0 = time.perf_counter()
    moved = sum(_pass(store, c, old, True) for c in targets) if old else 0
    left = sum(_pass(store, c, old, False) for c in targets) if old else 0
    destroyed = False
    if old and left == 0:
        ray.get(svc.call.remote("destroy", old))
        destroyed = True
    out = {"collection": collection, "key_id": rot["key_id"], "retired": old, "points": moved, "left": left,
           "destroyed": destroyed, "versions": targets, "seconds": round(time.perf_counter() - t0, 2)}
    audit_event(settings, "key.reencrypt", out, actor=actor, target=collection_scope(collection), wait=True)
    return out
