"""Admission control under overload: the tiny model behind a bounded queue, driven at its
capacity and at 2x and 5x it (closed-loop clients, streaming chat over HTTP through the gateway).

Capacity is the concurrency the deployment admits (`max_ongoing_requests` x replicas +
`max_queued_requests`); the baseline is the accepted requests' p99 time to first token at
capacity, measured in the same run. Targets (issue 18): at 2x and 5x, accepted p99 TTFT within
2x the baseline, and every rejected request answered (503 with Retry-After) in under 50 ms.

    .venv/bin/python benchmarks/admission.py [--requests 60] [--ongoing 2] [--queued 2] [--backoff retry-after]

A refused client waits what its 503's `Retry-After` says (`--backoff retry-after`, as OpenAI's
clients do), or a fixed number of seconds (`--backoff 0.05`: a client that ignores the header,
whose retry storm is itself load on the gateway).

Writes benchmarks/results/admission.json and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BODY = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16,
        "stream": True}


def p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(int(q * len(s)), len(s) - 1)]


async def one(c: httpx.AsyncClient, key: str) -> tuple[int, float, float | None, str | None]:
    """(status, answer or first-token seconds, ttft, the Retry-After header)."""
    start = time.perf_counter()
    async with c.stream("POST", "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, time.perf_counter() - start, None, r.headers.get("retry-after")
        ttft = None
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {") and '"content"' in line:
                ttft = time.perf_counter() - start
        return 200, time.perf_counter() - start, ttft, None


async def level(base: str, key: str, concurrency: int, requests: int, backoff: str = "retry-after") -> dict:
    """`concurrency` clients, each sending requests back to back, `requests` in all."""
    done: list[tuple[int, float, float | None, bool]] = []
    left = requests

    async def client(c):
        nonlocal left
        while left > 0:
            left -= 1
            done.append(await one(c, key))
            if done[-1][0] != 200:  # a refused client waits as it was told (or a fixed time)
                told = done[-1][3]
                await asyncio.sleep(float(told) if backoff == "retry-after" and told else float(
                    backoff if backoff != "retry-after" else 1))

    async with httpx.AsyncClient(base_url=base, timeout=120,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    ok = [d for d in done if d[0] == 200]
    refused = [d for d in done if d[0] != 200]
    ttfts = [d[2] for d in ok if d[2] is not None]
    return {"concurrency": concurrency, "requests": len(done), "accepted": len(ok), "rejected": len(refused),
            "statuses": sorted({d[0] for d in done}),
            "rejected_with_retry_after": sum(1 for d in refused if d[3]),
            "accepted_ttft_p50_s": p(ttfts, 0.5), "accepted_ttft_p99_s": p(ttfts, 0.99),
            "rejected_answer_p50_ms": p([d[1] * 1000 for d in refused], 0.5),
            "rejected_answer_max_ms": max((d[1] * 1000 for d in refused), default=None),
            "rejected_answer_p99_ms": (p([d[1] * 1000 for d in refused], 0.99))}


def table(rows: list[dict], base_p99: float) -> str:
    out = ["| offered | requests | accepted | rejected (503) | accepted p99 TTFT | vs capacity "
           "| rejected answer p50 / max |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r["accepted_ttft_p99_s"] / base_p99 if r["accepted_ttft_p99_s"] and base_p99 else None
        rej = f"{r['rejected_answer_p50_ms']:.1f} / {r['rejected_answer_max_ms']:.1f} ms" \
            if r["rejected_answer_max_ms"] is not None else "-"
        out.append(f"| {r['label']} ({r['concurrency']} clients) | {r['requests']} | {r['accepted']} | {r['rejected']} "
                   f"| {r['accepted_ttft_p99_s'] * 1000:.0f} ms | {ratio:.2f}x | {rej} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--ongoing", type=int, default=2)
    ap.add_argument("--queued", type=int, default=2)
    ap.add_argument("--port", type=int, default=18433)
    ap.add_argument("--backoff", default="retry-after",
                    help="what a refused client waits: 'retry-after' (the header) or seconds")
    args = ap.parse_args()

    from cluster.deploy import deploy, wait_running
    from config import ModelSpec, Settings
    from models.tiny import build_tiny_chat_model
    from security.keys import keystore
    from serve.applications import resolve_ingress

    work = Path(tempfile.mkdtemp(prefix="orfeas-bench-"))
    model_dir = build_tiny_chat_model(work / "tiny-chat")
    settings = resolve_ingress(Settings(
        data_dir=work / "data", serve={"host": "127.0.0.1", "port": args.port},
        rag={"enabled": False}, agents={"enabled": False},
        models=[ModelSpec(id="tiny-chat", engine="transformers", source=str(model_dir), max_context=256,
                          max_ongoing_requests=args.ongoing, max_queued_requests=args.queued)]))
    capacity = args.ongoing + args.queued
    # A fresh instance (never a head someone else started on this machine).
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        names = deploy(settings)
        assert set(wait_running(names).values()) == {"RUNNING"}
        _, key = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin", None, "bench"))
        base = f"http://127.0.0.1:{args.port}"
        asyncio.run(level(base, key, 1, 5))  # warm up
        rows = []
        for label, factor in (("capacity", 1), ("2x", 2), ("5x", 5)):
            row = asyncio.run(level(base, key, capacity * factor, args.requests * factor, args.backoff))
            row["label"] = label
            rows.append(row)
            print(json.dumps(row))
    finally:
        serve.shutdown()
        ray.shutdown()

    base_p99 = rows[0]["accepted_ttft_p99_s"]
    for r in rows:
        r["ttft_p99_vs_capacity"] = r["accepted_ttft_p99_s"] / base_p99 if base_p99 and r["accepted_ttft_p99_s"] else None
    result = {"benchmark": "admission", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "model": "tiny-chat (random weights)", "ingress": settings.serve.ingress,
              "backoff": args.backoff, "max_ongoing_requests": args.ongoing, "max_queued_requests": args.queued, "capacity": capacity,
              "rows": rows, "targets": {"ttft_p99_vs_capacity": 2.0, "rejected_answer_max_ms": 50.0}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "admission.json").write_text(json.dumps(result, indent=1))
    print(table(rows, base_p99))


if __name__ == "__main__":
    main()
