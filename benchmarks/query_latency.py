"""Query latency of hybrid retrieval through `RagService`'s retriever (query embedding + BM25
encoding + fused search in the Qdrant Edge owner actor), at a few concurrencies, against a
same-run baseline: the bare Edge query on an in-process shard copy is not possible (one owner per
shard), so the baseline is the dense query embedding alone (the floor every query pays).

    python -m benchmarks.query_latency --collection eval-scifact [--queries /work/shared/eval/scifact/queries.jsonl]

This is the in-cluster part of `POST /v1/rag/query`; the HTTP version (gateway + auth in front)
belongs with the gateway. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.query_latency")


def _pct(xs: list[float], p: float) -> float:
    return round(float(np.percentile(np.array(xs) * 1e3, p)), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collection", default="eval-scifact")
    parser.add_argument("--queries", default="/work/shared/eval/scifact/queries.jsonl")
    parser.add_argument("--n", type=int, default=200, help="queries per concurrency level")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from config import load_settings
    from rag.retrieval import Retriever
    from rag.store import open_store

    settings = load_settings()
    if not ray.is_initialized():
        ray.init(address=settings.ray.address or "local", include_dashboard=False, log_to_driver=False,
                 namespace="orfeas")
    store = open_store(settings)
    retriever = Retriever(settings, store)
    texts = [json.loads(ln)["text"] for ln in Path(args.queries).read_text().splitlines() if ln.strip()][: args.n]
    retriever.retrieve(texts[0], args.collection, top_k=10)  # warm: model, actor, shard

    t_embed = []
    for t in texts:
        t0 = time.perf_counter()
        retriever.dense.embed([t])
        t_embed.append(time.perf_counter() - t0)

    levels = {}
    for c in [int(x) for x in args.concurrency.split(",")]:
        lat: list[float] = []

        def one(t: str) -> None:
            t0 = time.perf_counter()
            retriever.retrieve(t, args.collection, top_k=10, mode="hybrid")
            lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            list(pool.map(one, texts))
        wall = time.perf_counter() - t0
        levels[str(c)] = {"p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "qps": round(len(texts) / wall, 1)}
        log.info("concurrency %d: %s", c, levels[str(c)])
    result = {
        "benchmark": "query_latency", "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "collection": args.collection, "queries": len(texts), "mode": "hybrid", "fusion": settings.rag.fusion,
        "levels": levels,
        "baseline_query_embedding": {"p50_ms": _pct(t_embed, 50), "p99_ms": _pct(t_embed, 99)},
        "ratio_p50_vs_embedding": round(levels[next(iter(levels))]["p50_ms"] / max(1e-6, _pct(t_embed, 50)), 2),
        "target": "p99 <= 50 ms at concurrency 1 (over HTTP)",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"query_latency-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
