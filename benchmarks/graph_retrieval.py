"""Graph-augmented retrieval (rag.graph) against plain hybrid retrieval, on a BEIR split, one run.

    python -m benchmarks.graph_retrieval [--dataset /work/shared/eval/scifact] [--limit 200]

The real ingest job (which extracts each chunk's entities and relations) builds a collection of
the first `--limit` corpus documents plus every judged one (a subset: say so when quoting; 0:
the whole corpus); then `rag.evaluation` scores plain hybrid retrieval (DBSF, the default, and
RRF) and the same with the graph's chunks fused in, for a few graph settings, all against that
one collection. The figure is the ratio graph / plain nDCG@10 (same run, same collection).
Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("benchmarks.graph_retrieval")
DEFAULT_DATASET = "/work/shared/eval/scifact"

# (label, rag.graph overrides): the shipped defaults first, then the levers
SETTINGS = [
    ("default", {}),
    ("weight 0.25", {"weight": 0.25}),
    ("own chunks only (neighbours 0)", {"neighbours": 0}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=200, help="first N corpus documents plus the judged ones (0: all)")
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--settings", type=int, default=len(SETTINGS), help="try the first N graph settings")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from benchmarks.embedding_int8 import subset
    from config import Settings
    from config.names import ACTOR_NAMESPACE
    from rag.evaluation import evaluate
    from rag.graph import KnowledgeGraph  # noqa: F401 - fail early if the module is broken
    from rag.store import open_store

    load_start = os.getloadavg()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="orfeas-graph-bench-") as tmp:
        work = Path(tmp)
        dataset = Path(args.dataset)
        data = subset(dataset, args.split, args.limit, work) if args.limit else dataset
        settings = Settings(data_dir=work / "data", rag={"embed_actors": 1})
        ray.init(num_cpus=args.num_cpus, namespace=ACTOR_NAMESPACE, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            store = open_store(settings)
            plain = {"hybrid-dbsf": {"mode": "hybrid", "fusion": "dbsf"},
                     "hybrid-rrf": {"mode": "hybrid", "fusion": "rrf"}}
            t0 = time.perf_counter()
            base = evaluate(str(data), args.split, settings=settings, collection="eval-graph", variants=plain,
                            store=store, max_queries=args.max_queries)
            ingest_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            graph = store.resolve("eval-graph")
            from rag.retrieval import Retriever

            kg = Retriever(settings, store).graphs.get(graph)
            build_s = time.perf_counter() - t1
            runs = []
            for label, over in SETTINGS[:args.settings]:
                s = settings.model_copy(deep=True)
                s.rag.graph = s.rag.graph.model_copy(update=over)
                out = evaluate(str(data), args.split, settings=s, collection="eval-graph", reuse=True, store=store,
                               max_queries=args.max_queries,
                               variants={"hybrid-dbsf+graph": {"mode": "hybrid", "fusion": "dbsf", "graph": True},
                                         "hybrid-rrf+graph": {"mode": "hybrid", "fusion": "rrf", "graph": True}})
                runs.append({"label": label, "graph": s.rag.graph.model_dump(), "metrics": out["metrics"],
                             "query_seconds": out["query_seconds"]})
        finally:
            ray.shutdown()
    b = base["metrics"]
    result = {
        "benchmark": "graph_retrieval", "started": started, "host": platform.node(),
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "dataset": str(dataset), "split": args.split, "limit": args.limit, "queries": base["queries"],
        "chunks": kg.chunks, "entities": len(kg.nodes), "edges": len(kg.edges),
        "ingest_seconds": round(ingest_s, 1), "graph_build_seconds": round(build_s, 2),
        "plain": {k: b[k] for k in ("hybrid-dbsf", "hybrid-rrf")}, "plain_query_seconds": base["query_seconds"],
        "graph": runs,
        "ratio_ndcg": {r["label"]: {"dbsf": round(r["metrics"]["hybrid-dbsf+graph"]["ndcg@10"]
                                              / b["hybrid-dbsf"]["ndcg@10"], 4),
                                    "rrf": round(r["metrics"]["hybrid-rrf+graph"]["ndcg@10"]
                                             / b["hybrid-rrf"]["ndcg@10"], 4)} for r in runs},
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"graph_retrieval-{started.replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
