"""Erasure of a data subject (GDPR art. 17): their chunks removed from every collection and
their data key crypto-shredded, so any copy of their ciphertext left behind (a segment Qdrant
has not compacted yet, a backup, a snapshot) can never be decrypted. Audited.

A subject's chunks are those tagged `<encryption.subject_tag_prefix><id>` (default
`subject:<id>`), which ingest encrypts under the subject's own data key.
"""

from __future__ import annotations

from typing import Any

from config import Settings
from security.keyring import check_scope
from security.encryption import subject_scope


def erase_subject(settings: Settings, subject: str, *, actor: str = "", audit: bool = True) -> dict[str, Any]:
    """The subject's chunks and data key (`audit` False: the caller audits the whole erasure,
    agents/privacy.py, which also removes their ledger details and workflow runs)."""
    import ray

    from rag.store import open_store
    from security.audit import audit_event
    from security.encryption import forget_ciphers
    from security.keyring import key_service

    scope = check_scope(subject_scope(subject))
    tag = settings.encryption.subject_tag_prefix + subject
    store = open_store(settings)
    removed: dict[str, int] = {}
    for c in store.list_collections():
        docs = sorted({p["doc_id"] for p in store.scroll_payloads(c, ["doc_id", "tags"]) if tag in (p.get("tags") or [])})
        if docs:
            store.delete_docs(c, docs)
            store.flush(c)
            removed[c] = len(docs)
    shred = ray.get(key_service(settings).call.remote("shred", scope)) if settings.encryption.enabled else {"keys": []}
    forget_ciphers()
    out = {"subject": subject, "documents": removed, "shredded_keys": shred["keys"]}
    if audit:
        audit_event(settings, "privacy.erase", out, actor=actor, target=scope, wait=True)
    return out
