"""Erasure of a data subject (GDPR art. 17): their chunks removed from every collection and
their data key crypto-shredded, so any copy of their ciphertext left behind (a segment Qdrant
has not compacted yet, a backup, a snapshot) can never be decrypted. Audited.

A subject's chunks are those tagged `<encryption.subject_tag_prefix><id>` (default
`subject:<id>`), which ingest encrypts under the subject's own data key. Their conversation
threads (`/v1/threads`, rag/threads.py) go too, and in other people's threads the turns whose
answers cited their documents: those are encrypted under the store's key, not the subject's,
so shredding alone would leave them readable.
"""

from __future__ import annotations

from typing import Any

from config import Settings
from security.keyring import check_scope
from security.encryption import subject_scope


def erase_subject(settings: Settings, subject: str, *, actor: str = "", audit: bool = True,
                  key_ids: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The subject's chunks, threads (made with `key_ids`, their API keys, or for user `subject`)
    and data key (`audit` False: the caller audits the whole erasure, agents/privacy.py, which
    also removes their ledger details and workflow runs)."""
    import ray

    from rag.store import open_store
    from rag.threads import call_sync
    from security.audit import audit_event
    from security.encryption import forget_ciphers
    from security.keyring import key_service

    scope = check_scope(subject_scope(subject))
    tag = settings.encryption.subject_tag_prefix + subject
    store = open_store(settings)
    removed: dict[str, int] = {}
    erased: set[str] = set()
    for c in store.list_collections():
        docs = sorted({p["doc_id"] for p in store.scroll_payloads(c, ["doc_id", "tags"]) if tag in (p.get("tags") or [])})
        if docs:
            store.delete_docs(c, docs)
            store.flush(c)
            removed[c] = len(docs)
            erased.update(docs)
    threads = call_sync(settings, "erase_subject", subject, list(key_ids), sorted(erased))
    shred = ray.get(key_service(settings).call.remote("shred", scope)) if settings.encryption.enabled else {"keys": []}
    forget_ciphers()
    out = {"subject": subject, "documents": removed, "threads": threads, "shredded_keys": shred["keys"]}
    if audit:
        audit_event(settings, "privacy.erase", out, actor=actor, target=scope, wait=True)
    return out
