"""Retrieval quality on a BEIR dataset: nDCG@10, Recall@100 and MRR@10 for dense, sparse and
hybrid retrieval, as JSON.

    python -m jobs.eval_retrieval --dataset DIR --split train [--output FILE]   (the job over `evaluate`)

The corpus goes through the real ingest job (Ray Data, chunking, embedding, upsert) into a
fresh version of collection `eval-<dataset>` (`--rebuild`); results are grouped per document
(a document's score is its best chunk's), and corpus ids come back through the chunk payload.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from config import Settings, load_settings

log = logging.getLogger(__name__)

RESULT_TAG = "ORFEAS_EVAL"


def load_beir(dataset: str | Path, split: str) -> tuple[Path, dict[str, str], dict[str, dict[str, int]]]:
    d = Path(dataset)
    corpus = d / "corpus.jsonl"
    qfile = d / "queries.jsonl"
    qrels_file = d / "qrels" / f"{split}.tsv"
    for f in (corpus, qfile, qrels_file):
        if not f.exists():
            from rag.errors import SourceUnreadable

            raise SourceUnreadable(f"BEIR dataset is missing {f}", "dataset")
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_file) as f:
        reader = csv.reader(f, delimiter="\t")
        for row in reader:
            if not row or row[0] in ("query-id", "query_id"):
                continue
            qid, did, score = row[0], row[1], int(row[2])
            if score > 0:
                qrels.setdefault(qid, {})[did] = score
    queries = {}
    with open(qfile) as f:
        for line in f:
            if line.strip():
                q = json.loads(line)
                if str(q["_id"]) in qrels:
                    queries[str(q["_id"])] = q["text"]
    return corpus, queries, qrels


def ndcg_at(ranked: list[str], rels: dict[str, int], k: int = 10) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rels.values(), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: list[str], rels: dict[str, int], k: int = 100) -> float:
    return len(set(ranked[:k]) & set(rels)) / len(rels) if rels else 0.0


def mrr_at(ranked: list[str], rels: dict[str, int], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate_runs(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    qids = [q for q in qrels if q in runs]
    n = max(1, len(qids))
    return {
        "ndcg@10": round(sum(ndcg_at(runs[q], qrels[q]) for q in qids) / n, 4),
        "recall@100": round(sum(recall_at(runs[q], qrels[q]) for q in qids) / n, 4),
        "mrr@10": round(sum(mrr_at(runs[q], qrels[q]) for q in qids) / n, 4),
        "queries": len(qids),
    }


DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"mode": "dense"},
    "sparse": {"mode": "sparse"},
    "hybrid-rrf": {"mode": "hybrid", "fusion": "rrf", "second_dense": False},
    "hybrid-dbsf": {"mode": "hybrid", "fusion": "dbsf", "second_dense": False},
    "hybrid-dbsf-doc": {"mode": "hybrid", "fusion": "dbsf-doc", "second_dense": False},
}
# With rag.second_dense on: the e5 list fused in as a third (the same queries, the same collection).
SECOND_VARIANTS: dict[str, dict[str, Any]] = {
    "hybrid-rrf+e5": {"mode": "hybrid", "fusion": "rrf", "second_dense": True},
    "hybrid-dbsf+e5": {"mode": "hybrid", "fusion": "dbsf", "second_dense": True},
    "hybrid-dbsf-doc+e5": {"mode": "hybrid", "fusion": "dbsf-doc", "second_dense": True},
}
WEIGHT_GRID = (0.5, 1.0, 1.5, 2.0)


def weight_variants(fusion: str = "dbsf", grid: tuple[float, ...] = WEIGHT_GRID) -> dict[str, dict[str, Any]]:
    """Three-way fusion over a grid of weights, dense 1.0 (DBSF takes them in steps of 0.5;
    RRF and dbsf-doc as they are)."""
    return {f"hybrid-{fusion}+e5 w1:{s:g}:{e:g}": {"mode": "hybrid", "fusion": fusion, "second_dense": True,
                                                   "weights": [1.0, s, e]}
            for s in grid for e in grid}
# Graph-augmented retrieval (rag.graph): the knowledge graph's chunks fused with the search's.
GRAPH_VARIANTS: dict[str, dict[str, Any]] = {
    "hybrid-rrf+graph": {"mode": "hybrid", "fusion": "rrf", "graph": True},
    "hybrid-dbsf+graph": {"mode": "hybrid", "fusion": "dbsf", "graph": True},
}


def run_queries(retriever, collection: str, queries: dict[str, str], variants: dict[str, dict[str, Any]],
                top_k: int = 100) -> dict[str, dict[str, list[str]]]:
    qids = list(queries)
    dense, sparse = retriever.encode_queries([queries[q] for q in qids])
    second = None
    if any(v.get("second_dense") for v in variants.values()):
        second = retriever.encode_second([queries[q] for q in qids])
    out: dict[str, dict[str, list[str]]] = {}
    for name, v in variants.items():
        runs = {}
        for i, qid in enumerate(qids):
            use = bool(v.get("second_dense"))
            chunks, _ = retriever.retrieve(queries[qid], collection, top_k=top_k, mode=v["mode"],
                                           fusion=v.get("fusion"), group_by_doc=True, vectors=(dense[i], sparse[i]),
                                           payload_fields=["doc_id", "record_id"], graph=v.get("graph", False),
                                           second_dense=use, second_vector=second[i] if use else None,
                                           weights=v.get("weights"))
            runs[qid] = [c.record_id for c in chunks]
        out[name] = runs
    return out


def evaluate(dataset: str, split: str = "train", *, settings: Settings | None = None, collection: str | None = None,
             reuse: bool = False, variants: dict[str, dict[str, Any]] | None = None, store=None,
             max_queries: int | None = None) -> dict[str, Any]:
    from rag.ingest import run_ingest
    from rag.retrieval import Retriever
    from rag.store import open_store

    settings = settings or load_settings()
    corpus, queries, qrels = load_beir(dataset, split)
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    name = collection or f"eval-{Path(dataset).resolve().name}"
    store = store or open_store(settings)
    ingest = None
    if not (reuse and store.get_alias(name)):
        ingest = run_ingest(str(corpus), name, settings=settings, rebuild=True, store=store)
    settings.rag.max_top_k = max(settings.rag.max_top_k, 100)
    retriever = Retriever(settings, store)
    t0 = time.perf_counter()
    runs = run_queries(retriever, name, queries, variants or DEFAULT_VARIANTS)
    qsecs = time.perf_counter() - t0
    metrics = {v: evaluate_runs(r, qrels) for v, r in runs.items()}
    configured = f"hybrid-{settings.rag.fusion}" + ("+e5" if settings.rag.second_dense.enabled else "")
    if configured in metrics:
        metrics["hybrid"] = dict(metrics[configured], fusion=settings.rag.fusion)
    r = settings.rag
    return {
        "dataset": str(Path(dataset).resolve()), "split": split, "collection": name,
        "version_collection": store.resolve(name), "queries": len(queries),
        "metrics": metrics,
        "config": {"chunk_tokens": r.chunk_tokens, "chunk_overlap": r.chunk_overlap, "bm25_k": r.bm25_k,
                   "bm25_b": r.bm25_b, "bm25_avg_len": r.bm25_avg_len, "fusion": r.fusion, "rrf_k": r.rrf_k,
                   "prefetch": r.prefetch, "embedding_model": r.embedding_model, "grouped_by_doc": True,
                   "second_dense": r.second_dense.model_dump() if r.second_dense.enabled else None},
        "ingest": ingest.model_dump() if ingest else None,
        "query_seconds": round(qsecs, 2),
    }
