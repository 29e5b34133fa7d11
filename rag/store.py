"""One vector-store interface, two backends.

- `EdgeStore`: Qdrant Edge (qdrant-edge-py), one shard directory per collection under
  `data_dir/qdrant_edge`, aliases in a JSON file beside them. A shard may be opened by one
  process only, so in a cluster the store lives in a named, detached Ray actor
  (`EdgeStoreActor`) and everyone else holds a `RemoteStore` that forwards calls to it
  (`open_store(settings)` picks this when no Qdrant URL is configured).
- `QdrantServerStore`: a Qdrant server or cluster through qdrant-client (URL, API key, TLS),
  with the Query API's prefetch + fusion; `":memory:"` gives qdrant-client's local mode.

Both store named vectors `dense` (cosine) and `bm25` (sparse, IDF modifier), with
`rag.second_dense` a third, `dense_e5` (cosine), with `rag.dense_window_tokens` the multi-vector
`dense_windows` (each chunk's windows, MaxSim), and the chunk payload written by the ingest job
(`rag.payload.ChunkPayload`). A hybrid query fuses two lists, or three when it carries an e5
vector; a collection made without `dense_e5` refuses such a query (`EmbedderMismatch`). Fusion is
Qdrant's (RRF, DBSF) or per document in Python (`dbsf-doc`, rag/fusion.py). Collection names given
to queries may be aliases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from config import Settings
from config.actors import detached_actor
from config.names import ACTOR_NAMESPACE
from rag.embedding import DENSE, DENSE_E5, DENSE_WINDOWS, SPARSE, SparseVec
from rag.errors import CollectionNotFound, EmbedderMismatch, RagInvalidRequest, StoreUnavailable
from rag.fusion import fuse_by_document
from rag.payload import STATE_FIELDS

log = logging.getLogger(__name__)

Mode = Literal["dense", "sparse", "hybrid"]
FusionName = Literal["rrf", "dbsf", "dbsf-doc"]


class PayloadFilter(BaseModel):
    """Payload filters: every given field must match (sources/tags/doc_ids: any of the values)."""

    sources: list[str] | None = None
    tags: list[str] | None = None
    doc_ids: list[str] | None = None
    date_from: datetime | None = None
    date_to: datetime | None = None

    def is_empty(self) -> bool:
        return not any((self.sources, self.tags, self.doc_ids, self.date_from, self.date_to))


class SearchSpec(BaseModel):
    mode: Mode = "hybrid"
    dense: list[float] | None = None
    sparse: SparseVec | None = None
    fusion: FusionName = "dbsf"
    rrf_k: int = 60
    weights: list[float] | None = None  # [dense, sparse(, e5)]: RRF's and dbsf-doc's; DBSF repeats lists (dbsf_repeats)
    second: list[float] | None = None   # the e5 query vector (rag.second_dense): a third list in hybrid fusion
    windows: bool = False  # the dense list scores chunks by their best window where the collection has them
    limit: int = Field(10, ge=1)
    prefetch: int = Field(100, ge=1)
    filter: PayloadFilter | None = None
    with_dense: bool = False
    payload_fields: list[str] | None = None  # None: the whole payload

    model_config = {"arbitrary_types_allowed": True}


class Hit(BaseModel):
    id: str
    score: float
    payload: dict[str, Any]
    dense: list[float] | None = None


class VectorStore(ABC):
    """What the ingest job, the retriever and the CLI need from a vector store."""

    dim: int = 384

    # collections
    @abstractmethod
    def create_collection(self, name: str, dim: int, second_dim: int | None = None, windows: bool = False) -> None:
        """Make collection `name` (no-op if it exists): `dense` of `dim`, `bm25`, `dense_e5` of
        `second_dim` when given, and with `windows` the multi-vector `dense_windows` of `dim` (MaxSim)."""
    @abstractmethod
    def dense_vectors(self, name: str) -> list[str]:
        """The named dense vectors collection `name` holds (`dense`, and `dense_e5` if made with it)."""
    @abstractmethod
    def drop_collection(self, name: str) -> None: ...
    @abstractmethod
    def list_collections(self) -> list[str]: ...
    @abstractmethod
    def count(self, name: str, flt: PayloadFilter | None = None) -> int: ...

    # aliases
    @abstractmethod
    def set_alias(self, alias: str, collection: str) -> None: ...
    @abstractmethod
    def list_aliases(self) -> dict[str, str]: ...

    # points
    @abstractmethod
    def upsert(self, name: str, points: list[dict[str, Any]]) -> int: ...
    @abstractmethod
    def delete_docs(self, name: str, doc_ids: list[str]) -> None: ...
    @abstractmethod
    def delete_stale(self, name: str, doc_id: str, keep_hash: str) -> None:
        """Remove a document's points whose doc_hash is not `keep_hash` (an older version's chunks)."""
    @abstractmethod
    def scroll_payloads(self, name: str, fields: list[str]) -> list[dict[str, Any]]: ...
    @abstractmethod
    def search(self, name: str, spec: SearchSpec) -> list[Hit]: ...
    def flush(self, name: str) -> None:  # noqa: B027 - optional
        pass

    # page through points with their ids, and rewrite payload fields in place (re-encryption:
    # both backends implement them; a wrapper such as EncryptedStore leaves them to its inner
    # store, since they move ciphertext as it is)
    def scroll_point_payloads(self, name: str, fields: list[str], offset: Any = None,
                              limit: int = 512) -> tuple[list[dict[str, Any]], Any]:
        raise RagInvalidRequest(f"{type(self).__name__} does not page raw payloads: call its backend store",
                                "collection")

    def set_payloads(self, name: str, updates: list[dict[str, Any]]) -> int:
        """Set the given payload fields ({"id", "payload"}) of each point; other fields stay."""
        raise RagInvalidRequest(f"{type(self).__name__} does not rewrite raw payloads: call its backend store",
                                "collection")

    # whole points (the edge sync: `rag.sync`), as `upsert` takes them: id, dense, sparse, payload
    def scroll_points(self, name: str, offset: str | None = None, limit: int = 256,
                      with_vectors: bool = True) -> tuple[list[dict[str, Any]], str | None]:
        """One page of points in id order, and the offset of the next page (None at the end)."""
        raise RagInvalidRequest(f"the change feed needs the embedded Qdrant Edge store; {type(self).__name__} "
                                "cannot page through whole points yet", "collection")

    def retrieve_points(self, name: str, ids: list[str]) -> list[dict[str, Any]]:
        """These points (those that exist), with vectors and payload."""
        raise RagInvalidRequest(f"the change feed needs the embedded Qdrant Edge store; {type(self).__name__} "
                                "cannot fetch whole points yet", "collection")

    # derived helpers (same for every backend)
    def collection_exists(self, name: str) -> bool:
        return name in self.list_collections()

    def get_alias(self, alias: str) -> str | None:
        return self.list_aliases().get(alias)

    def resolve(self, name: str) -> str:
        """The physical collection behind a name (alias first), or CollectionNotFound."""
        target = self.get_alias(name)
        if target and self.collection_exists(target):
            return target
        if self.collection_exists(name):
            return name
        raise CollectionNotFound(f"collection {name!r} does not exist", "collection")

    def search_resolved(self, name: str, spec: SearchSpec) -> tuple[str, list[Hit]]:
        """Resolve `name` (alias first) and search that collection: the physical name and the hits.
        One round trip where the store lives in another process (a query's critical path)."""
        physical = self.resolve(name)
        return physical, self.search(physical, spec)

    def collection_version(self, name: str) -> str:
        """What answers from collection `name` are valid for (rag.cache): the physical collection
        its alias resolves to and a token of its contents. Here its point count, which misses a
        rewrite that keeps the count; a store that sees every write says more (EdgeStore)."""
        physical = self.resolve(name)
        return f"{physical}:n{self.count(physical)}"

    def doc_states(self, name: str) -> dict[str, dict[str, Any]]:
        """Per document: the hashes its points carry, how many points and how many it should have."""
        states: dict[str, dict[str, Any]] = {}
        for p in self.scroll_payloads(name, STATE_FIELDS):
            s = states.setdefault(p["doc_id"], {"hashes": set(), "count": 0, "n_chunks": p.get("n_chunks"),
                                                "source": p.get("source"), "root": p.get("root"),
                                                "embedder": p.get("embedder") or ""})
            s["hashes"].add(p.get("doc_hash"))
            s["count"] += 1
        return states


def check_second(name: str, vectors: list[str], spec: SearchSpec) -> None:
    """A query that carries an e5 vector on a collection made without `dense_e5` is refused."""
    if spec.second is not None and spec.mode == "hybrid" and DENSE_E5 not in vectors:
        raise EmbedderMismatch(f"collection {name!r} holds no {DENSE_E5!r} vectors (it was written without "
                               "rag.second_dense): re-ingest it with --rebuild and rag.second_dense.enabled, or "
                               "query without the second dense model", "collection")


def dense_using(vectors: list[str], spec: SearchSpec) -> str:
    """The named vector of the dense list: the chunks' windows (a multi-vector, scored by its best
    window) when the query asks for them and the collection has them, else the one vector per chunk
    (a collection written before rag.dense_window_tokens was set still answers, as before)."""
    return DENSE_WINDOWS if spec.windows and DENSE_WINDOWS in vectors else DENSE


def dbsf_repeats(weights: list[float] | None, n: int) -> list[int]:
    """DBSF sums each list's normalised scores and Qdrant takes no weights: a list repeated r times
    counts r times. Weights in steps of 0.5 -> the smallest repeat counts in their ratio (0 drops
    a list); no weights: once each."""
    import math

    if not weights:
        return [1] * n
    reps = [max(0, round(2 * w)) for w in weights[:n]] + [2] * (n - len(weights[:n]))
    g = math.gcd(*[r for r in reps if r]) if any(reps) else 1
    return [r // g for r in reps] if any(reps) else [1] * n


def fusion_weights(weights: list[float] | None, n: int) -> list[float] | None:
    """`weights` fitted to `n` lists: missing ones weigh 1, extra ones are dropped (a two-list
    query given three weights ignores e5's)."""
    if weights is None:
        return None
    return list(weights[:n]) + [1.0] * (n - len(weights[:n]))


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name or ""):
        raise RagInvalidRequest(f"invalid collection name {name!r}", "collection")


def _iso(d: datetime) -> str:
    if d.tzinfo is None:
        return d.strftime("%Y-%m-%dT%H:%M:%SZ")
    return d.isoformat()


# ================================================================================================
# Qdrant Edge
# ================================================================================================

class EdgeStore(VectorStore):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._shards: dict[str, Any] = {}
        self._lock = threading.RLock()
        # Writes per collection since this store opened, under an id of this opening: together a
        # version that every write changes, and that never repeats after a restart (rag.cache).
        self._opened = uuid.uuid4().hex[:12]
        self._writes: dict[str, int] = {}
        self._vectors: dict[str, list[str]] = {}  # each collection's named dense vectors (orfeas.json)

    def _wrote(self, name: str) -> None:
        with self._lock:
            self._writes[name] = self._writes.get(name, 0) + 1

    def collection_version(self, name: str) -> str:
        physical = self.resolve(name)
        with self._lock:
            return f"{physical}:{self._opened}.{self._writes.get(physical, 0)}"

    # --- helpers
    def _path(self, name: str) -> Path:
        _check_name(name)
        return self.root / "collections" / name

    def _shard(self, name: str):
        from qdrant_edge import EdgeShard

        with self._lock:
            shard = self._shards.get(name)
            if shard is None:
                path = self._path(name)
                if not (path / "orfeas.json").exists():
                    raise CollectionNotFound(f"collection {name!r} does not exist", "collection")
                shard = EdgeShard.load(str(path))
                self._shards[name] = shard
            return shard

    def _filter(self, flt: PayloadFilter | None, extra: list | None = None):
        import qdrant_edge as q

        must = list(extra or [])
        if flt is not None:
            if flt.sources:
                must.append(q.FieldCondition(key="source", match=q.MatchAny(list(flt.sources))))
            if flt.tags:
                must.append(q.FieldCondition(key="tags", match=q.MatchAny(list(flt.tags))))
            if flt.doc_ids:
                must.append(q.FieldCondition(key="doc_id", match=q.MatchAny(list(flt.doc_ids))))
            if flt.date_from or flt.date_to:
                must.append(q.FieldCondition(key="date", range=q.RangeDateTime(
                    gte=_iso(flt.date_from) if flt.date_from else None,
                    lte=_iso(flt.date_to) if flt.date_to else None)))
        return q.Filter(must=must) if must else None

    # --- collections
    def create_collection(self, name: str, dim: int, second_dim: int | None = None, windows: bool = False) -> None:
        import qdrant_edge as q

        with self._lock:
            path = self._path(name)
            if (path / "orfeas.json").exists():
                return
            if path.exists():
                shutil.rmtree(path)  # a half-created collection
            vectors = {DENSE: q.EdgeVectorParams(size=dim, distance=q.Distance.Cosine)}
            if second_dim:
                vectors[DENSE_E5] = q.EdgeVectorParams(size=second_dim, distance=q.Distance.Cosine)
            if windows:
                vectors[DENSE_WINDOWS] = q.EdgeVectorParams(
                    size=dim, distance=q.Distance.Cosine,
                    multivector_config=q.MultiVectorConfig(q.MultiVectorComparator.MaxSim))
            cfg = q.EdgeConfig(
                vectors=vectors,
                sparse_vectors={SPARSE: q.EdgeSparseVectorParams(modifier=q.Modifier.Idf)},
            )
            shard = q.EdgeShard.create(str(path), cfg)
            for fld in ("doc_id", "source", "tags", "root"):
                shard.update(q.UpdateOperation.create_field_index(fld, q.PayloadSchemaType.Keyword))
            shard.update(q.UpdateOperation.create_field_index("date", q.PayloadSchemaType.Datetime))
            shard.flush()
            (path / "orfeas.json").write_text(json.dumps({"dim": dim, "vectors": sorted(vectors)}))
            self._shards[name] = shard

    def dense_vectors(self, name: str) -> list[str]:
        with self._lock:
            known = self._vectors.get(name)
            if known is None:
                f = self._path(name) / "orfeas.json"
                if not f.exists():
                    raise CollectionNotFound(f"collection {name!r} does not exist", "collection")
                known = self._vectors[name] = list(json.loads(f.read_text()).get("vectors", [DENSE]))  # older: dense
            return list(known)

    def drop_collection(self, name: str) -> None:
        with self._lock:
            self._wrote(name)  # a collection made again under this name is another version
            self._vectors.pop(name, None)
            shard = self._shards.pop(name, None)
            if shard is not None:
                shard.close()
            path = self._path(name)
            if path.exists():
                shutil.rmtree(path)
            aliases = {a: c for a, c in self.list_aliases().items() if c != name}
            self._write_aliases(aliases)

    def list_collections(self) -> list[str]:
        base = self.root / "collections"
        if not base.exists():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "orfeas.json").exists())

    def count(self, name: str, flt: PayloadFilter | None = None) -> int:
        import qdrant_edge as q

        return int(self._shard(name).count(q.CountRequest(filter=self._filter(flt), exact=True)))

    # --- aliases
    def _aliases_file(self) -> Path:
        return self.root / "aliases.json"

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        tmp = self._aliases_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(aliases, indent=1, sort_keys=True))
        os.replace(tmp, self._aliases_file())  # atomic flip

    def set_alias(self, alias: str, collection: str) -> None:
        _check_name(alias)
        with self._lock:
            if not self.collection_exists(collection):
                raise CollectionNotFound(f"collection {collection!r} does not exist", "collection")
            aliases = self.list_aliases()
            aliases[alias] = collection
            self._write_aliases(aliases)

    def list_aliases(self) -> dict[str, str]:
        f = self._aliases_file()
        return json.loads(f.read_text()) if f.exists() else {}

    # --- points
    def upsert(self, name: str, points: list[dict[str, Any]]) -> int:
        import qdrant_edge as q

        if not points:
            return 0
        pts = [q.Point(p["id"], {DENSE: list(p["dense"]),
                                 SPARSE: q.SparseVector(list(p["sparse_indices"]), list(p["sparse_values"])),
                                 **({DENSE_E5: list(p["dense_e5"])} if p.get("dense_e5") else {}),
                                 **({DENSE_WINDOWS: [list(v) for v in p["dense_windows"]]}
                                    if p.get("dense_windows") else {})},
                       p["payload"]) for p in points]
        self._shard(name).update(q.UpdateOperation.upsert_points(pts))
        self._wrote(name)
        return len(pts)

    def delete_docs(self, name: str, doc_ids: list[str]) -> None:
        import qdrant_edge as q

        if doc_ids:
            self._shard(name).update(q.UpdateOperation.delete_points_by_filter(
                q.Filter(must=[q.FieldCondition(key="doc_id", match=q.MatchAny(list(doc_ids)))])))
            self._wrote(name)

    def delete_points(self, name: str, ids: list[str]) -> None:
        import qdrant_edge as q

        if ids:
            self._shard(name).update(q.UpdateOperation.delete_points(list(ids)))
            self._wrote(name)

    def delete_stale(self, name: str, doc_id: str, keep_hash: str) -> None:
        import qdrant_edge as q

        self._shard(name).update(q.UpdateOperation.delete_points_by_filter(q.Filter(
            must=[q.FieldCondition(key="doc_id", match=q.MatchValue(doc_id))],
            must_not=[q.FieldCondition(key="doc_hash", match=q.MatchValue(keep_hash))])))
        self._wrote(name)

    def scroll_payloads(self, name: str, fields: list[str]) -> list[dict[str, Any]]:
        import qdrant_edge as q

        shard = self._shard(name)
        out, offset = [], None
        while True:
            recs, offset = shard.scroll(q.ScrollRequest(offset=offset, limit=2048, with_payload=list(fields)))
            out.extend(dict(r.payload or {}) for r in recs)
            if offset is None or not recs:
                return out

    def flush(self, name: str) -> None:
        shard = self._shard(name)
        shard.flush()

    def scroll_point_payloads(self, name, fields, offset=None, limit=512):
        import qdrant_edge as q

        recs, nxt = self._shard(name).scroll(q.ScrollRequest(offset=offset, limit=limit, with_payload=list(fields)))
        return [{"id": str(r.id), "payload": dict(r.payload or {})} for r in recs], nxt

    def set_payloads(self, name, updates):
        import qdrant_edge as q

        shard = self._shard(name)
        for u in updates:
            shard.update(q.UpdateOperation.set_payload([u["id"]], u["payload"]))
        self._wrote(name)
        return len(updates)
    @staticmethod
    def _point(r) -> dict[str, Any]:
        vec = r.vector if isinstance(r.vector, dict) else {}
        sp = vec.get(SPARSE)
        return {"id": str(r.id), "dense": list(vec.get(DENSE) or []),
                "sparse_indices": list(sp.indices) if sp is not None else [],
                "sparse_values": list(sp.values) if sp is not None else [], "payload": dict(r.payload or {})}

    def scroll_points(self, name, offset=None, limit=256, with_vectors=True):
        import qdrant_edge as q

        recs, nxt = self._shard(name).scroll(q.ScrollRequest(offset=offset, limit=limit, with_payload=True,
                                                             with_vector=[DENSE, SPARSE] if with_vectors else False))
        return [self._point(r) for r in recs], (str(nxt) if nxt is not None and recs else None)

    def retrieve_points(self, name, ids):
        if not ids:
            return []
        return [self._point(r) for r in self._shard(name).retrieve(list(ids), True, [DENSE, SPARSE])]

    def search(self, name: str, spec: SearchSpec) -> list[Hit]:
        import qdrant_edge as q

        if spec.mode in ("dense", "hybrid") and spec.dense is None:
            raise RagInvalidRequest("a dense query vector is required", "dense")
        if spec.mode in ("sparse", "hybrid") and spec.sparse is None:
            raise RagInvalidRequest("a sparse query vector is required", "sparse")
        shard = self._shard(name)
        flt = self._filter(spec.filter)
        with_vector = [DENSE] if spec.with_dense else False
        with_payload = list(spec.payload_fields) if spec.payload_fields else True

        using = dense_using(self.dense_vectors(name), spec) if spec.windows else DENSE

        def dense_q():
            if using == DENSE_WINDOWS:  # one query vector against each chunk's windows: its best window
                return q.Query.Nearest([list(spec.dense)], using=DENSE_WINDOWS)
            return q.Query.Nearest(list(spec.dense), using=DENSE)

        def sparse_q():
            return q.Query.Nearest(q.SparseVector(list(spec.sparse.indices), list(spec.sparse.values)), using=SPARSE)

        def second_q():
            return q.Query.Nearest(list(spec.second), using=DENSE_E5)

        if spec.mode == "dense":
            req = q.QueryRequest(limit=spec.limit, query=dense_q(), filter=flt, with_payload=with_payload,
                                 with_vector=with_vector)
        elif spec.mode == "sparse":
            req = q.QueryRequest(limit=spec.limit, query=sparse_q(), filter=flt, with_payload=with_payload,
                                 with_vector=with_vector)
        else:
            queries = [dense_q, sparse_q]
            if spec.second is not None:
                check_second(name, self.dense_vectors(name), spec)
                queries.append(second_q)
            if spec.fusion == "dbsf-doc":
                return self._search_by_document(shard, spec, [mk() for mk in queries], flt)
            if spec.fusion == "dbsf":
                fusion = q.Fusion.Dbsf()
                reps = dbsf_repeats(spec.weights, len(queries))
            else:
                weights = fusion_weights(spec.weights, len(queries))
                fusion, reps = q.Fusion.Rrf(k=spec.rrf_k, weights=weights), [1] * len(queries)
            req = q.QueryRequest(
                limit=spec.limit, query=fusion, with_payload=with_payload, with_vector=with_vector,
                prefetches=[q.Prefetch(limit=spec.prefetch, query=mk(), filter=flt)
                            for mk, r in zip(queries, reps) for _ in range(r)])
        hits = []
        for p in shard.query(req):
            vec = p.vector.get(DENSE) if spec.with_dense and isinstance(p.vector, dict) else None
            hits.append(Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {}), dense=vec))
        return hits

    @staticmethod
    def _search_by_document(shard, spec: SearchSpec, queries: list, flt) -> list[Hit]:
        """dbsf-doc: each list `spec.prefetch` deep in one batch (doc ids only), fused per document
        here (rag.fusion), then the top `limit` chunks fetched with what the caller asked for."""
        import qdrant_edge as q

        batch = shard.query_batch(q.QueryBatchRequest([
            q.QueryRequest(limit=spec.prefetch, query=qv, filter=flt, with_payload=["doc_id"], with_vector=False)
            for qv in queries]))
        fused = fuse_by_document([[(str(p.id), (p.payload or {}).get("doc_id", str(p.id)), float(p.score))
                                   for p in points] for points in batch],
                                 fusion_weights(spec.weights, len(queries)))[:spec.limit]
        with_payload = list(spec.payload_fields) if spec.payload_fields else True
        records = {str(r.id): r for r in shard.retrieve([c.id for c in fused], with_payload,
                                                        [DENSE] if spec.with_dense else False)}
        hits = []
        for c in fused:
            r = records.get(c.id)
            if r is None:  # deleted between the two calls
                continue
            vec = r.vector.get(DENSE) if spec.with_dense and isinstance(r.vector, dict) else None
            hits.append(Hit(id=c.id, score=c.score, payload=dict(r.payload or {}), dense=vec))
        return hits

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                shard.close()
            self._shards.clear()


