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
    # orfeas.router.requested is the span's from its start; the plan only when it has fallbacks.
    attributes = {"orfeas.router.kind": route.kind, "orfeas.router.candidates": candidates,
                  "orfeas.router.choice": route.plan[0] if route.plan else "",
                  "orfeas.router.reason": route.reason[:500]}
    if len(route.plan) > 1:
        attributes["orfeas.router.plan"] = list(route.plan)
    if route.policy:
        attributes["orfeas.router.policy"] = route.policy
    if route.experiment:
        attributes.update({"orfeas.router.requested": route.requested, "orfeas.experiment": route.experiment,
                           "orfeas.experiment.arm": route.arm or ""})
    s.set_attributes(attributes)


def opened(s: Any, model: str, attempts: list[tuple[str, str]]) -> None:
    """The model that answered; the attempts only when there was more than the one that answered
    (each attempt that reached a backend is a `backend.attempt` child span too)."""
    if not s.is_recording():
        return
    if len(attempts) > 1:
        s.set_attributes({"gen_ai.response.model": model, "orfeas.attempts": [f"{m}:{o}" for m, o in attempts]})
    else:
        s.set_attribute("gen_ai.response.model", model)


def settled(s: Any, usage: Any, cost_usd: float, error: bool) -> None:
    """The call's usage and cost (when it has one), then the end of its span."""
    if s.is_recording():
        attributes = {"gen_ai.usage.input_tokens": usage.prompt_tokens,
                      "gen_ai.usage.output_tokens": usage.completion_tokens}
        if cost_usd:
            attributes["orfeas.cost_usd"] = cost_usd
        if error:
            attributes["error.type"] = "stream_failed"
        s.set_attributes(attributes)
    s.end()
