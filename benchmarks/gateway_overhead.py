"""What the gateway adds: the same tiny model through its Serve handle vs through the gateway over HTTP.

Both paths run in one process against one deployment in the same run, so the ratio compares
like with like. The HTTP path pays for the proxy, authentication, validation, routing and SSE.
A third pair measures Serve's own floor in the same run: a trivial FastAPI deployment that
streams the same SSE frames with no model, over HTTP vs through its handle. What the gateway
adds beyond that floor is ORFEAS's own cost.

    .venv/bin/python benchmarks/gateway_overhead.py [--requests 200] [--concurrency 1 4 16]

Writes benchmarks/results/gateway_overhead.json and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAYLOAD = {"messages": [{"role": "user", "content": "Say something short."}]}
MAX_TOKENS = 8
ROUNDS = 5  # each level's requests are split into this many alternating blocks per path


FRAMES = ['data: {"choices":[{"delta":{"role":"assistant","content":"x"}}]}\n\n',
          'data: {"choices":[{"delta":{"content":" y"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n']


def floor_app(settings):
    """A Serve app with nothing in it but an SSE stream: the cost of any Serve HTTP route (its
    replica runs with the same Serve options as ORFEAS's, so it sits behind the same ingress)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from serve.applications import replica_actor_options

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=64, ray_actor_options=replica_actor_options(settings.serve))
    @serve.ingress(api)
    class Floor:
        async def frames(self):
            for f in FRAMES:
                yield f

        @api.post("/")
        async def sse(self):
            return StreamingResponse(self.frames(), media_type="text/event-stream")

    return Floor.bind()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarise(latencies: list[float], ttfts: list[float], wall: float) -> dict:
    return {
        "requests": len(latencies),
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "req_per_s": len(latencies) / wall,
    }


async def streamed_chat(client: httpx.AsyncClient, path: str, body: dict) -> float:
    """One streamed chat completion over HTTP, read to its end: the time its first content token
    arrived (its end when none did). The request loop of every gateway benchmark."""
    first = None
    async with client.stream("POST", path, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter()
    return first or time.perf_counter()


async def run_block(call, concurrency: int, n: int) -> tuple[list[float], list[float], float]:
    """`n` calls, `concurrency` at a time: their latencies, times to first token and wall time."""
    latencies, ttfts = [], []
    queue = list(range(n))

    async def worker():
        while queue:
            queue.pop()
            start = time.perf_counter()
            first = await call()
            end = time.perf_counter()
            latencies.append(end - start)
            ttfts.append(first - start)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, ttfts, time.perf_counter() - t0


async def run_interleaved(calls: dict, concurrency: int, n: int, rounds: int = ROUNDS) -> dict[str, dict]:
    """Every path `n` times, in `rounds` alternating blocks: a slow spell on the machine (GC, a
    health refresh, another process) lands on every path alike instead of on one path's block."""
    acc = {name: ([], [], 0.0) for name in calls}
    round_p50s: dict[str, list[float]] = {name: [] for name in calls}
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for name, call in calls.items():
            lat, ttft, wall = await run_block(call, concurrency, per_round)
            acc[name] = (acc[name][0] + lat, acc[name][1] + ttft, acc[name][2] + wall)
            round_p50s[name].append(statistics.median(lat) * 1e3)
    # Each round's p50 too: paths compared round by round see the same spell of the machine.
    return {name: {**summarise(*acc[name]), "round_p50_ms": round_p50s[name]} for name in calls}


async def measure(handle, floor, base_url: str, key: str, levels: list[int], n: int, model: str = "tiny-chat",
                  max_tokens: int = MAX_TOKENS) -> list[dict]:
    from models.protocol import GenerationKind, GenerationParams, GenerationRequest

    request = GenerationRequest(kind=GenerationKind.CHAT, messages=PAYLOAD["messages"],
                                params=GenerationParams(max_tokens=max_tokens, temperature=0.0)).model_dump(mode="json")
    stream_handle = handle.options(stream=True)

    async def direct() -> float:
        first = None
        async for event in stream_handle.generate.remote(request):
            if first is None and event.get("text"):
                first = time.perf_counter()
        return first or time.perf_counter()

    client = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                               limits=httpx.Limits(max_connections=max(levels) * 2))
    body = {"model": model, **PAYLOAD, "max_tokens": max_tokens, "temperature": 0, "stream": True}

    async def via_gateway() -> float:
        return await streamed_chat(client, "/v1/chat/completions", body)

    floor_stream = floor.options(stream=True)

    async def floor_direct() -> float:
        first = None
        async for _ in floor_stream.frames.remote():
            first = first or time.perf_counter()
        return first or time.perf_counter()

    async def floor_http() -> float:
        first = None
        async with client.stream("POST", "/floor/", json=body) as resp:
            resp.raise_for_status()
            async for _ in resp.aiter_lines():
                first = first or time.perf_counter()
        return first or time.perf_counter()

    rows = []
    for c in levels:
        calls = {"direct": direct, "gateway": via_gateway, "floor_direct": floor_direct, "floor_http": floor_http}
        await run_interleaved(calls, c, c * 2, rounds=1)  # warm every path
        r = await run_interleaved(calls, c, n)
        d, g, fd, fh = r["direct"], r["gateway"], r["floor_direct"], r["floor_http"]
        rows.append({
            "concurrency": c,
            "direct": d,
            "gateway": g,
            "added_p50_ms": g["p50_ms"] - d["p50_ms"],
            "added_p99_ms": g["p99_ms"] - d["p99_ms"],
            "ttft_added_p50_ms": g["ttft_p50_ms"] - d["ttft_p50_ms"],
            "throughput_ratio": g["req_per_s"] / d["req_per_s"],
            "serve_floor": {"handle": fd, "http": fh, "added_p50_ms": fh["p50_ms"] - fd["p50_ms"]},
        })
        print(json.dumps(rows[-1], indent=1))
    await client.aclose()
    return rows