# ================================================================================================
# Qdrant server / cluster (qdrant-client)
# ================================================================================================

class QdrantServerStore(VectorStore):
    def __init__(self, url: str = ":memory:", api_key: str | None = None, timeout_s: float = 30.0):
        from qdrant_client import QdrantClient

        if url == ":memory:":
            self.client = QdrantClient(location=":memory:")
        else:
            self.client = QdrantClient(url=url, api_key=api_key, timeout=int(timeout_s))
        self.url = url

    def _filter(self, flt: PayloadFilter | None):
        from qdrant_client import models as m

        if flt is None or flt.is_empty():
            return None
        must = []
        if flt.sources:
            must.append(m.FieldCondition(key="source", match=m.MatchAny(any=list(flt.sources))))
        if flt.tags:
            must.append(m.FieldCondition(key="tags", match=m.MatchAny(any=list(flt.tags))))
        if flt.doc_ids:
            must.append(m.FieldCondition(key="doc_id", match=m.MatchAny(any=list(flt.doc_ids))))
        if flt.date_from or flt.date_to:
            must.append(m.FieldCondition(key="date", range=m.DatetimeRange(gte=flt.date_from, lte=flt.date_to)))
        return m.Filter(must=must)

    def create_collection(self, name: str, dim: int, second_dim: int | None = None, windows: bool = False) -> None:
        from qdrant_client import models as m

        _check_name(name)
        if self.client.collection_exists(name):
            return
        vectors = {DENSE: m.VectorParams(size=dim, distance=m.Distance.COSINE)}
        if second_dim:
            vectors[DENSE_E5] = m.VectorParams(size=second_dim, distance=m.Distance.COSINE)
        if windows:
            vectors[DENSE_WINDOWS] = m.VectorParams(size=dim, distance=m.Distance.COSINE, multivector_config=(
                m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM)))
        self.client.create_collection(
            name,
            vectors_config=vectors,
            sparse_vectors_config={SPARSE: m.SparseVectorParams(modifier=m.Modifier.IDF)},
        )
        if self.url != ":memory:":  # local mode has no payload indexes
            for fld in ("doc_id", "source", "tags", "root"):
                self.client.create_payload_index(name, fld, m.PayloadSchemaType.KEYWORD)
            self.client.create_payload_index(name, "date", m.PayloadSchemaType.DATETIME)

    def drop_collection(self, name: str) -> None:
        from qdrant_client import models as m

        for alias, target in self.list_aliases().items():
            if target == name:
                self.client.update_collection_aliases(change_aliases_operations=[
                    m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=alias))])
        self.client.delete_collection(name)

    def list_collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def dense_vectors(self, name: str) -> list[str]:
        if not self.client.collection_exists(name):
            raise CollectionNotFound(f"collection {name!r} does not exist", "collection")
        vectors = self.client.get_collection(name).config.params.vectors
        return sorted(vectors) if isinstance(vectors, dict) else [DENSE]

    def count(self, name: str, flt: PayloadFilter | None = None) -> int:
        if not self.client.collection_exists(name):
            raise CollectionNotFound(f"collection {name!r} does not exist", "collection")
        return int(self.client.count(name, count_filter=self._filter(flt), exact=True).count)

    def set_alias(self, alias: str, collection: str) -> None:
        from qdrant_client import models as m

        _check_name(alias)
        if not self.client.collection_exists(collection):
            raise CollectionNotFound(f"collection {collection!r} does not exist", "collection")
        ops = []
        if alias in self.list_aliases():
            ops.append(m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=alias)))
        ops.append(m.CreateAliasOperation(create_alias=m.CreateAlias(collection_name=collection, alias_name=alias)))
        self.client.update_collection_aliases(change_aliases_operations=ops)  # one atomic request

    def list_aliases(self) -> dict[str, str]:
        return {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}

    def upsert(self, name: str, points: list[dict[str, Any]]) -> int:
        from qdrant_client import models as m

        if not points:
            return 0
        self.client.upsert(name, points=[
            m.PointStruct(id=p["id"], payload=p["payload"], vector={
                DENSE: list(p["dense"]),
                SPARSE: m.SparseVector(indices=list(p["sparse_indices"]), values=list(p["sparse_values"])),
                **({DENSE_E5: list(p["dense_e5"])} if p.get("dense_e5") else {}),
                **({DENSE_WINDOWS: [list(v) for v in p["dense_windows"]]} if p.get("dense_windows") else {})})
            for p in points], wait=True)
        return len(points)

    def delete_docs(self, name: str, doc_ids: list[str]) -> None:
        from qdrant_client import models as m

        if doc_ids:
            self.client.delete(name, points_selector=m.FilterSelector(filter=m.Filter(
                must=[m.FieldCondition(key="doc_id", match=m.MatchAny(any=list(doc_ids)))])), wait=True)

    def delete_stale(self, name: str, doc_id: str, keep_hash: str) -> None:
        from qdrant_client import models as m

        self.client.delete(name, points_selector=m.FilterSelector(filter=m.Filter(
            must=[m.FieldCondition(key="doc_id", match=m.MatchValue(value=doc_id))],
            must_not=[m.FieldCondition(key="doc_hash", match=m.MatchValue(value=keep_hash))])), wait=True)

    def scroll_payloads(self, name: str, fields: list[str]) -> list[dict[str, Any]]:
        out, offset = [], None
        while True:
            recs, offset = self.client.scroll(name, limit=2048, offset=offset, with_payload=list(fields))
            out.extend(dict(r.payload or {}) for r in recs)
            if offset is None or not recs:
                return out

    def search(self, name: str, spec: SearchSpec) -> list[Hit]:
        from qdrant_client import models as m

        if spec.mode in ("dense", "hybrid") and spec.dense is None:
            raise RagInvalidRequest("a dense query vector is required", "dense")
        if spec.mode in ("sparse", "hybrid") and spec.sparse is None:
            raise RagInvalidRequest("a sparse query vector is required", "sparse")
        flt = self._filter(spec.filter)
        sparse = m.SparseVector(indices=list(spec.sparse.indices), values=list(spec.sparse.values)) \
            if spec.sparse is not None else None
        with_vectors = [DENSE] if spec.with_dense else False
        wp = list(spec.payload_fields) if spec.payload_fields else True
        using = dense_using(self.dense_vectors(name), spec) if spec.windows else DENSE
        dense_q = ([list(spec.dense)] if using == DENSE_WINDOWS else list(spec.dense)) if spec.dense is not None else None
        if spec.mode == "dense":
            res = self.client.query_points(name, query=dense_q, using=using, limit=spec.limit,
                                           query_filter=flt, with_payload=wp, with_vectors=with_vectors)
        elif spec.mode == "sparse":
            res = self.client.query_points(name, query=sparse, using=SPARSE, limit=spec.limit,
                                           query_filter=flt, with_payload=wp, with_vectors=with_vectors)
        else:
            lists = [(dense_q, using), (sparse, SPARSE)]
            if spec.second is not None:
                check_second(name, self.dense_vectors(name), spec)
                lists.append((list(spec.second), DENSE_E5))
            if spec.fusion == "dbsf-doc":
                return self._search_by_document(name, spec, lists, flt, wp, with_vectors)
            if spec.fusion == "dbsf":
                fusion, reps = m.FusionQuery(fusion=m.Fusion.DBSF), dbsf_repeats(spec.weights, len(lists))
            else:
                weights = fusion_weights(spec.weights, len(lists))
                fusion, reps = m.RrfQuery(rrf=m.Rrf(k=spec.rrf_k, weights=weights)), [1] * len(lists)
            res = self.client.query_points(
                name, prefetch=[m.Prefetch(query=qv, using=using, limit=spec.prefetch, filter=flt)
                                for (qv, using), r in zip(lists, reps) for _ in range(r)],
                query=fusion, limit=spec.limit, with_payload=wp, with_vectors=with_vectors)
        hits = []
        for p in res.points:
            vec = None
            if spec.with_dense and isinstance(p.vector, dict):
                vec = list(p.vector.get(DENSE) or []) or None
            hits.append(Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {}), dense=vec))
        return hits

    def _search_by_document(self, name: str, spec: SearchSpec, lists: list, flt, wp, with_vectors) -> list[Hit]:
        """dbsf-doc, as EdgeStore's: the lists in one batch, fused per document, the top fetched."""
        from qdrant_client import models as m

        batch = self.client.query_batch_points(name, requests=[
            m.QueryRequest(query=qv, using=using, limit=spec.prefetch, filter=flt, with_payload=["doc_id"])
            for qv, using in lists])
        fused = fuse_by_document([[(str(p.id), (p.payload or {}).get("doc_id", str(p.id)), float(p.score))
                                   for p in res.points] for res in batch],
                                 fusion_weights(spec.weights, len(lists)))[:spec.limit]
        records = {str(r.id): r for r in self.client.retrieve(name, [c.id for c in fused], with_payload=wp,
                                                              with_vectors=with_vectors)}
        hits = []
        for c in fused:
            r = records.get(c.id)
            if r is None:  # deleted between the two calls
                continue
            vec = list(r.vector.get(DENSE) or []) or None if spec.with_dense and isinstance(r.vector, dict) else None
            hits.append(Hit(id=c.id, score=c.score, payload=dict(r.payload or {}), dense=vec))
        return hits

    def collection_exists(self, name: str) -> bool:
        return self.client.collection_exists(name)

    def scroll_point_payloads(self, name, fields, offset=None, limit=512):
        recs, nxt = self.client.scroll(name, limit=limit, offset=offset, with_payload=list(fields))
        return [{"id": str(r.id), "payload": dict(r.payload or {})} for r in recs], nxt

    def set_payloads(self, name, updates):
        from qdrant_client import models as m

        if updates:
            self.client.batch_update_points(name, [m.SetPayloadOperation(set_payload=m.SetPayload(
                payload=u["payload"], points=[u["id"]])) for u in updates], wait=True)
        return len(updates)


