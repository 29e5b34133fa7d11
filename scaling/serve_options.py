"""Serve's `autoscaling_config` for an ORFEAS deployment, from the `autoscaling` settings section.

One function both sides use: the Serve builders pass it to `.options(autoscaling_config=...)` and
`serve.applications` writes the same dict into the declarative config (the RayService's
serveConfigV2), so a deployment scales the same way under `orfeas up` and on Kubernetes.
"""

from __future__ import annotations

from typing import Any

from config.settings import AutoscalingSettings
from scaling.policy import PolicyParams

# Ray's own AutoscalingConfig defaults: left out of the rendered config (it stays short).
RAY_DEFAULTS = {"look_back_period_s": 30.0, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0}

POLICY_FUNCTION = "scaling.policy:ForecastPolicy"
APP_POLICY_FUNCTION = "scaling.policy:AppForecastPolicy"
DEFAULT_POLICY_FUNCTION = "ray.serve.autoscaling_policy:default_autoscaling_policy"


def policy_kwargs(a: AutoscalingSettings) -> dict[str, Any]:
    """The ForecastPolicy parameters the settings choose that differ from the policy's own
    defaults (JSON-safe)."""
    chosen = {"horizon_s": a.horizon_s, "quantile": a.quantile, "downscale_cooldown_s": a.downscale_cooldown_s,
              "hysteresis": a.hysteresis, "max_reversals_per_hour": a.max_reversals_per_hour,
              "target_tokens_per_replica": a.target_tokens_per_replica}
    defaults = PolicyParams()
    return {k: v for k, v in chosen.items() if v != getattr(defaults, k)}


def autoscaling_config(a: AutoscalingSettings, app: str, *, min_replicas: int,
                       target_ongoing_requests: float) -> dict[str, Any] | None:
    """The deployment's `autoscaling_config` (None: autoscaling is off, use num_replicas).

    `app` picks the overrides in `autoscaling.apps`; `min_replicas` is the deployment's configured
    num_replicas. Under the ORFEAS policy Ray's own delays are 0: the policy keeps its own
    cooldown and hysteresis (Serve applies the delays to custom policies too)."""
    if not a.enabled:
        return None
    o = a.apps.get(app)
    policy = (o.policy if o and o.policy else a.policy)
    lo = o.min_replicas if o and o.min_replicas is not None else min_replicas
    hi = max(o.max_replicas if o and o.max_replicas is not None else a.max_replicas, lo, 1)
    target = o.target_ongoing_requests if o and o.target_ongoing_requests is not None else target_ongoing_requests
    cfg: dict[str, Any] = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": target,
                           "look_back_period_s": a.look_back_period_s}
    if policy == "orfeas":
        kwargs = policy_kwargs(a)
        cfg.update(upscale_delay_s=0.0, downscale_delay_s=0.0,
                   policy={"policy_function": POLICY_FUNCTION, **({"policy_kwargs": kwargs} if kwargs else {})})
    else:
        cfg.update(upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s)
    return {k: v for k, v in cfg.items() if RAY_DEFAULTS.get(k) != v}


def replica_count(a: AutoscalingSettings, app: str, *, num_replicas: int, target_ongoing_requests: float) -> dict[str, Any]:
    """Deployment options for the count: `autoscaling_config` when on, else `num_replicas`."""
    cfg = autoscaling_config(a, app, min_replicas=num_replicas, target_ongoing_requests=target_ongoing_requests)
    return {"autoscaling_config": cfg} if cfg is not None else {"num_replicas": num_replicas}


def model_target(a: AutoscalingSettings, max_ongoing_requests: int) -> float:
    return a.model_target_ongoing_requests or max(max_ongoing_requests / 2, 1.0)
