"""Fallback order, retryable failures and backoff: pure functions.

Retryable: connection errors and 5xx (`UpstreamError`), timeouts (`UpstreamTimeout`), 429
(`RateLimited`, with the provider's Retry-After) and a model that cannot serve now
(`ModelUnavailable`). Invalid requests, auth and permission errors are the caller's and are
never retried. Nothing is retried once the first token has been sent to the client.
"""

from __future__ import annotations

from config.settings import FallbackSettings
from models.errors import APIError, InvalidRequest, ModelUnavailable, UpstreamError, UpstreamTimeout


def retryable(e: BaseException) -> bool:
    if isinstance(e, InvalidRequest):
        return False
    if isinstance(e, (UpstreamError, UpstreamTimeout, ModelUnavailable)):
        return True
    return isinstance(e, APIError) and (e.status == 429 or e.status >= 500)


def retry_after(e: BaseException) -> float | None:
    value = getattr(e, "retry_after_s", None)
    return float(value) if value is not None else None


def attempt_plan(ranked: tuple[str, ...] | list[str], cfg: FallbackSettings) -> list[str]:
    """The models to try, in order: each `per_model_attempts` times, at most `max_attempts` in all."""
    plan = [m for m in ranked for _ in range(cfg.per_model_attempts)]
    return plan[: cfg.max_attempts]


def backoff_s(attempt: int, cfg: FallbackSettings, u: float, retry_after_s: float | None = None,
              same_model: bool = True) -> float:
    """Wait before attempt number `attempt` (2 = the first retry); `u` is a uniform draw in [0, 1).

    Exponential (base x 2^(attempt-2), capped) with a `jitter` fraction drawn at random; a
    provider's Retry-After (capped at max_retry_after_s) is honoured only when the same model is
    tried again.
    """
    if attempt <= 1:
        return 0.0
    d = min(cfg.backoff_base_s * 2 ** (attempt - 2), cfg.backoff_max_s)
    d = d * (1 - cfg.jitter) + d * cfg.jitter * u
    if same_model and retry_after_s is not None:
        d = max(d, min(retry_after_s, cfg.max_retry_after_s))
    return d
