"""Metrics through `ray.util.metrics` (they land in Ray's Prometheus export).

`MetricsMiddleware` counts every request of an app built with `http_app`: requests, errors by
type, and latency to the last byte (a stream is timed until its last chunk is sent), by app,
method, route template and model. Every label has bounded values: the route is the matched
route's template (or "unmatched"), the method one of the HTTP methods (or "other"), the model
what the handler put in `request.state.model` (`label_model`) mapped through the app's
`model_label` (catalog ids pass, any other name is "other", no model is "-").

The gateway's own metrics (time to first token, tokens, routing, breakers, cost) are in
`serve.gateway.metrics`.
"""

from __future__ import annotations

import asyncio
import time

from ray.util.metrics import Counter, Histogram
from starlette.types import Message, Receive, Scope, Send

from serve.http.errors import api_error, error_type_for
from serve.http.middleware import HttpMiddleware

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
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
                                 boundaries=LATENCY_BOUNDS, tag_keys=self.TAGS)

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


class MetricsMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
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
