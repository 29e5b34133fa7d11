"""A collection's changes for edge nodes, and the writes edge nodes push back (the cluster side of
`edge.sync`).

The change feed is content-addressed: every point has a hash of its payload (text, document
version, embedder); a collection's *version* is the checksum of its sorted `id:hash` index. An
edge sends the version it last synced (`since`): the same version answers "unchanged" at once;
otherwise the feed pages through the index (ids and hashes only: ~60 bytes a point) and the edge
fetches whole points (vectors and payload) only for the ids whose hash it lacks, and deletes the
ids the index no longer has. Added, changed and deleted points are all found by id and hash, so
a sync interrupted anywhere resumes by asking again: nothing depends on a server-side log.

Pages of one version are served from an index built once per version (per replica); a page
asked for a version that is no longer current answers `VersionGone` (409), and the edge starts
over from the first page, keeping what it has already fetched.

Edge writes: a note (text the edge ingested locally) or a feedback record, each with the id the
edge gave it. Notes are chunked and embedded here with the cluster's own embedder and upserted as
document `edge:<id>` (point ids derive from it, so pushing twice writes once); feedback lines are
appended to `data_dir/rag/edge_feedback.jsonl` unless that id is already there. Conflict rule:
the cluster's version of a document wins (a synced document is never overwritten by the edge);
an edge's own additions keep their ids (`edge:<id>`), so they cannot collide with cluster
documents.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from config import Settings
from models.errors import APIError
from rag.errors import RagInvalidRequest
from rag.store import VectorStore

INDEX_PAGE = 2000
POINTS_MAX = 256


class VersionGone(APIError):
    """The collection changed while an edge paged through its index: start again from page one."""

    status, type, code = 409, "conflict_error", "version_gone"


def point_hash(payload: dict[str, Any]) -> str:
    """A point's content hash: its whole payload (text, document version, embedder), canonical JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


def index_checksum(entries: list[tuple[str, str]] | dict[str, str]) -> str:
    """The checksum of an `id -> hash` index: what `version` is and what an edge verifies."""
    items = sorted(entries.items() if isinstance(entries, dict) else entries)
    h = hashlib.sha256()
    for pid, ph in items:
        h.update(f"{pid}:{ph}\n".encode())
    return h.hexdigest()[:32]


class IndexEntry(BaseModel):
    id: str
    hash: str


class ChangesPage(BaseModel):
    """`GET /v1/rag/collections/{name}/changes?since=V&cursor=N`: one page of the collection's index."""

    object: Literal["rag.changes"] = "rag.changes"
    collection: str
    physical: str
    version: str                    # the index checksum: the edge's next `since`
    unchanged: bool                 # `since` is the current version: nothing to do
    total: int                      # points in this version
    entries: list[IndexEntry] = []
    next_cursor: int | None = None  # the next page's cursor; None on the last page


class PointsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(max_length=POINTS_MAX)