# ================================================================================================
# The Edge store's owner: a named, detached Ray actor
# ================================================================================================



class _EdgeStoreOwner:
    """Holds the only open handles on the Edge shards; every method of EdgeStore through `call`."""

    def __init__(self, root: str, tracing_settings: dict | None = None):
        from config import TracingSettings
        from observability import tracing

        self.store = EdgeStore(root)
        self.root = root
        tracing.configure(TracingSettings.model_validate(tracing_settings or {}), "qdrant")

    def call(self, method: str, *args, _trace: dict | None = None, **kwargs):
        """`_trace`: the caller's W3C carrier; the call is a `qdrant.<method>` span under it."""
        from observability import tracing

        if method.startswith("_") or not hasattr(VectorStore, method) and method not in ("close",):
            raise AttributeError(f"EdgeStore has no public method {method!r}")
        if _trace is None or not tracing.enabled():
            return getattr(self.store, method)(*args, **kwargs)
        name = args[0] if args and isinstance(args[0], str) else ""
        with tracing.span(f"qdrant.{method}", {"db.system.name": "qdrant", "db.operation.name": method,
                                              "db.collection.name": name}, parent=_trace, kind="server"):
            return getattr(self.store, method)(*args, **kwargs)

    def where(self) -> str:
        return self.root


