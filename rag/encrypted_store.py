"""A VectorStore that keeps chunk text encrypted at rest (around either backend).

The payload fields that hold user content (`ENCRYPTED_FIELDS`: text, title, section and the
knowledge graph's extraction) are
encrypted before they leave this process for the store (the Edge owner actor or a Qdrant
server) and decrypted only in the process that asked for them (the RAG replica answering an
authorised caller, the CLI). Vectors, BM25 terms and the filter fields (doc_id, source, tags,
date, hashes) stay plain so search and filtering work unchanged: the trade-off is in docs/security.md.

Each field's token is bound to the logical collection (its key scope, so all versions of a
collection share one key) and to the chunk (doc_id#chunk_index, which the point id derives
from), so a token moved to another chunk or collection fails to decrypt. A chunk tagged
`subject:<id>` (encryption.subject_tag_prefix) is encrypted under that data subject's own key,
which erasure crypto-shreds.
"""

from __future__ import annotations

from typing import Any

from rag.errors import CollectionUnreadable
from rag.store import Hit, PayloadFilter, SearchSpec, VectorStore
from rag.versions import parse_physical
from security.crypto import DecryptionFailed, FieldCipher, NotEncrypted
from security.encryption import collection_scope, subject_of, subject_scope

ENCRYPTED_FIELDS = ("text", "title", "section", "graph")  # graph: entity names are the text's words
_RECORD_FIELDS = ("doc_id", "chunk_index")


def logical_name(collection: str) -> str:
    p = parse_physical(collection)
    return p[0] if p else collection


def chunk_record_id(payload: dict[str, Any]) -> str:
    return f"{payload.get('doc_id', '')}#{payload.get('chunk_index', 0)}"


class EncryptedStore(VectorStore):
    def __init__(self, inner: VectorStore, cipher: FieldCipher, subject_prefix: str = "subject:"):
        self.inner, self.cipher, self.subject_prefix = inner, cipher, subject_prefix
        self.dim = inner.dim

    # --- the encrypted paths
    def encrypt_payload(self, collection: str, payload: dict[str, Any]) -> dict[str, Any]:
        subject = subject_of(payload.get("tags"), self.subject_prefix)
        return self.cipher.encrypt_fields(payload, ENCRYPTED_FIELDS, scope=collection_scope(logical_name(collection)),
                                          record_id=chunk_record_id(payload),
                                          key_scope=subject_scope(subject) if subject else None)

    def decrypt_payload(self, collection: str, payload: dict[str, Any]) -> dict[str, Any]:
        logical = logical_name(collection)
        try:
            return self.cipher.decrypt_fields(payload, ENCRYPTED_FIELDS, scope=collection_scope(logical),
                                              record_id=chunk_record_id(payload))
        except NotEncrypted as e:
            raise CollectionUnreadable(
                f"collection {logical!r} holds chunks stored without encryption (written before encryption "
                f"at rest was on): {e}. Ingest its sources again (`orfeas ingest SOURCE --collection {logical}` "
                "re-writes them encrypted), or set encryption.allow_plaintext_reads for a migration window"
            ) from None
        except DecryptionFailed as e:
            raise CollectionUnreadable(f"collection {logical!r} holds a chunk no data key here opens: {e}") from None

    def upsert(self, name: str, points: list[dict[str, Any]]) -> int:
        return self.inner.upsert(name, [{**p, "payload": self.encrypt_payload(name, p["payload"])} for p in points])

    def _with_record_fields(self, fields: list[str] | None) -> tuple[list[str] | None, list[str]]:
        """The fields to ask for (adding what the associated data needs) and those to drop after."""
        if not fields or not any(f in ENCRYPTED_FIELDS for f in fields):
            return fields, []
        extra = [f for f in _RECORD_FIELDS if f not in fields]
        return list(fields) + extra, extra

    def _decrypt_hits(self, name: str, hits: list[Hit], drop: list[str]) -> list[Hit]:
        out = []
        for h in hits:
            payload = self.decrypt_payload(name, h.payload)
            for f in drop:
                payload.pop(f, None)
            out.append(h.model_copy(update={"payload": payload}))
        return out

    def search(self, name: str, spec: SearchSpec) -> list[Hit]:
        fields, drop = self._with_record_fields(spec.payload_fields)
        hits = self.inner.search(name, spec.model_copy(update={"payload_fields": fields}))
        return self._decrypt_hits(name, hits, drop)

    def search_resolved(self, name: str, spec: SearchSpec) -> tuple[str, list[Hit]]:
        fields, drop = self._with_record_fields(spec.payload_fields)
        physical, hits = self.inner.search_resolved(name, spec.model_copy(update={"payload_fields": fields}))
        return physical, self._decrypt_hits(physical, hits, drop)

    def scroll_payloads(self, name: str, fields: list[str]) -> list[dict[str, Any]]:
        ask, drop = self._with_record_fields(list(fields))
        out = []
        for p in self.inner.scroll_payloads(name, ask):
            p = self.decrypt_payload(name, p)
            for f in drop:
                p.pop(f, None)
            out.append(p)
        return out

    # whole points for the edge sync (rag.sync): decrypted here, so the change feed's content
    # hashes are of the text (stable across re-encryption) and the edge gets what it can search
    def scroll_points(self, name, offset=None, limit=256, with_vectors=True):
        points, nxt = self.inner.scroll_points(name, offset, limit, with_vectors)
        return [{**p, "payload": self.decrypt_payload(name, p["payload"])} for p in points], nxt

    def retrieve_points(self, name, ids):
        return [{**p, "payload": self.decrypt_payload(name, p["payload"])} for p in self.inner.retrieve_points(name, ids)]

    # --- everything else as the inner store does it
    def create_collection(self, name: str, dim: int, second_dim: int | None = None, windows: bool = False) -> None:
        return self.inner.create_collection(name, dim, second_dim, windows=windows)
    def dense_vectors(self, name: str) -> list[str]: return self.inner.dense_vectors(name)
    def drop_collection(self, name: str) -> None: return self.inner.drop_collection(name)
    def list_collections(self) -> list[str]: return self.inner.list_collections()
    def count(self, name: str, flt: PayloadFilter | None = None) -> int: return self.inner.count(name, flt)
    def set_alias(self, alias: str, collection: str) -> None: return self.inner.set_alias(alias, collection)
    def list_aliases(self) -> dict[str, str]: return self.inner.list_aliases()
    def delete_docs(self, name: str, doc_ids: list[str]) -> None: return self.inner.delete_docs(name, doc_ids)
    def delete_stale(self, name, doc_id, keep_hash): return self.inner.delete_stale(name, doc_id, keep_hash)
    def flush(self, name: str) -> None: return self.inner.flush(name)
    def doc_states(self, name: str): return self.inner.doc_states(name)  # state fields are never encrypted
    def resolve(self, name: str) -> str: return self.inner.resolve(name)
    def collection_version(self, name: str) -> str: return self.inner.collection_version(name)
    def collection_exists(self, name: str) -> bool: return self.inner.collection_exists(name)
    def get_alias(self, alias: str) -> str | None: return self.inner.get_alias(alias)


def encrypted(store: VectorStore, settings: Any) -> VectorStore:
    """`store` behind the field cipher when encryption is on (else `store` itself)."""
    from security.encryption import field_cipher

    cipher = field_cipher(settings)
    if cipher is None or isinstance(store, EncryptedStore):
        return store
    return EncryptedStore(store, cipher, settings.encryption.subject_tag_prefix)
