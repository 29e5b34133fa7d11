"""The chat path's spans (observability.tracing), with OpenTelemetry's GenAI semantic-convention
attributes: one `chat` span per `ChatService` call (from resolve to settle), a `router.decision`
child (candidates, choice, reason) and one `backend.attempt` child per backend tried (see
serve.router.runtime); the model replica's `gen_ai.generate` span is the attempt's child."""

from __future__ import annotations

from typing import Any

from observability import tracing

TTFT = "gen_ai.server.time_to_first_token"


def chat_span(call: Any, requested: str, operation: str) -> Any:
    p = call.principal
    return tracing.start(f"chat {requested}", {
        "gen_ai.operation.name": operation, "gen_ai.request.model": requested, "orfeas.route": call.route,
        "orfeas.key_id": p.key_id or "", "orfeas.team": getattr(p, "team", None) or ""})


def decided(s: Any, route: Any) -> None:
    """The router's decision on its span: what could serve, what was chosen, and why."""
    if not s.is_recording():
        return
    d = route.decision
    candidates = list(d.scores) + list(d.excluded) if d is not None else list(route.plan)
    s.set_attributes({"orfeas.router.requested": route.requested, "orfeas.router.kind": route.kind,
                      "orfeas.router.candidates": candidates, "orfeas.router.plan": list(route.plan),
                      "orfeas.router.choice": route.plan[0] if route.plan else "",
                      "orfeas.router.reason": route.reason[:500]})
    if route.policy:
        s.set_attribute("orfeas.router.policy", route.policy)
    if route.experiment:
        s.set_attributes({"orfeas.experiment": route.experiment, "orfeas.experiment.arm": route.arm or ""})


def opened(s: Any, model: str, attempts: list[tuple[str, str]]) -> None:
    if s.is_recording():
        s.set_attributes({"gen_ai.response.model": model,
                          "orfeas.attempts": [f"{m}:{o}" for m, o in attempts]})


def settled(s: Any, usage: Any, cost_usd: float, error: bool) -> None:
    """The call's usage and cost, then the end of its span."""
    if s.is_recording():
        s.set_attributes({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                          "gen_ai.usage.output_tokens": usage.completion_tokens, "orfeas.cost_usd": cost_usd})
        if error:
            s.set_attribute("error.type", "stream_failed")
    s.end()
