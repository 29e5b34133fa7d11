"""Fusion of the three ranked lists (MiniLM dense, BM25, e5) outside the store, on SciFact (issue 19).

Reads an existing collection made with `rag.second_dense` on (the e5 whole-corpus eval's, e.g.
/tmp/e5full/data), fetches each train query's three chunk lists with their scores once (Qdrant
Edge in this process, no Ray), then ranks documents by several fusions in numpy: the shipped
one (Qdrant's DBSF over 100-chunk prefetches, then grouped by document) as the baseline of the
same run, its reproduction here, and document-level fusions (each list's chunks grouped to their
document's best score first) with DBSF or z-score normalisation over deeper lists, and a weight
grid. nDCG@10 per variant; writes benchmarks/results/fusion_study.json.

    .venv/bin/python benchmarks/fusion_study.py --data-dir /tmp/e5full/data [--collection eval-scifact] [--depth 1000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SCIFACT = ROOT.parent / "shared" / "eval" / "scifact"
LISTS = ("dense", "sparse", "e5")


def fetch(data_dir: str, collection: str, depth: int) -> tuple[dict, dict]:
    """Per query: each list's chunks [(corpus id, score, chunk id)], and Qdrant's own fused list."""
    from config.settings import settings_from_dict
    from rag.evaluation import load_beir
    from rag.retrieval import Retriever
    from rag.store import EdgeStore, SearchSpec

    settings = settings_from_dict({"data_dir": data_dir, "rag": {"second_dense": {"enabled": True}}})
    store = EdgeStore(Path(data_dir) / "qdrant_edge")
    _, queries, qrels = load_beir(SCIFACT, "train")
    retriever = Retriever(settings, store)
    qids = list(queries)
    dense, sparse = retriever.encode_queries([queries[q] for q in qids])
    second = retriever.encode_second([queries[q] for q in qids])
    fields = ["doc_id", "record_id"]
    out = {}
    for i, qid in enumerate(qids):
        d, e = [float(x) for x in dense[i]], [float(x) for x in second[i]]
        s = sparse[i] if sparse[i].indices else None
        specs = {
            "dense": SearchSpec(mode="dense", dense=d, limit=depth, prefetch=depth, payload_fields=fields),
            "sparse": SearchSpec(mode="sparse", sparse=s, limit=depth, prefetch=depth, payload_fields=fields),
            # DBSF over the e5 list alone (weights 0:0:1 drop the others): e5's ranking, scores normalised
            "e5": SearchSpec(mode="hybrid", dense=d, sparse=s, second=e, weights=[0.0, 0.0, 1.0], fusion="dbsf",
                             limit=depth, prefetch=depth, payload_fields=fields),
            "qdrant_dbsf": SearchSpec(mode="hybrid", dense=d, sparse=s, second=e, fusion="dbsf", limit=400,
                                      prefetch=100, payload_fields=fields),
        }
        lists = {}
        for name, spec in specs.items():
            if spec.mode == "sparse" and s is None:
                lists[name] = []
                continue
            _, hits = store.search_resolved(collection, spec)
            lists[name] = [(h.payload.get("record_id") or h.payload.get("doc_id"), h.score, h.id) for h in hits]
        out[qid] = lists
    return out, qrels


def first_per_doc(docs) -> list[str]:
    seen: set[str] = set()
    out = []
    for d in docs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def normaliser(scores: list[float], how: str):
    s = np.asarray(scores, dtype=float)
    mu, sd = s.mean(), s.std() or 1.0
    if how == "dbsf":  # Qdrant's: mean +- 3 sigma mapped to [0, 1]
        return lambda x: (x - (mu - 3 * sd)) / (6 * sd)
    return lambda x: (x - mu) / sd  # z-score


def fused(lists: dict, weights: list[float], how: str, level: str, depth: int) -> list[str]:
    total: dict = {}
    for name, w in zip(LISTS, weights):
        ranked = lists[name][:depth]
        if not ranked or w == 0:
            continue
        f = normaliser([s for _, s, _ in ranked], how)
        items: dict = {}
        for doc, score, chunk in ranked:
            key = doc if level == "doc" else (doc, chunk)
            items[key] = max(items.get(key, -1e18), f(score))
        for key, v in items.items():
            total[key] = total.get(key, 0.0) + w * v
    order = [k for k, _ in sorted(total.items(), key=lambda kv: -kv[1])]
    return order if level == "doc" else first_per_doc(k[0] for k in order)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--collection", default="eval-scifact")
    ap.add_argument("--depth", type=int, default=1000, help="chunks fetched per list")
    args = ap.parse_args()
    from rag.evaluation import ndcg_at

    t0 = time.perf_counter()
    runs, qrels = fetch(args.data_dir, args.collection, args.depth)
    fetch_s = time.perf_counter() - t0
    qids = [q for q in qrels if q in runs]

    def ndcg(rank) -> float:
        return round(sum(ndcg_at(rank(runs[q]), qrels[q]) for q in qids) / len(qids), 4)

    rows = {"qdrant DBSF, prefetch 100, grouped (shipped)": ndcg(lambda l: first_per_doc(d for d, _, _ in l["qdrant_dbsf"]))}
    for name in LISTS:
        rows[f"{name} alone"] = ndcg(lambda l, n=name: first_per_doc(d for d, _, _ in l[n]))
    for how, level in (("dbsf", "chunk"), ("dbsf", "doc"), ("z", "chunk"), ("z", "doc")):
        for depth in sorted({100, 300, args.depth}):
            rows[f"{how}, {level} level, depth {depth}, 1:1:1"] = ndcg(
                lambda l: fused(l, [1.0, 1.0, 1.0], how, level, depth))
    grid = []
    for how in ("dbsf", "z"):
        for s, e in itertools.product((0.8, 1.0, 1.2, 1.5), repeat=2):
            grid.append((ndcg(lambda l: fused(l, [1.0, s, e], how, "doc", args.depth)), how, [1.0, s, e]))
    grid.sort(key=lambda g: -g[0])
    result = {"benchmark": "fusion_study", "collection": args.collection, "queries": len(qids), "depth": args.depth,
              "fetch_seconds": round(fetch_s, 1), "machine": f"{os.cpu_count()} cpus", "ndcg@10": rows,
              "weight_grid_doc_level": [{"ndcg@10": n, "normalisation": h, "weights": w} for n, h, w in grid]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fusion_study.json").write_text(json.dumps(result, indent=1))
    print("| fusion (809 SciFact train queries, one collection) | nDCG@10 |\n| --- | --- |")
    for k, v in rows.items():
        print(f"| {k} | {v} |")
    for n, h, w in grid[:5]:
        print(f"| {h}, doc level, depth {args.depth}, weights {w} | {n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
