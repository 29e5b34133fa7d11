"""Dense, sparse and hybrid retrieval over a VectorStore, with grouping per document, MMR
diversity, optional graph augmentation (the knowledge graph's chunks for the question's
entities, fused by RRF: rag/graph.py) and an optional CrossEncoder re-ranking hook."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, Field

from config import Settings
from models.embedders import DenseEmbedder
from models.errors import ModelLoadError
from observability import tracing
from rag.embedding import (SparseEncoder, SparseVec, check_embedder, check_second_embedder, dense_source,
                           second_embedder_id, shared_dense, shared_second)
from rag.errors import RagInvalidRequest
from rag.graph import GraphCache, rrf
from rag.payload import ChunkPayload, read_payload
from rag.store import Hit, PayloadFilter, SearchSpec, VectorStore

log = logging.getLogger(__name__)

MODES = ("dense", "sparse", "hybrid")
FUSIONS = ("rrf", "dbsf", "dbsf-doc")


class RetrievedChunk(ChunkPayload):
    """A search hit: the point id, its score(s) and its stored payload."""

    id: str
    score: float
    rerank_score: float | None = None

    @classmethod
    def from_hit(cls, h: Hit) -> "RetrievedChunk":
        return cls(id=h.id, score=h.score, **read_payload(h.payload))


class GraphDiagnostics(BaseModel):
    """What graph augmentation did (rag.graph)."""

    entities: list[str] = Field(description="The graph's entities the question names (normal form).")
    ranked: int = Field(description="Chunks the graph ranked for them (their own and their neighbours').")
    added: int = Field(description="Of those, chunks the search had not found (fused in).")
    graph_ms: float


class RetrievalDiagnostics(BaseModel):
    collection: str
    resolved_collection: str
    mode: str
    fusion: str | None
    candidates: int
    returned: int
    grouped_by_doc: bool
    mmr: bool
    reranked: bool
    embed_ms: float
    search_ms: float
    rerank_ms: float = 0.0
    graph: GraphDiagnostics | None = None
    second_dense: bool = False  # the e5 list was fused in (rag.second_dense)


class Reranker(Protocol):
    def score(self, query: str, texts: list[str]) -> list[float]: ...


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder from a local directory (or the HF cache; nothing is
    downloaded), loaded on first use. A name that loads nothing is a ModelLoadError naming
    `rag.reranker`, not a re-ranking that silently never happens."""

    def __init__(self, name: str):
        self.name = name
        self._model = None
        self._lock = threading.Lock()

    def load(self):
        with self._lock:
            if self._model is None:
                from sentence_transformers import CrossEncoder

                try:
                    self._model = CrossEncoder(self.name, device="cpu", local_files_only=True)
                except Exception as e:  # noqa: BLE001 - OSError, HF validation, a config it cannot read
                    raise ModelLoadError(
                        f"rag.reranker {self.name!r} is not a cross-encoder this machine has (a directory with a "
                        f"sequence-classification model and its tokenizer, or a model in the Hugging Face cache; "
                        f"nothing is downloaded): {type(e).__name__}: {e}"[:600]) from None
            return self._model

    def score(self, query: str, texts: list[str]) -> list[float]:
        model = self.load()
        return [float(s) for s in model.predict([(query, t) for t in texts], show_progress_bar=False)]


QUERY_VECTORS_KEPT = 256  # recent queries' vectors: a cache lookup's embedding serves the retrieval after it


def mmr_select(query_vec: np.ndarray, vecs: np.ndarray, relevance: np.ndarray, k: int, lam: float) -> list[int]:
    """Greedy maximal marginal relevance: indices of `k` items balancing relevance and novelty."""
    n = len(vecs)
    if n == 0:
        return []
    rel = relevance.astype(np.float64)
    if rel.max() > rel.min():
        rel = (rel - rel.min()) / (rel.max() - rel.min())
    else:
        rel = np.ones_like(rel)
    sims = vecs @ vecs.T
    chosen: list[int] = []
    best_sim = np.full(n, -np.inf)
    for _ in range(min(k, n)):
        penalty = np.where(np.isfinite(best_sim), best_sim, 0.0)
        score = lam * rel - (1 - lam) * penalty
        score[chosen] = -np.inf
        i = int(np.argmax(score))
        chosen.append(i)
        best_sim = np.maximum(best_sim, sims[:, i])
    return chosen


