"""The ORFEAS policy on the local Ray cluster: a deployment under a compressed, bounded replay of
the Azure conversation trace's rate (60 s) scales up before the burst peaks and back down
after; the policy ran (its Ray metric is exported) and the replica count followed it in bounds."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from scaling.traces import load_csv, shared_traces_dir

TRACE = shared_traces_dir(Path(__file__).resolve().parents[1]) / "azure_llm_2023_conv.csv"
APP, DEPLOYMENT = "scaling-live", "Work"
SERVICE_S = 0.5  # each request holds its replica this long (a replica takes 4 at once)
MAX_REPLICAS = 4


def replay_rates(seconds: int = 60, peak_rps: float = 14.0) -> np.ndarray:
    """Requests/s for each second: the real trace's per-minute rate from its quietest to its
    busiest stretch, compressed into a bounded replay that rises to `peak_rps` and falls back."""
    if TRACE.is_file():
        per_min = np.bincount((load_csv(TRACE).t // 60).astype(int)).astype(float)
        shape = np.interp(np.linspace(0, len(per_min) - 1, seconds), np.arange(len(per_min)), per_min)
    else:
        shape = np.ones(seconds)
    # Quiet, a ramp to the peak at 30-38 s, then quiet again; the trace's variation (damped) on top.
    envelope = np.interp(np.arange(seconds), [0, 10, 30, 38, 40, seconds], [0.1, 0.1, 1.0, 1.0, 0.05, 0.05])
    return np.maximum(envelope * peak_rps * (0.5 + 0.5 * shape / shape.mean()), 0.2)


def held(serve) -> int:
    """Replicas the controller holds for the deployment (starting or running, not stopping): the
    policy's decision, not how fast a busy machine starts a process."""
    dep = serve.status().applications[APP].deployments[DEPLOYMENT]
    return int(sum(n for state, n in dep.replica_states.items() if state not in ("STOPPING", "STOPPED")))


@pytest.mark.slow
def test_policy_scales_ahead_of_a_replayed_burst_and_back(ray_cluster, serve_port, metrics_port):
    from ray import serve

    @serve.deployment(name=DEPLOYMENT, max_ongoing_requests=4, autoscaling_config={
        "min_replicas": 1, "max_replicas": MAX_REPLICAS, "target_ongoing_requests": 2,
        "look_back_period_s": 4, "upscale_delay_s": 0, "downscale_delay_s": 0,
        "policy": {"policy_function": "scaling.policy:ForecastPolicy",
                   # The replay compresses an hour into a minute: so is the reversal budget.
                   "policy_kwargs": {"horizon_s": 8, "bucket_s": 2, "downscale_cooldown_s": 10,
                                     "max_reversals_per_hour": 120, "downscale_window_s": 10}}},
        ray_actor_options={"num_cpus": 0})
    class Work:
        async def __call__(self) -> str:
            await asyncio.sleep(SERVICE_S)
            return "ok"

    handle = serve.run(Work.bind(), name=APP, route_prefix=None)
    try:
        assert handle.remote().result(timeout_s=60) == "ok"
        rates = replay_rates()
        counts: list[tuple[float, int]] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                counts.append((time.monotonic() - start, held(serve)))
                time.sleep(0.5)

        start = time.monotonic()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        pending = []
        rng = np.random.default_rng(0)
        for second, rate in enumerate(rates):
            for offset in np.sort(rng.uniform(0, 1, rng.poisson(rate))):
                delay = start + second + offset - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pending.append(handle.remote())
        for r in pending:
            r.result(timeout_s=120)
        # Quiet: the policy gives replicas back after its cooldown.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and held(serve) > 1:
            time.sleep(1)
        stop.set()
        watcher.join()

        busiest = np.flatnonzero(rates >= 0.95 * rates.max())
        peak_at = float(busiest.mean())  # the middle of the burst's plateau
        most = max(c for _, c in counts)
        reached = next(t for t, c in counts if c == most)
        assert 1 < most <= MAX_REPLICAS and all(c >= 1 for _, c in counts), counts
        assert max(c for t, c in counts if t < 8) < most, "already at its peak count before the ramp"
        assert reached < peak_at, f"reached {most} replicas at {reached:.0f} s, the burst peaked at {peak_at:.0f} s"
        assert counts[-1][1] < most, f"did not scale back down after the burst: {counts[-10:]}"

        # The policy ran in Serve's controller: its decision gauge is exported.
        text = ""
        for _ in range(30):
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            if "orfeas_autoscaling_decision_replicas" in text:
                break
            time.sleep(1)
        decisions = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("ray_orfeas_autoscaling_decision_replicas") and f'deployment="{DEPLOYMENT}"' in line]
        assert decisions, "the ORFEAS policy's metric was not exported"
        assert 1 <= decisions[-1] <= MAX_REPLICAS
    finally:
        serve.delete(APP)
