"""Admission control under overload: the tiny model behind a bounded queue, driven at its
capacity and at 2x and 5x it (closed-loop clients, streaming chat over HTTP through the gateway).

Capacity is the concurrency the deployment admits (`max_ongoing_requests` x replicas +
`max_queued_requests` per gateway replica: Serve bounds that queue per caller); the baseline is the accepted requests' p99 time to first token at
capacity, measured in the same run. Targets (issue 18): at 2x and 5x, accepted p99 TTFT within
2x the baseline, and every rejected request answered (503 with Retry-After) in under 50 ms.

    .venv/bin/python benchmarks/admission.py [--requests 60] [--ongoing 2] [--queued 2] [--backoff retry-after]
        [--gateway-replicas 1] [--out admission.json]

A refused client waits what its 503 says (`--backoff retry-after`, as OpenAI's clients do:
`retry-after-ms` when present, else `Retry-After`), or a fixed number of seconds (`--backoff
0.05`: a client that ignores the header, whose retry storm is itself load on the gateway).

The clients are one process on uvloop with aiohttp (lighter than httpx: the client shares the
cores with the gateway); a 10 ms ticker beside them records how late the client's own loop ran
(`client_loop_lag_*`), so a slow client shows instead of reading as slow refusals.

Where a refusal's time goes (HAProxy ingress): the benchmark is HAProxy's syslog target (a UDP
socket on loopback, `RAY_SERVE_HAPROXY_LOG_TARGET`) and reads each request's `option httplog`
timers: TR (receiving the client's request), Tw + Tc (queue, connect), Tr (the gateway replica:
from the request sent to it until its response headers), Ta (HAProxy's whole answer). Each log
line is matched to the client's request by the client's TCP port and order, so a refusal's
client-side time (what the client saw minus HAProxy's Ta: the client's loop, its kernel) and its
server-side time are both reported (`server_side`).

Writes benchmarks/results/admission.json and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aiohttp  # noqa: E402
import ray  # noqa: E402
import uvloop  # noqa: E402
from ray import serve  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BODY = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16,
        "stream": True}


def p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(int(q * len(s)), len(s) - 1)]


# HAProxy's `option httplog` line: client ip:port ... TR/Tw/Tc/Tr/Ta status ...
HTTPLOG = re.compile(rb" [\d.:]+:(\d+) \[[^\]]+\] \S+ \S+ (-?\d+)/(-?\d+)/(-?\d+)/(-?\d+)/\+?(-?\d+) (\d{3}) ")


class HaproxyLog:
    """A syslog target on loopback UDP for HAProxy's access log; keeps (port, status, timers ms)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lines: list[tuple[int, int, dict[str, int]]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            data = self.sock.recv(65536)
            m = HTTPLOG.search(data)
            if m and b"POST /v1/chat/completions" in data:
                tr, tw, tc, tserver, ta = (int(m.group(i)) for i in range(2, 7))
                self.lines.append((int(m.group(1)), int(m.group(7)),
                                   {"TR": tr, "Tw": tw, "Tc": tc, "Tr": tserver, "Ta": ta}))

    def take(self) -> list[tuple[int, int, dict[str, int]]]:
        time.sleep(0.5)  # the last lines of a level in flight
        lines, self.lines = self.lines, []
        return lines


