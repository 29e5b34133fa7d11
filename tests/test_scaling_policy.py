"""The ORFEAS autoscaling policies as pure functions of Ray's AutoscalingContext (no cluster),
and the autoscaling_config every ORFEAS deployment gets."""

from __future__ import annotations

import math

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config, _apply_app_level_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from config import Settings
from scaling.policy import STATE_KEY, AppForecastPolicy, ForecastPolicy, PolicyParams, decide, quantile, staffed
from scaling.serve_options import POLICY_FUNCTION, autoscaling_config
from serve.applications import applications, serve_config


def ctx(t: float, ongoing: float, *, target: int, running: int | None = None, state=None, lo=1, hi=20,
        name="Model", per=4.0, tokens=None) -> AutoscalingContext:
    cfg = AutoscalingConfig(min_replicas=lo, max_replicas=hi, target_ongoing_requests=per,
                            upscale_delay_s=0, downscale_delay_s=0)
    return AutoscalingContext(
        deployment_id=DeploymentID(name=name, app_name="app"), deployment_name=name, app_name="app",
        current_num_replicas=target if running is None else running, target_num_replicas=target,
        running_replicas=[], total_num_requests=ongoing, total_queued_requests=0.0,
        aggregated_metrics={"tokens_in_flight": {"r1": tokens}} if tokens is not None else {},
        raw_metrics={}, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        policy_state=state or {}, last_scale_up_time=None, last_scale_down_time=None, current_time=t, config=cfg)


def run(load, *, params=PolicyParams(), start=1, dt=1.0, **kw) -> list[int]:
    """Drive `decide` over a load curve (a function of t), feeding its state and decisions back."""
    state, target, out = {}, start, []
    for k in range(len(load) if isinstance(load, list) else 0):
        n, state = decide(ctx(k * dt, load[k], target=target, state=state, **kw), params)
        target = n
        out.append(n)
    return out


def test_steady_load_gets_need_over_target_and_stays():
    p = PolicyParams()
    counts = run([20.0] * 300, start=20)
    # 20 requests at 4 per replica, square-root staffed; a scale-down stops where the hysteresis
    # band still holds.
    assert math.ceil(staffed(20 / 4, p.staffing_beta)) <= counts[-1] <= \
        math.ceil(staffed(20 / (4 * (1 - p.hysteresis)), p.staffing_beta))
    assert counts[0] > counts[-1], "an oversized start is given back"
    assert len(set(counts[150:])) == 1, "a steady load must not move the count"


def test_a_ramp_is_provisioned_ahead_of_the_load():
    """Load rising 0.2 requests/s: the forecast one horizon ahead asks for more than the load now."""
    load = [2 + 0.2 * k for k in range(200)]
    counts = run(load, params=PolicyParams(horizon_s=30))
    now_need = math.ceil(load[-1] / 4)
    assert counts[-1] > now_need, (counts[-1], now_need)


def test_scale_down_waits_for_the_cooldown_and_hysteresis():
    params = PolicyParams(downscale_cooldown_s=60, hysteresis=0.2, downscale_window_s=30)
    load = [40.0] * 100 + [4.0] * 300
    counts = run(load, params=params)
    high = counts[99]
    assert high >= 10
    # Not straight after the drop: the last change was less than the cooldown ago.
    assert counts[100] == high
    assert counts[-1] < high and counts[-1] <= math.ceil(staffed(4 / (4 * 0.8), params.staffing_beta))
    changes = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]
    downs = [i for i in changes if counts[i] < counts[i - 1]]
    assert all(b - a >= 60 for a, b in zip(downs, downs[1:])), "scale-downs closer together than the cooldown"


def test_noise_around_a_boundary_does_not_flap():
    """Load oscillating around 3 replicas' worth: hysteresis keeps the count from reversing."""
    load = [12 + (1.5 if k % 10 < 5 else -1.5) for k in range(600)]
    counts = run(load, params=PolicyParams(downscale_cooldown_s=30))
    dirs = [1 if b > a else -1 for a, b in zip(counts, counts[1:]) if b != a]
    reversals = sum(1 for a, b in zip(dirs, dirs[1:]) if a != b)
    assert reversals <= 1, counts


