"""The trace simulator and `orfeas autoscale analyze` (no cluster): traces are read with clear
errors, a cold start delays new capacity, Ray's real default policy and ORFEAS's both run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scaling.analyze import periodicity, profile_trace, recommend
from scaling.simulator import Profile, compare, ray_default_config, simulate
from scaling.traces import Trace, TraceError, diurnal, load_csv

ROOT = Path(__file__).resolve().parent.parent
PROFILE = Profile(engine="test", concurrency=[1, 2, 4, 8], ttft_s=[0.02, 0.03, 0.05, 0.1],
                  tpot_s=[0.01, 0.015, 0.025, 0.05], prefill_s_per_token=1e-5, base_prompt_tokens=16,
                  cold_start_s=20.0, max_ongoing_requests=8)


def write_csv(path: Path, t: np.ndarray, prompt: int = 100, output: int = 20) -> Path:
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for s in t:
        whole = int(s)
        rows.append(f"2023-11-16 18:{whole // 60 % 60:02d}:{whole % 60:02d}.{int((s - whole) * 1e7):07d},{prompt},{output}")
    path.write_text("\n".join(rows) + "\n")
    return path


def burst_trace(seed: int = 0) -> Trace:
    """Two minutes quiet (1 req/s), two minutes at 12 req/s, quiet again."""
    rng = np.random.default_rng(seed)
    rate = lambda s: 12.0 if 120 <= s < 240 else 1.0  # noqa: E731
    t = [s + rng.uniform(0, 1) for s in range(600) for _ in range(rng.poisson(rate(s)))]
    t = np.sort(np.asarray(t))
    return Trace("burst", t - t[0], np.full(len(t), 100), np.full(len(t), 20))


def test_azure_traces_load(tmp_path):
    tr = load_csv(write_csv(tmp_path / "t.csv", np.array([0.0, 0.5, 2.25])))
    assert len(tr) == 3 and tr.t[0] == 0 and tr.t[-1] == pytest.approx(2.25)
    assert tr.compressed(2).t[-1] == pytest.approx(1.125)


def test_bad_traces_are_clear_errors(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        load_csv(tmp_path / "nope.csv")
    (tmp_path / "cols.csv").write_text("time,tokens\n1,2\n")
    with pytest.raises(TraceError, match="missing column.*TIMESTAMP"):
        load_csv(tmp_path / "cols.csv")
    (tmp_path / "bad.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.1,x,3\n")
    with pytest.raises(TraceError, match=r"bad.csv:2"):
        load_csv(tmp_path / "bad.csv")


def test_a_cold_start_delays_the_new_capacity():
    tr = burst_trace()
    cfg = ray_default_config(min_replicas=1, max_replicas=20, target_ongoing_requests=2, upscale_delay_s=0,
                             downscale_delay_s=30)
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy as ray_default

    fast = simulate(tr, Profile(**{**PROFILE.__dict__, "cold_start_s": 1.0}), ray_default, cfg, name="1s", slo_s=0.5)
    slow = simulate(tr, Profile(**{**PROFILE.__dict__, "cold_start_s": 60.0}), ray_default, cfg, name="60s", slo_s=0.5)
    assert fast.max_replicas > 1 and slow.slo_attainment < fast.slo_attainment
    assert fast.requests == slow.requests == len(tr)


def test_both_policies_run_on_the_same_trace_and_orfeas_gives_back_the_trough():
    res = compare(burst_trace(), PROFILE, slo_s=1.0, max_replicas=20, params={"downscale_window_s": 60})
    d, o = res["ray_default"], res["orfeas"]
    assert {r.requests for r in res.values()} == {len(burst_trace())}
    assert d.max_replicas > 1 and o.max_replicas > 1
    # Ray's default holds its peak for downscale_delay_s (600 s): past the end of this trace.
    assert o.replica_seconds < d.replica_seconds
    assert o.reversals_per_hour <= 2 * 6  # one up-down cycle in a 10-minute trace


def test_diurnal_series_has_a_daily_cycle():
    src = burst_trace()
    tr = diurnal([src], days=2, mean_rate=0.5)
    hourly = np.bincount((tr.t // 3600).astype(int), minlength=48)[:48]
    assert hourly[16] > 2 * hourly[4] and hourly[40] > 2 * hourly[28]  # peak 16:00, trough 04:00, both days
    p = profile_trace(tr)
    assert p["periodicity"]["daily_cycle_visible"]
    assert p["periodicity"]["daily_autocorrelation"] > 0.3


def test_periodicity_finds_a_repeat_and_not_persistence():
    minutes = np.tile([1.0] * 10 + [9.0] * 10, 6)
    lag, acf = periodicity(minutes)
    assert lag == 20 and acf > 0.5
    assert periodicity(np.linspace(1, 10, 60))[0] is None  # a ramp: persistence, no cycle


def test_recommendation_sizes_from_the_engine_profile():
    p = profile_trace(burst_trace())
    rec = recommend(p, PROFILE)
    assert rec["policy"] == "orfeas" and rec["horizon_s"] == 20.0 and rec["target_ongoing_requests"] == 4
    assert rec["max_replicas"] > rec["min_replicas"] >= 1


def test_cli_analyze(tmp_path):
    f = write_csv(tmp_path / "t.csv", np.sort(np.random.default_rng(1).uniform(0, 1800, 900)))
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"profile": PROFILE.__dict__}))
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "autoscale", "analyze", str(f), "--profile", str(prof),
                          "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["profile"]["requests"] == 900 and 0.8 < data["profile"]["burstiness"]["interarrival_cv"] < 1.2
    assert data["recommended"]["max_replicas"] >= 1
    bad = subprocess.run([sys.executable, "-m", "cluster.cli", "autoscale", "analyze", str(tmp_path / "x.csv")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "does not exist" in (bad.stdout + bad.stderr)


def test_long_prompts_are_refused_and_the_slo_counts_only_the_wait():
    """A prompt over the model's context is refused (not served); the SLO is met by a request that
    waited no more than slo_s beyond its own unloaded TTFT (a long prefill alone is no miss)."""
    prof = Profile(**{**PROFILE.__dict__, "prefill_points": [[16, 0.02], [1016, 2.02], [2016, 6.02]],
                      "max_prompt_tokens": 3000, "serial": True})
    assert prof.ttft(1, 1016) == pytest.approx(2.02) and prof.ttft(1, 2516) == pytest.approx(8.02)  # past the last
    n = 40
    t = np.arange(n) * 30.0  # one at a time: nobody waits
    prompt = np.where(np.arange(n) % 4 == 0, 5000, 2016)
    tr = Trace("long", t, prompt, np.full(n, 4))
    cfg = ray_default_config(min_replicas=1, max_replicas=2, initial_replicas=1, target_ongoing_requests=1)
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy as ray_default

    r = simulate(tr, prof, ray_default, cfg, name="d", slo_s=0.5)
    assert r.refused == n // 4 and r.requests == n - n // 4
    assert r.ttft_p50_s > 5 and r.slo_attainment == 1.0
    # Two at once on one serial replica: the second waits the first's service, a miss.
    burst = Trace("pair", np.array([0.0, 0.01]), np.array([16, 16]), np.array([200, 200]))
    r2 = simulate(burst, prof, ray_default, cfg, name="d", slo_s=0.5)
    assert r2.slo_attainment == 0.5
