"""Hybrid RAG queries over HTTP (`POST /v1/rag/query`: the HTTP ingress, then the RAG app's own
route with auth) against the same queries through the RAG application's Serve handle, in one
run, at a few concurrencies; the two paths alternate in rounds so drift hits both alike.

    .venv/bin/python -m benchmarks.query_latency --config /work/bench/orfeas.yaml --collection eval-scifact \
        [--ingress auto|haproxy|proxy]

The collection must exist in the configured data directory (`orfeas eval retrieval` or
`orfeas ingest` builds it). Both paths run retrieval only (`answer: false`: query embedding,
BM25 encoding, fused search in the Qdrant Edge owner actor, packing), so the ratio is what the
HTTP path adds; a last level measures full extractive answers over HTTP for reference.
Writes benchmarks/results/query_latency.json and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "eval" / "scifact"  # ../shared next to the repo


def summarise(latencies: list[float], wall: float) -> dict:
    ms = np.array(latencies) * 1e3
    return {"requests": len(latencies), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "qps": round(len(latencies) / wall, 1)}


ROUNDS = 5  # each level's queries are split into this many blocks, each run through both paths


async def run_block(call, queries: list[str], concurrency: int, latencies: list[float]) -> float:
    """Run the queries with `concurrency` in flight; append each latency; return the wall time."""
    pending = list(reversed(queries))

    async def worker():
        while pending:
            q = pending.pop()
            t0 = time.perf_counter()
            await call(q)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def run_paths(paths: dict, queries: list[str], concurrency: int) -> dict[str, dict]:
    """Every path over the same queries, alternating block by block."""
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    walls = dict.fromkeys(paths, 0.0)
    size = max(1, -(-len(queries) // ROUNDS))
    for start in range(0, len(queries), size):
        block = queries[start:start + size]
        for name, call in paths.items():
            walls[name] += await run_block(call, block, concurrency, latencies[name])
    return {name: summarise(latencies[name], walls[name]) for name in paths}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="orfeas.yaml whose data_dir holds the collection")
    parser.add_argument("--collection", default="eval-scifact")
    parser.add_argument("--queries", default=str(SCIFACT / "queries.jsonl"))
    parser.add_argument("--n", type=int, default=300, help="queries per level")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--ingress", choices=["auto", "haproxy", "proxy"], default="auto",
                        help="serve.ingress: Serve's HAProxy ingress or its Python proxy")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from cluster.deploy import deploy, wait_running
    from security.keys import keystore
    from config import load_settings
    from config.names import ACTOR_NAMESPACE
    from serve.applications import RAG_APP, resolve_ingress

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = load_settings(args.config)
    settings.serve.host, settings.serve.port = "127.0.0.1", port
    settings.serve.ingress = args.ingress
    settings = resolve_ingress(settings)
    settings.models = [m for m in settings.models if m.task == "embedding"]  # no chat model needed
    settings.rag.max_top_k = max(settings.rag.max_top_k, args.top_k)
    # Every query is asked on both paths and at every level: with the answer cache on, the HTTP
    # path (the only one that uses it) would serve the repeats from it and measure the cache.
    settings.rag.cache.enabled = False
    texts = [json.loads(ln)["text"] for ln in Path(args.queries).read_text().splitlines() if ln.strip()][: args.n]
    body = {"collection": args.collection, "top_k": args.top_k, "mode": "hybrid", "answer": False,
            "include_passages": False}

    ray.init(include_dashboard=False, log_to_driver=False, namespace=ACTOR_NAMESPACE)
    names = deploy(settings)
    states = wait_running(names, timeout_s=600)
    if any(s != "RUNNING" for s in states.values()):
        raise SystemExit(f"applications did not start: {states}")
    _, key = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin", None, "query_latency benchmark"))
    handle = serve.get_app_handle(RAG_APP)
    url = f"http://127.0.0.1:{port}/v1/rag/query"

    async def run() -> dict:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            async def over_http(q: str, answer: bool = False) -> None:
                r = await client.post(url, json=dict(body, query=q, answer=answer))
                r.raise_for_status()

            async def through_handle(q: str) -> None:
                await handle.query.remote(dict(body, query=q), None)

            for q in texts[:20]:  # warm both paths: model, owner actor, shard, connections
                await over_http(q)
                await through_handle(q)
            levels = []
            for c in [int(x) for x in args.concurrency.split(",")]:
                measured = await run_paths({"handle": through_handle, "http": over_http}, texts, c)
                direct, http = measured["handle"], measured["http"]
                levels.append({"concurrency": c, "handle": direct, "http": http,
                               "added_p50_ms": round(http["p50_ms"] - direct["p50_ms"], 2),
                               "qps_ratio": round(http["qps"] / direct["qps"], 3)})
            answered = (await run_paths({"answer": lambda q: over_http(q, True)}, texts[:100], 1))["answer"]
            return {"levels": levels, "extractive_answer_http_c1": answered}

    try:
        out = asyncio.run(run())
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"benchmark": "query_latency", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "collection": args.collection,
              "queries": len(texts), "top_k": args.top_k, "mode": "hybrid", "fusion": settings.rag.fusion,
              "ingress": settings.serve.ingress, **out}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "query_latency.json").write_text(json.dumps(result, indent=2))
    print("| concurrency | handle p50 / p99 ms | HTTP p50 / p99 ms | HTTP queries/s | HTTP/handle throughput |")
    print("| --- | --- | --- | --- | --- |")
    for lv in out["levels"]:
        h, d = lv["http"], lv["handle"]
        print(f"| {lv['concurrency']} | {d['p50_ms']:.1f} / {d['p99_ms']:.1f} | {h['p50_ms']:.1f} / {h['p99_ms']:.1f} "
              f"| {h['qps']:.0f} | {lv['qps_ratio']:.2f} |")
    a = out["extractive_answer_http_c1"]
    print(f"\nfull extractive answers over HTTP, concurrency 1: p50 {a['p50_ms']:.1f} ms, p99 {a['p99_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
