"""Routing cost, in one run:

1. the per-request routing decision (featurise + select over the catalog, no I/O) at catalog
   sizes 5, 50 and 500, in microseconds (target: <= 1 ms at 50 models);
2. the gateway's added latency with routing on (`model: auto`) against a fixed model name, both
   answered by the same loopback OpenAI-compatible server (a ratio, same run, same machine).

    .venv/bin/python -m benchmarks.router_overhead [--requests 200] [--decisions-only]

Writes benchmarks/results/router_overhead.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["Write a Python function that merges two sorted lists",
           "Summarise the following meeting notes in three bullets: budget approved, hiring paused",
           "What is the capital of Australia?", "Write a haiku about autumn rain",
           "Extract every date from: the launch on 2024-03-01 slipped to 2024-04-15"]


def catalog(n: int, rng: random.Random):
    from serve.router.features import TASK_TYPES
    from serve.router.selection import Candidate

    caps = ["chat", "code", "tools", "json", "vision", "long-context"]
    return [Candidate(f"m{i}", frozenset(["chat"] + rng.sample(caps[1:], rng.randint(0, 3))),
                      rng.choice([4096, 8192, 32768, 128000]), rng.uniform(0, 10), rng.uniform(0, 30),
                      rng.uniform(0.2, 5), {t: rng.random() for t in rng.sample(TASK_TYPES, 3)}, 0.5,
                      frozenset(), rng.random() > 0.05) for i in range(n)]


def decision_us(n: int, iterations: int) -> dict:
    from serve.router.features import featurise
    from serve.router.selection import PolicyParams, SelectionContext, select

    rng = random.Random(n)
    cands = catalog(n, rng)
    bodies = [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS]
    policy = PolicyParams("balanced", "balanced")
    samples = []
    for i in range(iterations):
        start = time.perf_counter()
        f = featurise(bodies[i % len(bodies)], max_output_tokens=256)
        select(SelectionContext(f, cands, policy, None, None))
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return {"models": n, "iterations": iterations, "p50_us": round(samples[len(samples) // 2], 1),
            "p99_us": round(samples[int(len(samples) * 0.99)], 1), "mean_us": round(sum(samples) / len(samples), 1)}


def gateway_overhead(requests: int) -> dict:
    import httpx
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from provider_server import ProviderServer  # the tests' loopback provider stands in for a hosted one

    from cluster.deploy import deploy, wait_running
    from security.keys import keystore
    from config import ModelSpec, Settings
    from ray import serve

    def port() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    provider = ProviderServer(port()).start()
    os.environ["ORFEAS_BENCH_KEY"] = "sk-bench"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"ORFEAS_BENCH_KEY": "sk-bench"}})
    serve_port = port()
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    models = [ModelSpec(id=f"echo-{i}", engine="openai", base_url=provider.base_url, source="echo",
                        api_key_env="ORFEAS_BENCH_KEY", price_input_per_m=i, price_output_per_m=2 * i,
                        quality={"general": 0.5 + i / 20}) for i in range(5)]
    settings = Settings(data_dir=tempfile.mkdtemp(), serve={"host": "127.0.0.1", "port": serve_port},
                        rag={"enabled": False}, agents={"enabled": False}, models=models,
                        router={"classifier": "rules"})
    try:
        wait_running(deploy(settings), timeout_s=300)
        _, key = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin", None, "bench"))
        out = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            for name in ("echo-0", "auto", "echo-0", "auto"):  # interleaved: warm-up effects cancel
                lat = []
                for i in range(requests):
                    body = {"model": name, "max_tokens": 4,
                            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
                    start = time.perf_counter()
                    r = client.post("/v1/chat/completions", json=body)
                    lat.append(time.perf_counter() - start)
                    r.raise_for_status()
                lat.sort()
                out.setdefault(name, []).append(lat[len(lat) // 2] * 1e3)
        fixed, routed = min(out["echo-0"]), min(out["auto"])
        return {"requests_per_level": requests, "fixed_p50_ms": round(fixed, 2), "auto_p50_ms": round(routed, 2),
                "added_ms": round(routed - fixed, 2), "ratio": round(routed / fixed, 3)}
    finally:
        serve.shutdown()
        ray.shutdown()
        provider.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--decisions-only", action="store_true")
    args = ap.parse_args()
    result = {"benchmark": "router_overhead", "at": datetime.now(timezone.utc).isoformat(),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
              "decisions": [decision_us(n, args.iterations if n < 500 else args.iterations // 4)
                            for n in (5, 50, 500)]}
    if not args.decisions_only:
        result["gateway"] = gateway_overhead(args.requests)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "router_overhead.json").write_text(json.dumps(result, indent=1))
    print("| models | p50 µs | p99 µs |\n|---|---|---|")
    for d in result["decisions"]:
        print(f"| {d['models']} | {d['p50_us']} | {d['p99_us']} |")
    if "gateway" in result:
        g = result["gateway"]
        print(f"\ngateway p50: fixed {g['fixed_p50_ms']} ms, auto {g['auto_p50_ms']} ms "
              f"(+{g['added_ms']} ms, x{g['ratio']})")


if __name__ == "__main__":
    main()
