"""What the workflow engine adds, and how fan-out scales with agents, in one run.

1. Per-step overhead: N sequential calculator tool steps as a workflow (scheduled, checkpointed
   to disk after every transition, events emitted) vs the same N tool calls as plain sequential
   Ray tasks (the baseline, measured in the same run).
2. Fan-out throughput: one agent step fanned out over M items, run by 1, 2 and 4 replicas of
   a registered agent (actors warmed by a first run) whose model (a scripted loopback provider behind the real gateway) takes
   `--model-delay` seconds per reply; steps/s for each.

    .venv/bin/python benchmarks/workflow_overhead.py [--steps 30] [--items 16] [--model-delay 0.05]

Writes benchmarks/results/workflow_overhead.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ADDRESS", "local")  # a private cluster: never join someone else's
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import ray  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def wait_done(c, run_id: str) -> dict:
    after = 0
    while True:
        batch = ray.get(c.events_after.remote(run_id, after, 30.0))
        if batch["events"]:
            after = batch["events"][-1]["seq"]
        if batch["done"]:
            return ray.get(c.get_run.remote(run_id))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--model-delay", type=float, default=0.05)
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()

    from harness import PROVIDER_KEY, free_port
    from provider_server import ProviderServer

    from agents.coordinator import coordinator, run_tool
    from cluster.deploy import deploy, wait_running
    from config import ModelSpec, Settings

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"ORFEAS_TEST_PROVIDER_KEY": PROVIDER_KEY, "PYTHONPATH": str(ROOT)}})
    provider = ProviderServer(free_port()).start()
    data = Path(tempfile.mkdtemp(prefix="wf-bench-"))
    settings = Settings(
        data_dir=data, serve={"host": "127.0.0.1", "port": free_port()}, auth={"enabled": False},
        rag={"enabled": False},
        models=[ModelSpec(id="script", engine="openai", base_url=provider.base_url, source="script",
                          api_key_env="ORFEAS_TEST_PROVIDER_KEY")],
        agents={"enabled": False, "default_model": "script", "agents": []},
    )
    names = deploy(settings)
    wait_running(names, 300)
    c = coordinator(settings)
    ray.get(c.ping.remote())

    # 1. per-step overhead -------------------------------------------------------------------
    n = args.steps
    sd = settings.to_dict()
    ray.get(run_tool.remote(sd, "calculator", {"expression": "1"}, "warm"))
    t0 = time.perf_counter()
    for i in range(n):
        ray.get(run_tool.remote(sd, "calculator", {"expression": f"{i}+1"}, f"plain-{i}"))
    plain_s = time.perf_counter() - t0
    steps = [{"id": f"s{i}", "kind": "tool", "tool": "calculator", "args": {"expression": f"{i}+1"},
              **({"needs": [f"s{i - 1}"]} if i else {})} for i in range(n)]
    wait_done(c, ray.get(c.start_run.remote({"name": "warm", "steps": steps[:1]}))["id"])
    t0 = time.perf_counter()
    run = wait_done(c, ray.get(c.start_run.remote({"name": "chain", "steps": steps}))["id"])
    wf_s = time.perf_counter() - t0
    assert run["status"] == "succeeded", run["error"]
    overhead = {"steps": n, "plain_ray_ms_per_step": plain_s / n * 1e3, "workflow_ms_per_step": wf_s / n * 1e3,
                "overhead_ms_per_step": (wf_s - plain_s) / n * 1e3, "ratio": wf_s / plain_s}

    # 2. fan-out throughput --------------------------------------------------------------------
    reply = json.dumps([{"content": "done", "delay_s": args.model_delay}])
    fan = []
    for r in args.agents:
        # A registered agent keeps its actors between runs (run-scoped agents start fresh actors).
        ray.get(c.register_agent.remote({"name": f"w{r}", "replicas": r, "instructions": f"SCRIPT: {reply}"}))
        wf = {"name": f"fan{r}", "inputs": {"xs": list(range(args.items))},
              "steps": [{"id": "each", "kind": "agent", "agent": f"w{r}", "foreach": "${inputs.xs}",
                         "task": "item ${item}"}]}
        wait_done(c, ray.get(c.start_run.remote({**wf, "name": f"warm{r}", "inputs": {"xs": list(range(r))}}))["id"])
        t0 = time.perf_counter()
        run = wait_done(c, ray.get(c.start_run.remote(wf))["id"])
        wall = time.perf_counter() - t0
        assert run["status"] == "succeeded", run["error"]
        fan.append({"agents": r, "items": args.items, "wall_s": wall, "steps_per_s": args.items / wall})
    base = fan[0]["steps_per_s"]
    for f in fan:
        f["speedup_vs_1"] = f["steps_per_s"] / base

    result = {"benchmark": "workflow_overhead", "machine": platform.platform(), "cpus": os.cpu_count(),
              "model_delay_s": args.model_delay, "per_step": overhead, "fan_out": fan}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workflow_overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n| measure | value |\n|---|---|")
    print(f"| plain Ray task, ms/step | {overhead['plain_ray_ms_per_step']:.1f} |")
    print(f"| workflow tool step, ms/step | {overhead['workflow_ms_per_step']:.1f} |")
    print(f"| engine overhead, ms/step (ratio) | {overhead['overhead_ms_per_step']:.1f} ({overhead['ratio']:.2f}x) |")
    for f in fan:
        print(f"| fan-out {f['items']} items, {f['agents']} agent(s) | {f['steps_per_s']:.1f} steps/s "
              f"({f['speedup_vs_1']:.2f}x) |")
    ray.get(c.ping.remote())
    ray.kill(c)
    from ray import serve

    serve.shutdown()
    provider.stop()
    ray.shutdown()


if __name__ == "__main__":
    main()