def edge_root(settings: Settings) -> Path:
    return settings.resolved_data_dir() / "qdrant_edge"


def edge_actor_name(settings: Settings) -> str:
    """The owner's name: the configured base plus a digest of the store path (one owner per path)."""
    digest = hashlib.sha1(str(edge_root(settings)).encode()).hexdigest()[:8]
    return f"{settings.rag.edge_actor_name}-{digest}"


def edge_store_actor(settings: Settings):
    """Get or create the detached actor owning this data dir's Edge shards."""
    traced = settings.tracing.model_dump(mode="json", exclude_defaults=True) if settings.tracing.enabled else None
    return detached_actor(_EdgeStoreOwner, edge_actor_name(settings), str(edge_root(settings)), traced,
                          durable=True, max_concurrency=16, max_task_retries=0)


# Calls that only read: one lost to a dead owner is retried once, on a fresh (or restarted) owner.
IDEMPOTENT_READS = frozenset({"list_collections", "dense_vectors", "count", "list_aliases", "scroll_payloads", "search",
                              "search_resolved", "doc_states", "resolve", "collection_exists", "collection_version",
                              "scroll_points", "retrieve_points", "scroll_point_payloads"})
OWNER_RETRY_WAIT_S = 0.5


class RemoteStore(VectorStore):
    """A VectorStore whose every call runs in the owning actor. When the owner is lost, a read
    is retried once on the owner `reopen` gets (the detached actor, made again if it is gone);
    a write, or a read that fails again, is a `StoreUnavailable` (503 with Retry-After)."""

    def __init__(self, handle, reopen=None):
        self._h = handle
        self._reopen = reopen

    def _call(self, method: str, *args, **kwargs):
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        from observability import tracing

        carrier = tracing.inject()  # the owner's span joins the caller's trace
        if carrier:
            kwargs["_trace"] = carrier
        for attempt in (1, 2):
            try:
                return ray.get(self._h.call.remote(method, *args, **kwargs))
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                lost = f"the vector store's owner actor was lost ({type(e).__name__}); retry shortly"
                if self._reopen is not None:
                    time.sleep(OWNER_RETRY_WAIT_S)
                    try:
                        self._h = self._reopen()
                    except Exception:  # the next call tries again
                        log.warning("cannot reach the vector store's owner again yet", exc_info=True)
                if attempt == 2 or method not in IDEMPOTENT_READS:
                    raise StoreUnavailable(lost) from None

    def create_collection(self, name, dim, second_dim=None, windows=False):
        return self._call("create_collection", name, dim, second_dim, windows=windows)
    def dense_vectors(self, name): return self._call("dense_vectors", name)
    def drop_collection(self, name): return self._call("drop_collection", name)
    def list_collections(self): return self._call("list_collections")
    def count(self, name, flt=None): return self._call("count", name, flt)
    def set_alias(self, alias, collection): return self._call("set_alias", alias, collection)
    def list_aliases(self): return self._call("list_aliases")
    def upsert(self, name, points): return self._call("upsert", name, points)
    def delete_docs(self, name, doc_ids): return self._call("delete_docs", name, doc_ids)
    def delete_stale(self, name, doc_id, keep_hash): return self._call("delete_stale", name, doc_id, keep_hash)
    def scroll_payloads(self, name, fields): return self._call("scroll_payloads", name, fields)
    def search(self, name, spec): return self._call("search", name, spec)
    def search_resolved(self, name, spec): return self._call("search_resolved", name, spec)
    def flush(self, name): return self._call("flush", name)
    def doc_states(self, name): return self._call("doc_states", name)
    def resolve(self, name): return self._call("resolve", name)
    def collection_version(self, name): return self._call("collection_version", name)
    def scroll_point_payloads(self, name, fields, offset=None, limit=512):
        return self._call("scroll_point_payloads", name, fields, offset, limit)
    def set_payloads(self, name, updates): return self._call("set_payloads", name, updates)
    def scroll_points(self, name, offset=None, limit=256, with_vectors=True):
        return self._call("scroll_points", name, offset, limit, with_vectors)
    def retrieve_points(self, name, ids): return self._call("retrieve_points", name, ids)


def open_store(settings: Settings) -> VectorStore:
    """The configured store: a Qdrant server when `rag.qdrant_url` is set, else the Edge owner actor;
    behind the field cipher when encryption is on (rag/encrypted_store.py)."""
    from rag.encrypted_store import encrypted

    url = settings.rag.qdrant_url
    if url:
        key = os.environ.get(settings.rag.qdrant_api_key_env) if settings.rag.qdrant_api_key_env else None
        return encrypted(QdrantServerStore(url, key, settings.rag.qdrant_timeout_s), settings)
    import ray

    if not ray.is_initialized():
        ray.init(address=settings.ray.address or "auto", namespace=ACTOR_NAMESPACE, log_to_driver=False)
    return encrypted(RemoteStore(edge_store_actor(settings), reopen=lambda: edge_store_actor(settings)), settings)
