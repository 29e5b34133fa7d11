"""Gateway metrics through `ray.util.metrics`: they land in Ray's Prometheus export."""

from __future__ import annotations

from ray.util.metrics import Counter, Histogram

_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


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