class Retriever:
    def __init__(self, settings: Settings, store: VectorStore, dense: DenseEmbedder | None = None,
                 sparse: SparseEncoder | None = None, reranker: Reranker | None = None):
        self.settings = settings
        self.store = store
        self.dense = dense or shared_dense(dense_source(settings), settings.rag.query_embedding_runtime)
        self._embedder: str | None = None
        self.sparse = sparse or SparseEncoder.from_settings(settings)
        if reranker is None and settings.rag.reranker:
            reranker = CrossEncoderReranker(settings.rag.reranker)
        self.reranker = reranker
        self._vectors: OrderedDict[str, tuple[np.ndarray, SparseVec]] = OrderedDict()
        self._vectors_lock = threading.Lock()
        # The second dense model (rag.second_dense: e5), a third list in hybrid fusion.
        sd = settings.rag.second_dense
        self.second = shared_second(sd.model, sd.precision) if sd.enabled else None
        self.second_id = second_embedder_id(settings)
        self._second_vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self.graphs = GraphCache(store)  # each collection version's knowledge graph, built on first use

    @property
    def embedder(self) -> str:
        """The model/variant of the query vectors: a collection written by another is refused."""
        if self._embedder is None:
            self._embedder = f"{self.settings.rag.embedding_model}/{self.dense.variant}"
        return self._embedder

    def validate(self, query: str, top_k: int | None, mode: str | None, fusion: str | None) -> tuple[str, int, str, str]:
        r = self.settings.rag
        if not isinstance(query, str) or not query.strip():
            raise RagInvalidRequest("query must be a non-empty string", "query")
        k = r.top_k if top_k is None else top_k
        if not isinstance(k, int) or not 1 <= k <= r.max_top_k:
            raise RagInvalidRequest(f"top_k must be between 1 and {r.max_top_k}", "top_k")
        mode = mode or r.mode
        if mode not in MODES:
            raise RagInvalidRequest(f"mode must be one of {', '.join(MODES)}", "mode")
        fusion = fusion or r.fusion
        if fusion not in FUSIONS:
            raise RagInvalidRequest(f"fusion must be one of {', '.join(FUSIONS)}", "fusion")
        return query.strip(), k, mode, fusion

    def query_vectors(self, query: str) -> tuple[np.ndarray, SparseVec]:
        """The dense and sparse vectors of one (stripped) query, kept for the last few queries:
        the semantic cache embeds a question to look it up, and on a miss the retrieval that
        follows reuses that vector instead of embedding the question again."""
        with self._vectors_lock:
            hit = self._vectors.get(query)
            if hit is not None:
                self._vectors.move_to_end(query)
                return hit
        with tracing.span("rag.embed", {"gen_ai.operation.name": "embeddings"}):
            out = (self.dense.embed([query])[0], self.sparse.embed_query(query))
        with self._vectors_lock:
            self._vectors[query] = out
            while len(self._vectors) > QUERY_VECTORS_KEPT:
                self._vectors.popitem(last=False)
        return out

    def second_vector(self, query: str) -> np.ndarray:
        """The e5 vector of one (stripped) query, kept for the last few queries like query_vectors'."""
        with self._vectors_lock:
            hit = self._second_vectors.get(query)
            if hit is not None:
                self._second_vectors.move_to_end(query)
                return hit
        with tracing.span("rag.embed_second", {"gen_ai.operation.name": "embeddings"}):
            vec = self.second.embed([query], is_query=True)[0]
        with self._vectors_lock:
            self._second_vectors[query] = vec
            while len(self._second_vectors) > QUERY_VECTORS_KEPT:
                self._second_vectors.popitem(last=False)
        return vec

    def encode_queries(self, queries: list[str]) -> tuple[np.ndarray, list[SparseVec]]:
        return self.dense.embed(queries), [self.sparse.embed_query(q) for q in queries]

    def encode_second(self, queries: list[str]) -> np.ndarray | None:
        """The e5 vectors of many queries (None when rag.second_dense is off)."""
        return self.second.embed(queries, is_query=True) if self.second is not None else None

    def retrieve(self, query: str, collection: str | None = None, *, top_k: int | None = None,
                 mode: str | None = None, fusion: str | None = None, filters: PayloadFilter | None = None,
                 mmr: bool = False, mmr_lambda: float | None = None, group_by_doc: bool = False,
                 rerank: bool | None = None, vectors: tuple[Any, SparseVec] | None = None,
                 payload_fields: list[str] | None = None, graph: bool | None = None,
                 second_dense: bool | None = None, second_vector: Any = None,
                 weights: list[float] | None = None) -> tuple[list[RetrievedChunk], RetrievalDiagnostics]:
        """`second_dense`: fuse the e5 list into hybrid retrieval (default: rag.second_dense.enabled);
        `weights`: [dense, sparse(, e5)] fusion weights (default: rag.dense_weight, sparse_weight,
        second_dense.weight)."""
        query, k, mode, fusion = self.validate(query, top_k, mode, fusion)
        use_second = mode == "hybrid" and (self.second is not None if second_dense is None else second_dense)
        if use_second and self.second is None and second_vector is None:
            raise RagInvalidRequest("the second dense model asked for, but rag.second_dense is off", "second_dense")
        r = self.settings.rag
        name = collection or r.collection
        do_rerank = bool(self.reranker) if rerank is None else rerank
        if do_rerank and self.reranker is None:
            raise RagInvalidRequest("re-ranking asked for, but no rag.reranker is configured", "rerank")

        t0 = time.perf_counter()
        if vectors is None:
            dvec, svec = self.query_vectors(query)
        else:
            dvec, svec = vectors
        if use_second and second_vector is None:
            second_vector = self.second_vector(query)
        t1 = time.perf_counter()

        want = k
        if group_by_doc:
            want = k * 4
        if mmr or do_rerank:
            want = max(want, k * 4, 20)
        want = min(want, 1000)
        if weights is None and mode == "hybrid":
            weights = [r.dense_weight, r.sparse_weight] + ([r.second_dense.weight] if use_second else [])
        if weights is not None and all(w == 1.0 for w in weights):
            weights = None
        checked = ["embedder", "second_embedder"] if use_second else ["embedder"]
        spec = SearchSpec(mode=mode, dense=[float(x) for x in dvec], sparse=svec if svec.indices else None,
                          fusion=fusion, rrf_k=r.rrf_k, weights=weights, limit=want,
                          second=[float(x) for x in second_vector] if use_second else None,
                          windows=bool(r.dense_window_tokens),
                          prefetch=max(r.doc_fusion_depth if fusion == "dbsf-doc" else r.prefetch, want),
                          filter=filters, with_dense=mmr,
                          payload_fields=[*payload_fields, *checked] if payload_fields else None)
        if spec.sparse is None and mode in ("sparse", "hybrid"):
            # no indexable word in the query (only stop words): fall back to dense ranking
            spec.mode = "dense" if mode == "hybrid" else mode
            if mode == "sparse":
                return [], RetrievalDiagnostics(
                    collection=name, resolved_collection=self.store.resolve(name), mode=mode, fusion=None,
                    candidates=0, returned=0, grouped_by_doc=group_by_doc, mmr=mmr, reranked=False,
                    embed_ms=(t1 - t0) * 1e3, search_ms=0.0)
        with tracing.span("rag.search", {"db.system.name": "qdrant", "db.collection.name": name,
                                         "orfeas.rag.mode": spec.mode, "orfeas.rag.limit": want}) as s:
            physical, hits = self.store.search_resolved(name, spec)
            s.set_attribute("orfeas.rag.candidates", len(hits))
        t2 = time.perf_counter()
        graph_diag = None
        use_graph = r.graph.retrieval if graph is None else graph
        if use_graph:
            hits, graph_diag = self._graph_fused(query, physical, spec, hits)
        if spec.mode != "sparse":
            for stored in {h.payload.get("embedder", "") for h in hits}:
                check_embedder(name, stored, self.embedder)
        if spec.second is not None and spec.mode == "hybrid":
            for stored in {h.payload.get("second_embedder", "") for h in hits}:
                check_second_embedder(name, stored, self.second_id or stored)
        candidates = len(hits)

        if group_by_doc:
            seen, grouped = set(), []
            for h in hits:
                d = h.payload.get("doc_id")
                if d not in seen:
                    seen.add(d)
                    grouped.append(h)
            hits = grouped

        chunks = [RetrievedChunk.from_hit(h) for h in hits]
        rerank_ms = 0.0
        if do_rerank and chunks:
            t3 = time.perf_counter()
            with tracing.span("rag.rerank", {"orfeas.rag.candidates": len(chunks)}):
                scores = self.reranker.score(query, [c.text for c in chunks])
            for c, s in zip(chunks, scores):
                c.rerank_score = s
            order = sorted(range(len(chunks)), key=lambda i: -scores[i])
            chunks, hits = [chunks[i] for i in order], [hits[i] for i in order]
            rerank_ms = (time.perf_counter() - t3) * 1e3

        if mmr and chunks:
            vecs = np.array([h.dense if h.dense else np.zeros_like(dvec) for h in hits], dtype=np.float32)
            rel = np.array([c.rerank_score if c.rerank_score is not None else c.score for c in chunks])
            lam = r.mmr_lambda if mmr_lambda is None else mmr_lambda
            chunks = [chunks[i] for i in mmr_select(np.asarray(dvec), vecs, rel, k, lam)]
        chunks = chunks[:k]
        diag = RetrievalDiagnostics(
            collection=name, resolved_collection=physical, mode=spec.mode,
            fusion=fusion if spec.mode == "hybrid" else None, candidates=candidates, returned=len(chunks),
            grouped_by_doc=group_by_doc, mmr=mmr, reranked=do_rerank, embed_ms=round((t1 - t0) * 1e3, 2),
            search_ms=round((t2 - t1) * 1e3, 2), rerank_ms=round(rerank_ms, 2), graph=graph_diag,
            second_dense=spec.second is not None and spec.mode == "hybrid")
        return chunks, diag

    def _graph_fused(self, query: str, physical: str, spec: SearchSpec,
                     hits: list[Hit]) -> tuple[list[Hit], GraphDiagnostics]:
        """The search's hits fused (RRF) with the chunks the knowledge graph ranks for the
        question's entities. A graph chunk the search did not return is fetched by a second
        search restricted to its documents (same vectors and filters: a filter the caller set
        still applies), so this works on every store."""
        gs, t0 = self.settings.rag.graph, time.perf_counter()
        with tracing.span("rag.graph", {"db.collection.name": physical}) as s:
            kg = self.graphs.get(physical)
            ranked, seeds = kg.rank_chunks(query, neighbours=gs.neighbours, hop_weight=gs.hop_weight,
                                           max_df=gs.max_df, limit=gs.candidates)
            have = {h.id: h for h in hits}
            missing = {c for c in ranked if c not in have}
            added = 0
            if missing:
                flt = (spec.filter or PayloadFilter()).model_copy()
                docs = {kg.doc_of[c] for c in missing}
                flt.doc_ids = sorted(docs & set(flt.doc_ids) if flt.doc_ids else docs)
                if flt.doc_ids:
                    n = min(1000, sum(kg.doc_chunks[d] for d in flt.doc_ids))
                    fetch = spec.model_copy(update={"filter": flt, "limit": n, "prefetch": max(spec.prefetch, n),
                                                    "mode": "dense" if spec.dense else spec.mode})
                    for h in self.store.search(physical, fetch):
                        if h.id in missing:
                            have[h.id] = h
                            added += 1
            from_graph = [c for c in ranked if c in have]
            fused = rrf([[h.id for h in hits], from_graph], [1.0, gs.weight], self.settings.rag.rrf_k)
            out = [have[i].model_copy(update={"score": score}) for i, score in fused[:max(len(hits), spec.limit)]]
            s.set_attribute("orfeas.rag.graph_added", added)
        return out, GraphDiagnostics(entities=seeds, ranked=len(ranked), added=added,
                                     graph_ms=round((time.perf_counter() - t0) * 1e3, 2))
