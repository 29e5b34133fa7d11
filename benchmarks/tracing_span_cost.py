"""What one traced chat's spans cost in CPU, in process and without Ray: the five spans of a
streamed chat (the gateway's server, `chat`, `router.decision` and `backend.attempt` spans and
the model replica's `generate`), made through observability.tracing with the same attributes
and the same calls as the chat path, against the same loop with tracing off.

Modes, each in its own child process (the tracer is per process), alternating in rounds:
`off` (no SDK), `request-path` (the spans with a processor that does nothing: what a request
waits for), `exported` (the SDK's BatchSpanProcessor with the settings' batch defaults exporting
over OTLP/HTTP to a real receiver on loopback in its own process: the request path plus the
export thread's share; the encoding and POST in a child process, `tracing.export_sidecar`) and
`exported-in-process` (the same with the SDK's OTLPSpanExporter encoding and POSTing in the
process itself, as before: a before/after in one run). The `-sdk-tracer` modes make the same
spans with the SDK's own `Tracer.start_span` instead of observability.recorded_span's Recorder
(what tracing did before): the before/after of that change in one run. The chats are paced
(`--rate`, about what one gateway serves at concurrency 1), so the batches are as large as a live gateway's and the POSTs as many.
tracing_overhead.py measures the end-to-end figure; this one says how much of it the spans
themselves can be, with far less noise.

    .venv/bin/python benchmarks/tracing_span_cost.py [--rounds 3] [--requests 400] [--rate 25]

Writes benchmarks/results/tracing_span_cost.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("off", "request-path-sdk-tracer", "request-path", "exported-in-process-sdk-tracer", "exported-in-process",
         "exported")


def one_chat(tracing) -> None:
    """The spans of one streamed chat, as serve/http/tracing.py, serve/gateway/{chat,tracing}.py,
    serve/router/runtime.py and serve/model_apps.py make them."""
    with tracing.span("POST /v1/chat/completions", {"http.request.method": "POST", "url.path": "/v1/chat/completions",
                                                    "orfeas.request_id": "req-1"}, kind="server") as s:
        tracing.traceparent(s)  # the response header
        chat = tracing.start("chat tiny-chat", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "tiny-chat",
                                                "orfeas.route": "/v1/chat/completions", "orfeas.key_id": "key-1",
                                                "orfeas.team": ""})
        with tracing.current(chat):
            with tracing.span("router.decision", {"orfeas.router.requested": "tiny-chat"}) as d:
                d.set_attributes({"orfeas.router.kind": "model", "orfeas.router.candidates": ["tiny-chat"],
                                  "orfeas.router.choice": "tiny-chat", "orfeas.router.reason": "named model"})
            attempt = tracing.start("backend.attempt", {"gen_ai.request.model": "tiny-chat", "orfeas.attempt": 0})
            with tracing.current(attempt):
                carrier = tracing.inject()  # to the model replica
            attempt.set_attribute("orfeas.outcome", "ok")
        chat.set_attribute("gen_ai.response.model", "tiny-chat")
        # The model replica's side (another process in the cluster; here the same one).
        gen = tracing.start("generate tiny-chat", {"gen_ai.operation.name": "chat", "gen_ai.system": "transformers",
                                                   "gen_ai.request.model": "tiny-chat", "gen_ai.request.max_tokens": 8},
                            parent=carrier)
        gen.set_attribute("gen_ai.server.time_to_first_token", 0.004)
        gen.set_attributes({"gen_ai.response.finish_reasons": ["stop"], "gen_ai.usage.input_tokens": 12,
                            "gen_ai.usage.output_tokens": 8})
        gen.end()
        chat.set_attribute("gen_ai.server.time_to_first_token", 0.005)
        attempt.end()
        chat.set_attributes({"gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 8})
        chat.end()
        s.set_attributes({"http.route": "/v1/chat/completions", "http.response.status_code": 200})
        s.update_name("POST /v1/chat/completions")


def child(mode: str, requests: int, endpoint: str, rate: float) -> None:
    """Run in a child process: print the CPU µs per chat of `mode`."""
    from config import TracingSettings
    from observability import tracing

    if mode != "off":
        before = {"export_sidecar": mode == "exported"} if mode.startswith("exported") else {}
        tracing.configure(TracingSettings(enabled=True, endpoint=endpoint, **before), "bench")
    if mode.endswith("-sdk-tracer"):  # before: the spans made by the SDK's own Tracer.start_span
        tracing._tracer = tracing._provider.get_tracer("orfeas")
    if mode.startswith("request-path"):
        from opentelemetry.sdk.trace import SpanProcessor

        from observability.recorded_span import RecordedSpan

        RecordedSpan._processor = SpanProcessor()  # ends go nowhere
        tracing._provider._active_span_processor._span_processors = (SpanProcessor(),)  # the SDK tracer's too
    for _ in range(300):
        one_chat(tracing)
    tracing.flush()  # the warm-up's spans are not the timed chats' export
    # This process's CPU from the first chat to the last span exported (the export thread's
    # included: its batches go while the chats are paced, the rest at the final flush).
    t0, start = time.process_time(), time.perf_counter()
    for i in range(requests):
        one_chat(tracing)
        time.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
    tracing.flush()
    us = (time.process_time() - t0) / requests * 1e6
    print(json.dumps({"mode": mode, "us_per_chat": us}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400, help="chats per mode and round")
    ap.add_argument("--rate", type=float, default=25.0, help="chats per second")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.requests, args.endpoint, args.rate)
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from harness import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    receiver = subprocess.Popen([sys.executable, str(ROOT / "tests" / "otlp_receiver.py"), str(port)], env=env)
    endpoint = f"http://127.0.0.1:{port}/v1/traces"
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    load_at_start = os.getloadavg()
    try:
        time.sleep(1.0)
        for r in range(args.rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                out = subprocess.run([sys.executable, __file__, "--child", mode, "--requests", str(args.requests), "--rate", str(args.rate),
                                      "--endpoint", endpoint], env=env, capture_output=True, text=True, check=True)
                per_mode[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["us_per_chat"])
                print(f"round {r + 1} {mode}: {per_mode[mode][-1]:.0f} µs per chat", flush=True)
    finally:
        receiver.terminate()
    med = {m: statistics.median(v) for m, v in per_mode.items()}
    result = {
        "benchmark": "tracing_span_cost",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_avg": {"start": load_at_start, "end": os.getloadavg()}, "rounds": args.rounds,
        "requests": args.requests, "rate": args.rate,
        "us_per_chat": per_mode, "median_us_per_chat": med,
        "added_us_request_path": med["request-path"] - med["off"],
        "added_us_request_path_sdk_tracer": med["request-path-sdk-tracer"] - med["off"],
        "added_us_exported_in_process_sdk_tracer": med["exported-in-process-sdk-tracer"] - med["off"],
        "added_us_exported": med["exported"] - med["off"],
        "added_us_exported_in_process": med["exported-in-process"] - med["off"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tracing_span_cost.json").write_text(json.dumps(result, indent=1))
    print("| mode | CPU per chat, median of rounds (µs) | rounds (µs) |\n|---|---|---|")
    for m in MODES:
        print(f"| {m} | {med[m]:.0f} | {', '.join(f'{x:.0f}' for x in per_mode[m])} |")
    print("load average (1 min) start → end: %.1f → %.1f" % (load_at_start[0], result["load_avg"]["end"][0]))


if __name__ == "__main__":
    main()