def test_min_and_max_are_respected():
    assert run([0.0] * 50, lo=2)[-1] == 2
    assert run([500.0] * 50, hi=7)[-1] == 7


def test_cold_start_is_measured_and_lengthens_the_horizon():
    p = PolicyParams(horizon_s=5)
    state: dict = {}
    _, state = decide(ctx(0, 1.0, target=3, running=1, state=state), p)  # two replicas starting
    _, state = decide(ctx(40, 1.0, target=3, running=3, state=state), p)  # ... running 40 s later
    assert state[STATE_KEY]["cold"]["s"] == pytest.approx(40)


def test_headroom_is_the_quantile_of_past_errors():
    assert quantile([0.0, 1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert quantile([0.0, 1.0], 0.95) == pytest.approx(0.95)
    # A load that jumps every minute teaches the policy positive errors: it provisions above
    # the level it sees between the jumps.
    load = [(30.0 if (k // 30) % 2 else 6.0) for k in range(900)]
    counts = run(load, params=PolicyParams(downscale_cooldown_s=600))
    assert max(counts[-100:]) >= math.ceil(30 / 4)


def test_token_load_sizes_the_deployment_when_replicas_report_it():
    p = PolicyParams(target_tokens_per_replica=1000)
    state: dict = {}
    target = 1
    for k in range(60):
        target, state = decide(ctx(k, 2.0, target=target, state=state, tokens=8000.0), p)
    assert target >= 8  # 2 requests would need 1 replica; 8000 tokens need 8


def test_the_policy_runs_inside_ray_s_own_wrapper():
    """Serve wraps every custom policy (`_apply_autoscaling_config`); the class-callable works there."""
    policy = _apply_autoscaling_config(ForecastPolicy(horizon_s=10))
    state, target = {}, 1
    for k in range(30):
        target, state = policy(ctx(k, 30.0, target=target, state=state))
    assert target >= 8 and STATE_KEY in state


def test_unknown_policy_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown autoscaling policy parameter.*horizon"):
        ForecastPolicy(horizon=3)


def test_app_level_policy_grows_models_with_the_gateway():
    policy = _apply_app_level_autoscaling_config(AppForecastPolicy(leader="Gateway", horizon_s=30))
    gw, model = DeploymentID(name="Gateway", app_name="app"), DeploymentID(name="Model", app_name="app")
    state: dict = {}
    t_gw, t_m = 1, 1
    alone_state, alone = {}, 1
    for k in range(120):
        g_load, m_load = 2 + 0.5 * k, 4.0  # the gateway's surge has not reached the model yet
        contexts = {gw: ctx(k, g_load, target=t_gw, state=state.get(gw), name="Gateway", per=32),
                    model: ctx(k, m_load, target=t_m, state=state.get(model), name="Model", per=1)}
        decisions, state = policy(contexts)
        t_gw, t_m = decisions[gw], decisions[model]
        alone, alone_state = decide(ctx(k, m_load, target=alone, state=alone_state, per=1), PolicyParams(horizon_s=30))
    assert t_m > alone, "the model must be grown with the gateway's forecast, beyond its own"


def test_every_deployment_gets_an_autoscaling_config():
    s = Settings()
    for app in applications(s):
        assert app.deployments, app.name
        for d in app.deployments:
            a = d["autoscaling_config"]
            assert a["policy"]["policy_function"] == POLICY_FUNCTION
            assert a["min_replicas"] <= a["max_replicas"]
            AutoscalingConfig(**a)  # Ray accepts it (and imports the policy)
    cfg = serve_config(s)
    assert all(app.get("deployments") for app in cfg["applications"])


def test_settings_choose_the_policy_and_bounds():
    s = Settings(autoscaling={"policy": "default", "apps": {"gateway": {"max_replicas": 9, "policy": "orfeas"}}})
    rag = autoscaling_config(s.autoscaling, "rag", min_replicas=1, target_ongoing_requests=32)
    gw = autoscaling_config(s.autoscaling, "gateway", min_replicas=2, target_ongoing_requests=32)
    # Ray's default policy with Ray's own delays (left out of the config: they are Ray's defaults).
    assert "policy" not in rag and AutoscalingConfig(**rag).downscale_delay_s == 600
    assert AutoscalingConfig(**gw).upscale_delay_s == 0 and AutoscalingConfig(**gw).downscale_delay_s == 0
    assert gw["policy"]["policy_function"] == POLICY_FUNCTION and gw["max_replicas"] == 9 and gw["min_replicas"] == 2
    assert autoscaling_config(Settings(autoscaling={"enabled": False}).autoscaling, "rag", min_replicas=1,
                              target_ongoing_requests=1) is None


def test_reversals_are_budgeted_but_scale_up_never_waits():
    """A load that swings every 3 minutes for an hour: the count may follow it up every time, but
    turns down after an upward run at most once per the hour's budget of 2 reversals."""
    load = [(24.0 if (k // 180) % 2 else 4.0) for k in range(3600)]
    counts = run(load, params=PolicyParams(downscale_cooldown_s=30, max_reversals_per_hour=2))
    dirs = [1 if b > a else -1 for a, b in zip(counts, counts[1:]) if b != a]
    assert sum(1 for a, b in zip(dirs, dirs[1:]) if a != b) <= 2
    high = [c for k, c in enumerate(counts) if (k // 180) % 2 and k % 180 > 60]
    assert min(high) >= 24 / 4, "every burst is covered"


def test_square_root_staffing_spares_less_at_scale():
    """The spare grows with the square root of the load: a larger deployment carries a smaller
    fraction of idle replicas for the same chance of a request waiting."""
    small = run([8.0] * 200, start=1, per=1.0)[-1]
    large = run([200.0] * 200, start=1, per=1.0, hi=400)[-1]
    assert small >= 8 + 2 and large >= 200 + 2 * math.sqrt(200) * 0.9
    assert (large - 200) / 200 < (small - 8) / 8


def test_scale_down_holds_the_window_s_peak():
    """A spike then a lull: the count stays at what the spike needed for downscale_window_s, then
    goes down (load that returned within the window would find its replicas)."""
    params = PolicyParams(downscale_cooldown_s=30, downscale_window_s=300)
    load = [4.0] * 60 + [40.0] * 60 + [4.0] * 600
    counts = run(load, params=params, per=1.0, hi=100)
    peak = max(counts[:130])
    assert peak >= 40
    assert min(counts[130:120 + 280]) >= 40, "scaled down within the window of the spike"
    assert counts[-1] < 20, "never gave the spike's replicas back"


def test_an_upturn_after_a_downward_run_covers_the_load_not_the_forecast():
    """Once the count is on its way down, turning up again spends a reversal: only to the staffed
    load now, not to the trend's forecast."""
    p = PolicyParams(downscale_cooldown_s=10, downscale_window_s=10, horizon_s=60)
    state: dict = {}
    target = 30
    for k in range(200):  # settle down from 30 replicas at a load of 10
        target, state = decide(ctx(k, 10.0, target=target, state=state, per=1.0, hi=200), p)
    assert target < 30 and state[STATE_KEY]["dir"] == -1
    low = target
    for k in range(200, 215):  # a steep rise: the forecast 60 s ahead is far above the load now
        load = 10.0 + 2.0 * (k - 199)
        target, state = decide(ctx(k, load, target=target, state=state, per=1.0, hi=200), p)
        if target > low:  # the turn: to the staffed load now (later steps follow the forecast)
            assert target == math.ceil(staffed(load, p.staffing_beta)), (k, load, target)
            break
    else:
        raise AssertionError("never turned up")


def test_the_filling_look_back_window_is_not_read_as_a_trend():
    """A policy that starts with the load already there: Serve's look-back mean rises from 0 over
    its first window; that rise must not be forecast onwards."""
    load = [min(k, 30) * 1.0 for k in range(31)] + [30.0] * 60  # the 30 s mean filling, then flat
    counts = run(load, start=1, per=1.0, hi=200)
    assert max(counts) <= math.ceil(staffed(30.0, PolicyParams().staffing_beta)) + 1, max(counts)