def server_side(done: list[tuple], lines: list[tuple[int, int, dict[str, int]]]) -> dict | None:
    """The refusals' time split by HAProxy's timers, matched to the client's requests by the
    client's port and order (one connection's requests are sequential)."""
    if not lines:
        return None
    by_port: dict[int, list] = defaultdict(list)
    for port, status, timers in lines:
        by_port[port].append((status, timers))
    matched = []  # (client seconds, status, timers)
    for d in sorted(done, key=lambda d: d[4]):
        logged = by_port.get(d[5], [])
        i = next((i for i, (status, _) in enumerate(logged) if status == d[0]), None)  # a line may be lost (UDP)
        if i is not None:
            matched.append((d[1], *logged.pop(i)))
    refused = [(secs * 1000, t) for secs, status, t in matched if status != 200]
    logged_refusals = [t for _, status, t in lines if status != 200]  # every refusal HAProxy logged
    if not refused:
        return {"matched": len(matched), "of": len(done)}

    def stats(values: list[float]) -> dict:
        return {"p50": p(values, 0.5), "p99": p(values, 0.99), "max": max(values)}

    slowest = sorted(refused, key=lambda r: -r[0])[:6]
    return {"logged_refusals": len(logged_refusals),
            "all_logged_replica_Tr_ms": stats([t["Tr"] for t in logged_refusals]),
            "all_logged_haproxy_Ta_ms": stats([t["Ta"] for t in logged_refusals]),
            # matched to the client's requests (those whose connection was still held when its
            # headers came: a short refusal's connection can be released before the client reads it)
            "matched": len(matched), "of": len(done), "refusals": len(refused),
            # Tr: the gateway replica, from HAProxy's request sent to its response headers
            "replica_Tr_ms": stats([t["Tr"] for _, t in refused]),
            "haproxy_Ta_ms": stats([t["Ta"] for _, t in refused]),
            "haproxy_TR_Tw_Tc_ms": stats([max(t["TR"], 0) + max(t["Tw"], 0) + max(t["Tc"], 0) for _, t in refused]),
            # what the client saw beyond HAProxy's whole answer: the client's own side
            "client_side_ms": stats([c - t["Ta"] for c, t in refused]),
            "slowest": [{"client_ms": round(c, 1), **t} for c, t in slowest]}


async def one(c: aiohttp.ClientSession, base: str, key: str) -> tuple[int, float, float | None, float | None, float, int]:
    """(status, answer or first-token seconds, ttft, the seconds the refusal said to wait, sent at,
    the client's TCP port)."""
    start = time.perf_counter()
    async with c.post(base + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}) as r:
        sockname = r.connection.transport.get_extra_info("sockname") if r.connection and r.connection.transport else None
        port = sockname[1] if sockname else 0
        if r.status != 200:
            await r.read()
            elapsed = time.perf_counter() - start
            ms, s = r.headers.get("retry-after-ms"), r.headers.get("retry-after")
            told = float(ms) / 1000 if ms else (float(s) if s else None)
            return r.status, elapsed, None, told, start, port
        ttft = None
        async for line in r.content:
            if ttft is None and line.startswith(b"data: {") and b'"content"' in line:
                ttft = time.perf_counter() - start
        return 200, time.perf_counter() - start, ttft, None, start, port


async def ticker(lags: list[float], stop: asyncio.Event, every: float = 0.01) -> None:
    """How late the client's loop wakes a 10 ms sleep (its own overload, not the server's)."""
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(every)
        lags.append(max(time.perf_counter() - t - every, 0.0))


async def level(base: str, key: str, concurrency: int, requests: int, backoff: str = "retry-after",
                haproxy: HaproxyLog | None = None) -> dict:
    """`concurrency` clients, each sending requests back to back, `requests` in all."""
    done: list[tuple[int, float, float | None, float | None, float, int]] = []
    began = time.perf_counter()
    left = requests

    async def client(c):
        nonlocal left
        while left > 0:
            left -= 1
            done.append(await one(c, base, key))
            if done[-1][0] != 200:  # a refused client waits as it was told (or a fixed time)
                told = done[-1][3]
                await asyncio.sleep(told if backoff == "retry-after" and told else float(
                    backoff if backoff != "retry-after" else 1))

    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(lags, stop))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     connector=aiohttp.TCPConnector(limit=concurrency + 4)) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    stop.set()
    await tick
    ok = [d for d in done if d[0] == 200]
    refused = [d for d in done if d[0] != 200]
    ttfts = [d[2] for d in ok if d[2] is not None]
    waits = [d[3] for d in refused if d[3] is not None]
    return {"concurrency": concurrency, "requests": len(done), "accepted": len(ok), "rejected": len(refused),
            "statuses": sorted({d[0] for d in done}),
            "rejected_with_retry_after": len(waits),
            "retry_after_min_s": min(waits, default=None), "retry_after_max_s": max(waits, default=None),
            "accepted_ttft_p50_s": p(ttfts, 0.5), "accepted_ttft_p95_s": p(ttfts, 0.95),
            "accepted_ttft_p99_s": p(ttfts, 0.99),
            "accepted_slowest": [(round(d[4] - began, 3), round(d[2] * 1000, 1))
                                 for d in sorted((d for d in ok if d[2] is not None), key=lambda d: -d[2])[:6]],
            "rejected_answer_p50_ms": p([d[1] * 1000 for d in refused], 0.5),
            "rejected_answer_max_ms": max((d[1] * 1000 for d in refused), default=None),
            "rejected_answer_p99_ms": (p([d[1] * 1000 for d in refused], 0.99)),
            # The slowest refusals and when they were sent (s into the level): periodic stalls show.
            "rejected_slowest": [(round(d[4] - began, 3), round(d[1] * 1000, 1))
                                 for d in sorted(refused, key=lambda d: -d[1])[:6]],
            "client_loop_lag_p99_ms": (p(lags, 0.99) or 0) * 1000, "client_loop_lag_max_ms": max(lags, default=0) * 1000,
            "server_side": server_side(done, haproxy.take()) if haproxy else None}