class EdgeWrite(BaseModel):
    """A write made at an edge, pushed when the cluster is reachable."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", description="The edge's own id for it.")
    kind: Literal["note", "feedback"]
    data: dict[str, Any]


class ChangeFeed:
    """Versions and pages of collections' indexes, built once per version (a few kept)."""

    def __init__(self, store: VectorStore, keep: int = 4):
        self.store = store
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[str, list[tuple[str, str]]]] = OrderedDict()  # version -> (phys, idx)
        self.keep = keep

    def build(self, physical: str) -> tuple[str, list[tuple[str, str]]]:
        entries, offset = [], None
        while True:
            points, offset = self.store.scroll_points(physical, offset, 1024, with_vectors=False)
            entries.extend((p["id"], point_hash(p["payload"])) for p in points)
            if offset is None:
                break
        entries.sort()
        version = index_checksum(entries)
        with self._lock:
            self._cache[version] = (physical, entries)
            self._cache.move_to_end(version)
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return version, entries

    def changes(self, name: str, since: str | None = None, cursor: int = 0, version: str | None = None,
                limit: int = INDEX_PAGE) -> ChangesPage:
        if cursor < 0 or not 1 <= limit <= INDEX_PAGE:
            raise RagInvalidRequest(f"cursor must be >= 0 and limit between 1 and {INDEX_PAGE}", "cursor")
        physical = self.store.resolve(name)
        if cursor:  # a later page of the version the first page named
            with self._lock:
                cached = self._cache.get(version or "")
            if cached is None or cached[0] != physical:
                raise VersionGone(f"collection {name!r} changed since version {version!r}: sync again from the "
                                  "first page", "version")
            entries = cached[1]
        else:
            version, entries = self.build(physical)
            if since and since == version:
                return ChangesPage(collection=name, physical=physical, version=version, unchanged=True,
                                   total=len(entries))
        page = entries[cursor:cursor + limit]
        nxt = cursor + limit if cursor + limit < len(entries) else None
        return ChangesPage(collection=name, physical=physical, version=version, unchanged=False, total=len(entries),
                           entries=[IndexEntry(id=i, hash=h) for i, h in page], next_cursor=nxt)

    def points(self, name: str, ids: list[str]) -> list[dict[str, Any]]:
        """Whole points, each with its `hash` (the edge checks it against the index)."""
        if len(ids) > POINTS_MAX:
            raise RagInvalidRequest(f"at most {POINTS_MAX} ids per request", "ids")
        out = self.store.retrieve_points(self.store.resolve(name), ids)
        for p in out:
            p["hash"] = point_hash(p["payload"])
        return out


def apply_edge_write(store: VectorStore, settings: Settings, collection: str, write: EdgeWrite) -> dict[str, Any]:
    """Land one edge write, once however often it is pushed (see the module docstring)."""
    from rag.chunking import Chunker, embedding_text, load_tokenizer
    from rag.documents import Document
    from rag.embedding import SparseEncoder, dense_source, embedder_dir, embedder_id, shared_dense

    if write.kind == "feedback":
        path = settings.resolved_data_dir() / "rag" / "edge_feedback.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with _FEEDBACK_LOCK:
            seen = set()
            if path.exists():
                seen = {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}
            if write.id not in seen:
                with open(path, "a") as f:
                    f.write(json.dumps({"id": write.id, "collection": collection, **write.data}) + "\n")
            return {"id": write.id, "kind": "feedback", "landed": write.id not in seen}
    text = write.data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise RagInvalidRequest("a note needs a non-empty 'text'", "data.text")
    physical = store.resolve(collection)
    doc_id = f"edge:{write.id}"
    r = settings.rag
    doc = Document(doc_id=doc_id, source=f"edge:{write.id}", title=str(write.data.get("title", "")), text=text)
    chunks = Chunker(load_tokenizer(embedder_dir(settings)), r.chunk_tokens, r.chunk_overlap).split(doc)
    texts = [embedding_text(c.title, c.section, c.text) for c in chunks]
    dense = shared_dense(dense_source(settings), r.query_embedding_runtime).embed(texts)
    sparse = SparseEncoder.from_settings(settings).embed_documents(texts)
    extract_graph = None
    if r.graph.extract:  # the knowledge graph's entities, as ingest extracts them (rag/graph_llm.py)
        from rag.graph_llm import chunk_extractor

        extract_graph = chunk_extractor(r.graph.model_dump())
    points = []
    for c, d, s in zip(chunks, dense, sparse):
        payload = c.payload()
        payload.update(root="edge", doc_hash=doc.doc_hash, embedder=embedder_id(settings))
        if extract_graph is not None:
            payload["graph"] = extract_graph(c.text)
        points.append({"id": c.id, "dense": d.tolist(), "sparse_indices": s.indices, "sparse_values": s.values,
                       "payload": payload})
    store.upsert(physical, points)
    store.delete_stale(physical, doc_id, doc.doc_hash)
    store.flush(physical)
    return {"id": write.id, "kind": "note", "doc_id": doc_id, "chunks": len(points), "landed": True}


_FEEDBACK_LOCK = threading.Lock()
