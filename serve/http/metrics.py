"""Metrics through `ray.util.metrics` (they land in Ray's Prometheus export).

`MetricsMiddleware` counts every request of an app built with `http_app`: requests, errors by
type, and latency to the last byte (a stream is timed until its last chunk is sent), by app,
method, route template and model. Every label has bounded values: the route is the matched
route's template (or "unmatched"), the method one of the HTTP methods (or "other"), the model
what the handler put in `request.state.model` (`label_model`) mapped through the app's
`model_label` (catalog ids pass, any other name is "other", no model is "-").

`GatewayMetrics` and `RouterMetrics` are the gateway's own (time to first token, tokens,
routing decisions, breakers, cost).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ray.util.metrics import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.http.errors import api_error, error_type_for

if TYPE_CHECKING:
    from serve.http.app import HttpState

_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED = "unmatched"


class RequestMetrics:
    """The request metrics of every HTTP app (one set per process: see `request_metrics`)."""

    TAGS = ("app", "method", "route", "model", "status")

    def __init__(self) -> None:
        self.requests = Counter("orfeas_http_requests", "HTTP requests by app, method, route template, model "
                                "and status.", tag_keys=self.TAGS)
        self.errors = Counter("orfeas_http_errors", "HTTP error responses (and streams that failed) by app, "
                              "method, route template, model and error type.",
                              tag_keys=("app", "method", "route", "model", "type"))
        self.latency = Histogram("orfeas_http_request_latency_seconds", "Time to the last byte of the response.",
                                 boundaries=_LATENCY_BOUNDS, tag_keys=self.TAGS)

    def record(self, tags: dict[str, str], seconds: float, error_type: str | None) -> None:
        self.requests.inc(1, tags)
        self.latency.observe(seconds, tags)
        if error_type:
            self.errors.inc(1, {"app": tags["app"], "method": tags["method"], "route": tags["route"],
                                "model": tags["model"], "type": error_type})


_request_metrics: RequestMetrics | None = None


def request_metrics() -> RequestMetrics:
    global _request_metrics
    if _request_metrics is None:
        _request_metrics = RequestMetrics()
    return _request_metrics


def route_label(scope: Scope) -> str:
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return UNMATCHED
    return scope.get("root_path", "").rstrip("/") + template


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, http: HttpState):
        self.app, self.http = app, http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        failure: BaseException | None = None
        try:
            await self.app(scope, receive, send_)
        except BaseException as e:  # CancelledError too: the client went away
            failure = e
            raise
        finally:
            self._record(scope, status, time.perf_counter() - start, failure)

    def _record(self, scope: Scope, status: int, seconds: float, failure: BaseException | None) -> None:
        state = scope.get("state") or {}
        error_type = state.get("error_type")
        if failure is not None:
            if isinstance(failure, asyncio.CancelledError):
                error_type, status = error_type or "cancelled", status or 499
            else:
                typed = api_error(failure) if isinstance(failure, Exception) else None
                error_type = error_type or (typed.type if typed else "api_error")
                status = status or 500
        elif status >= 400 and not error_type:
            error_type = error_type_for(status)
        method = scope.get("method", "")
        tags = {"app": self.http.name, "method": method if method in _METHODS else "other",
                "route": route_label(scope), "model": self.http.model_label(state.get("model")),
                "status": str(status or 500)}
        request_metrics().record(tags, seconds, error_type)


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "orfeas_gateway_requests", "Requests by route, model and HTTP status.", tag_keys=("route", "model", "status")
        )
        self.errors = Counter(
            "orfeas_gateway_errors", "Error responses by route, model and error type.", tag_keys=("route", "model", "type")
        )
        self.latency = Histogram(
            "orfeas_gateway_request_latency_seconds", "Time to the last byte.", boundaries=_LATENCY_BOUNDS,
            tag_keys=("route", "model", "status"),
        )
        self.ttft = Histogram(
            "orfeas_gateway_time_to_first_token_seconds", "Time to the first generated token.",
            boundaries=_LATENCY_BOUNDS, tag_keys=("route", "model"),
        )
        self.tokens = Counter(
            "orfeas_gateway_tokens", "Tokens in (prompt) and out (completion).", tag_keys=("model", "direction")
        )

    def record(self, route: str, model: str, status: int, seconds: float, error_type: str | None = None) -> None:
        tags = {"route": route, "model": model, "status": str(status)}
        self.requests.inc(1, tags)
        self.latency.observe(seconds, tags)
        if error_type:
            self.errors.inc(1, {"route": route, "model": model, "type": error_type})

    def usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens:
            self.tokens.inc(prompt_tokens, {"model": model, "direction": "in"})
        if completion_tokens:
            self.tokens.inc(completion_tokens, {"model": model, "direction": "out"})


class RouterMetrics:
    """Routing decisions, fallbacks, breaker transitions and cost."""

    _STATES = {"closed": 0, "half_open": 1, "open": 2}

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self.decisions = Counter("orfeas_router_decisions", "Requests routed, by requested name, route kind and "
                                 "chosen model.", tag_keys=("requested", "kind", "model"))
        self.fallbacks = Counter("orfeas_router_fallbacks", "Failed attempts that moved on to another try, by "
                                 "model and outcome.", tag_keys=("model", "outcome"))
        self.breaker = Gauge("orfeas_router_breaker_state", "Circuit state per model: 0 closed, 1 half-open, 2 open.",
                             tag_keys=("model",))
        self.cost_usd = Counter("orfeas_router_cost_usd", "Priced usage in USD, by model.", tag_keys=("model",))

    def routed(self, route, opened) -> None:
        self.decisions.inc(1, {"requested": route.requested, "kind": route.kind, "model": opened.model})
        for model, outcome in opened.attempts:
            if outcome != "ok":
                self.fallbacks.inc(1, {"model": model, "outcome": outcome})

    def breaker_transition(self, model: str, old: str, new: str) -> None:
        self.breaker.set(self._STATES.get(new, 0), {"model": model})

    def cost(self, model: str, usd: float) -> None:
        self.cost_usd.inc(usd, {"model": model})