def table(rows: list[dict], base_p99: float) -> str:
    out = ["| offered | requests | accepted | rejected (503) | accepted p99 TTFT | vs capacity "
           "| rejected answer p50 / p99 / max | client loop lag max |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r["accepted_ttft_p99_s"] / base_p99 if r["accepted_ttft_p99_s"] and base_p99 else None
        rej = f"{r['rejected_answer_p50_ms']:.1f} / {r['rejected_answer_p99_ms']:.1f} / {r['rejected_answer_max_ms']:.1f} ms" \
            if r["rejected_answer_max_ms"] is not None else "-"
        out.append(f"| {r['label']} ({r['concurrency']} clients) | {r['requests']} | {r['accepted']} | {r['rejected']} "
                   f"| {r['accepted_ttft_p99_s'] * 1000:.0f} ms | {ratio:.2f}x | {rej} | {r['client_loop_lag_max_ms']:.1f} ms |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--ongoing", type=int, default=2)
    ap.add_argument("--queued", type=int, default=2)
    ap.add_argument("--port", type=int, default=18433)
    ap.add_argument("--backoff", default="retry-after",
                    help="what a refused client waits: 'retry-after' (the header) or seconds")
    ap.add_argument("--gateway-replicas", type=int, default=1,
                    help="gateway replicas (HAProxy splits the clients between them; each counts its own share)")
    ap.add_argument("--out", default="admission.json", help="the result's file name under benchmarks/results/")
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
        rag={"enabled": False}, agents={"enabled": False}, gateway={"num_replicas": args.gateway_replicas},
        models=[ModelSpec(id="tiny-chat", engine="transformers", source=str(model_dir), max_context=256,
                          max_ongoing_requests=args.ongoing, max_queued_requests=args.queued)]))
    capacity = args.ongoing + args.queued * args.gateway_replicas  # Serve bounds the queue per caller
    haproxy = None
    if settings.serve.ingress == "haproxy":  # HAProxy logs to us (the Serve controller reads this at start)
        haproxy = HaproxyLog()
        os.environ["RAY_SERVE_HAPROXY_LOG_TARGET"] = f"127.0.0.1:{haproxy.port}"
    # A fresh instance (never a head someone else started on this machine).
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        names = deploy(settings)
        assert set(wait_running(names).values()) == {"RUNNING"}
        _, key = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin", None, "bench"))
        base = f"http://127.0.0.1:{args.port}"
        load_start = os.getloadavg()
        uvloop.run(level(base, key, 1, 5, haproxy=haproxy))  # warm up
        rows = []
        for label, factor in (("capacity", 1), ("2x", 2), ("5x", 5)):
            row = uvloop.run(level(base, key, capacity * factor, args.requests * factor, args.backoff, haproxy))
            row["label"] = label
            rows.append(row)
            print(json.dumps(row))
        load_end = os.getloadavg()
    finally:
        serve.shutdown()
        ray.shutdown()

    base_p99 = rows[0]["accepted_ttft_p99_s"]
    for r in rows:
        r["ttft_p99_vs_capacity"] = r["accepted_ttft_p99_s"] / base_p99 if base_p99 and r["accepted_ttft_p99_s"] else None
    result = {"benchmark": "admission", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "model": "tiny-chat (random weights)", "ingress": settings.serve.ingress,
              "backoff": args.backoff, "gateway_replicas": args.gateway_replicas,
              "max_ongoing_requests": args.ongoing, "max_queued_requests": args.queued, "capacity": capacity,
              "load_average_start": load_start, "load_average_end": load_end,
              "rows": rows, "targets": {"ttft_p99_vs_capacity": 2.0, "rejected_answer_max_ms": 50.0}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=1))
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_end}")
    print(table(rows, base_p99))


if __name__ == "__main__":
    main()
