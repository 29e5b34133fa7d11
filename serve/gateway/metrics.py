"""The gateway's own metrics through `ray.util.metrics` (request counts and latency are the HTTP
layer's, `serve.http.metrics`, for every app alike)."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from serve.http.metrics import LATENCY_BOUNDS


class GatewayMetrics:
    """Generation metrics: time to the first token and tokens in and out, by model."""

    def __init__(self) -> None:
        self.ttft = Histogram(
            "orfeas_gateway_time_to_first_token_seconds", "Time to the first generated token.",
            boundaries=LATENCY_BOUNDS, tag_keys=("route", "model"),
        )
        self.tokens = Counter(
            "orfeas_gateway_tokens", "Tokens in (prompt) and out (completion).", tag_keys=("model", "direction")
        )

    def usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens:
            self.tokens.inc(prompt_tokens, {"model": model, "direction": "in"})
        if completion_tokens:
            self.tokens.inc(completion_tokens, {"model": model, "direction": "out"})


class RouterMetrics:
    """Routing decisions, fallbacks, breaker transitions and cost."""

    _STATES = {"closed": 0, "half_open": 1, "open": 2}

    def __init__(self) -> None:
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
