"""Service-time profile of the real chat engine here, for the autoscaling simulator.

Engine: ORFEAS's `transformers` engine (models/engines/transformers_engine.py) on the tiny
random-weight Llama model from models/tiny.py (~2M parameters, CPU, one torch thread per
replica as a 1-CPU replica has). Measured, in one run:

1. TTFT and per-token time against concurrency (1, 2, 4, 8 streams at once on one engine);
   per-token time is each stream's (last token - first token) / (tokens - 1), averaged;
2. prefill cost per prompt token (TTFT at a long prompt against a short one, concurrency 1);
3. cold start: a fresh Python process importing the engine and loading the model (what a new
   Serve replica does before it can serve; Serve's own actor start is not included).

    .venv/bin/python -m benchmarks.engine_profile [--tokens 32] [--rounds 3]

Writes benchmarks/results/engine_profile.json (its `profile` is what scaling/simulator.py reads)
and prints a markdown table. The ratio: per-token time at 8 streams over 1 stream.
"""

from __future__ import annotations

import argparse
import asyncio
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

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = (1, 2, 4, 8)
SHORT_WORDS, LONG_WORDS = 16, 400


def _engine(model_dir: Path):
    import torch

    from config import ModelSpec
    from models.engines.transformers_engine import TransformersEngine

    torch.set_num_threads(1)
    engine = TransformersEngine(ModelSpec(id="tiny", engine="transformers", source=str(model_dir), max_context=2048))
    engine.load()
    return engine


async def _one(engine, words: int, tokens: int) -> tuple[float, float | None]:
    from models.protocol import GenerationKind, GenerationParams, GenerationRequest

    prompt = " ".join(["word"] * words)
    req = GenerationRequest(kind=GenerationKind.COMPLETION, prompt=prompt,
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
    short = statistics.median(asyncio.run(_round(engine, 1, SHORT_WORDS, 1))[0][0] for _ in range(rounds * 3))
    long = statistics.median(asyncio.run(_round(engine, 1, LONG_WORDS, 1))[0][0] for _ in range(rounds * 3))
    tok = engine.tokenizer
    short_n = len(tok(" ".join(["word"] * SHORT_WORDS))["input_ids"])
    long_n = len(tok(" ".join(["word"] * LONG_WORDS))["input_ids"])
    return {"concurrency": list(CONCURRENCY), "ttft_s": ttft, "tpot_s": tpot, "base_prompt_tokens": short_n,
            "prefill_s_per_token": max(long - short, 0.0) / (long_n - short_n)}


def cold_start(model_dir: Path, rounds: int) -> float:
    code = ("import time,sys; t=time.perf_counter(); from benchmarks.engine_profile import _engine; "
            f"_engine({str(model_dir)!r}); print(time.perf_counter()-t)")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=root, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="Output tokens per request.")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from models.tiny import build_tiny_chat_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_chat_model(Path(tmp) / "tiny")
        engine = _engine(model_dir)
        prof = measure(engine, args.tokens, args.rounds)
        prof["cold_start_s"] = cold_start(model_dir, args.rounds)
    # Serial: the per-token time stays flat with more streams while TTFT grows with them (the
    # transformers engine runs one generation at a time on its executor thread).
    serial = prof["tpot_s"][-1] < 2 * prof["tpot_s"][0] and prof["ttft_s"][-1] > 4 * prof["ttft_s"][1]
    prof = {"engine": "transformers: models/tiny.py (random-weight Llama, ~2M params, 1 torch thread)",
            "max_ongoing_requests": max(CONCURRENCY), "serial": serial, **prof}
    out = {
        "benchmark": "engine_profile", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "profile": prof,
        "ratio_tpot_8_over_1": prof["tpot_s"][-1] / prof["tpot_s"][0],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_profile.json").write_text(json.dumps(out, indent=2))
    print("| streams | TTFT ms | per-token ms |\n| ---: | ---: | ---: |")
    for c, a, b in zip(prof["concurrency"], prof["ttft_s"], prof["tpot_s"]):
        print(f"| {c} | {a * 1000:.1f} | {b * 1000:.2f} |")
    print(f"\nprefill {prof['prefill_s_per_token'] * 1e6:.1f} us/prompt token; cold start {prof['cold_start_s']:.2f} s; "
          f"per-token time 8 vs 1 stream: x{out['ratio_tpot_8_over_1']:.2f}; serial engine: {prof['serial']}")


if __name__ == "__main__":
    main()