def table(rows: list[dict]) -> str:
    out = ["| concurrency | direct p50 / p99 (ms) | gateway p50 / p99 (ms) | added p50 / p99 (ms) | TTFT added p50 (ms) "
           "| direct req/s | gateway req/s | throughput ratio | Serve floor added p50 (ms) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, g = r["direct"], r["gateway"]
        out.append(f"| {r['concurrency']} | {d['p50_ms']:.1f} / {d['p99_ms']:.1f} | {g['p50_ms']:.1f} / {g['p99_ms']:.1f} "
                   f"| {r['added_p50_ms']:.1f} / {r['added_p99_ms']:.1f} | {r['ttft_added_p50_ms']:.1f} "
                   f"| {d['req_per_s']:.0f} | {g['req_per_s']:.0f} | {r['throughput_ratio']:.2f} "
                   f"| {r['serve_floor']['added_p50_ms']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--ingress", choices=["auto", "haproxy", "proxy"], default="auto",
                    help="serve.ingress: Serve's HAProxy ingress or its Python proxy")
    args = ap.parse_args()

    from cluster.deploy import deploy, wait_running
    from security.keys import keystore
    from config import ModelSpec, Settings
    from models.tiny import build_tiny_chat_model
    from serve.applications import model_app_name, resolve_ingress

    work = Path(tempfile.mkdtemp(prefix="orfeas-bench-"))
    model_dir = build_tiny_chat_model(work / "tiny-chat")
    settings = Settings(
        data_dir=work / "data",
        serve={"host": "127.0.0.1", "port": args.port},
        rag={"enabled": False}, agents={"enabled": False},  # the chat path alone
        models=[ModelSpec(id="tiny-chat", engine="transformers", source=str(model_dir), max_context=256,
                          max_ongoing_requests=64)],
    )
    settings.serve.ingress = args.ingress
    settings = resolve_ingress(settings)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        names = deploy(settings)
        assert set(wait_running(names).values()) == {"RUNNING"}
        _, key = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin", None, "bench"))
        floor = serve.run(floor_app(settings), name="serve-floor", route_prefix="/floor")
        handle = serve.get_app_handle(model_app_name("tiny-chat"))
        rows = asyncio.run(measure(handle, floor, f"http://127.0.0.1:{args.port}", key, args.concurrency,
                                   args.requests))
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "benchmark": "gateway_overhead",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": "tiny-chat (random weights, 2 layers, hidden 64)",
        "ingress": settings.serve.ingress,
        "max_tokens": MAX_TOKENS,
        "requests_per_level": args.requests,
        "rows": rows,
        "targets": {"added_p50_ms": 2.0, "throughput_ratio": 0.8},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gateway_overhead.json").write_text(json.dumps(result, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
