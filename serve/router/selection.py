"""Model selection: a pure function from a `SelectionContext` to a `Decision`.

Candidates that cannot serve the request are excluded for a named hard constraint (not allowed,
outside the policy, capability missing, context window too small, over the remaining budget,
slower than the latency budget); the healthy rest are scored by the policy and ranked. The
ranking is also the fallback order. When nothing passes the hard constraints the request fails
with `NoCapableModel` naming every unmet constraint; when something passes but none of it is
healthy, with `NoHealthyModel`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from models.errors import NoCapableModel, NoHealthyModel
from serve.router.features import RequestFeatures

# Hard constraints, in the order they are checked (the first unmet one is a candidate's reason).
CONSTRAINTS = ("allowed", "policy", "capability", "context", "budget", "latency")


@dataclass(frozen=True)
class Candidate:
    """A catalog chat model as the selector sees it: static priors plus live health."""

    id: str
    capabilities: frozenset[str]
    max_context: int | None
    price_input_per_m: float
    price_output_per_m: float
    latency_s: float  # live EWMA when traffic has been seen, else the prior
    quality: Mapping[str, float] = field(default_factory=dict)
    quality_default: float = 0.5
    tags: frozenset[str] = frozenset()
    healthy: bool = True
    health_reason: str | None = None
    load: float = 0.0  # outstanding / concurrency limit

    def quality_for(self, task: str) -> float:
        return self.quality.get(task, self.quality.get("general", self.quality_default))

    def cost(self, prompt_tokens: int, output_tokens: int) -> float:
        return (prompt_tokens * self.price_input_per_m + output_tokens * self.price_output_per_m) / 1e6


@dataclass(frozen=True)
class PolicyParams:
    name: str
    kind: str  # cheapest-adequate | best-quality | balanced
    lambda_cost: float = 0.02
    mu_latency: float = 0.1
    min_quality: float = 0.5
    models: frozenset[str] | None = None
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SelectionContext:
    features: RequestFeatures
    candidates: Sequence[Candidate]
    policy: PolicyParams
    allowed: frozenset[str] | None = None  # None: every model
    remaining_budget_usd: float | None = None


@dataclass(frozen=True)
class Decision:
    chosen: str
    ranked: tuple[str, ...]  # the chosen model first, then the fallback order
    scores: dict[str, float]
    excluded: dict[str, tuple[str, str]]  # id -> (constraint, detail)
    reason: str


def unmet(c: Candidate, ctx: SelectionContext) -> tuple[str, str] | None:
    """The first hard constraint the candidate fails, as (constraint, detail), or None."""
    f, p = ctx.features, ctx.policy
    if ctx.allowed is not None and c.id not in ctx.allowed:
        return "allowed", "not allowed for this API key"
    if (p.models is not None and c.id not in p.models) or not p.tags <= c.tags:
        return "policy", f"outside policy {p.name!r}"
    missing = sorted(f.required - c.capabilities)
    if missing:
        return "capability", "lacks capability " + ", ".join(repr(m) for m in missing)
    if c.max_context is not None and f.context_needed > c.max_context:
        return "context", f"context window {c.max_context} < {f.context_needed} tokens needed"
    if ctx.remaining_budget_usd is not None:
        cost = c.cost(f.prompt_tokens, f.max_output_tokens)
        if cost > ctx.remaining_budget_usd:
            return "budget", f"estimated ${cost:.6f} > remaining budget ${ctx.remaining_budget_usd:.6f}"
    if f.latency_budget_s is not None and c.latency_s > f.latency_budget_s:
        return "latency", f"expected {c.latency_s:.3g}s > latency budget {f.latency_budget_s:.3g}s"
    return None


def score(c: Candidate, ctx: SelectionContext) -> float:
    """Higher is better. Costs are per million tokens blended over this request's tokens."""
    f, p = ctx.features, ctx.policy
    q = c.quality_for(f.task)
    tokens = max(f.prompt_tokens + f.max_output_tokens, 1)
    per_m = c.cost(f.prompt_tokens, f.max_output_tokens) * 1e6 / tokens
    if p.kind == "best-quality":
        return q - 1e-6 * per_m - 1e-9 * c.latency_s
    if p.kind == "cheapest-adequate":
        # Adequate models by cost (cheapest first, the better one on ties); inadequate ones after.
        if q >= p.min_quality:
            return 1e6 - per_m + 1e-3 * q
        return q  # none adequate: the best quality leads
    return q - p.lambda_cost * per_m - p.mu_latency * c.latency_s - 0.05 * c.load


def _summary(excluded: Mapping[str, tuple[str, str]]) -> str:
    by: dict[str, list[str]] = {}
    for mid, (constraint, detail) in excluded.items():
        by.setdefault(constraint, []).append(f"{mid} ({detail})")
    parts = []
    for constraint in CONSTRAINTS:
        if constraint in by:
            ms = by[constraint]
            shown = "; ".join(ms[:3]) + (f"; and {len(ms) - 3} more" if len(ms) > 3 else "")
            parts.append(f"{constraint}: {shown}")
    return " | ".join(parts)


def select(ctx: SelectionContext) -> Decision:
    excluded: dict[str, tuple[str, str]] = {}
    able: list[Candidate] = []
    # Models outside the caller's scope are not candidates at all: no reason, error or header
    # may name them to this caller.
    visible = [c for c in ctx.candidates if ctx.allowed is None or c.id in ctx.allowed]
    if not visible and ctx.candidates:
        raise NoCapableModel("no model this API key may use can serve this request", "model")
    for c in visible:
        why = unmet(c, ctx)
        if why is None:
            able.append(c)
        else:
            excluded[c.id] = why
    if not able:
        if not ctx.candidates:
            raise NoCapableModel("no chat model is in the catalog for routing", "model")
        raise NoCapableModel("no model can serve this request; unmet constraints: " + _summary(excluded), "model")
    healthy = [c for c in able if c.healthy]
    for c in able:
        if not c.healthy:
            excluded[c.id] = ("health", c.health_reason or "unhealthy")
    if not healthy:
        raise NoHealthyModel("models that could serve this request are all unhealthy: "
                             + "; ".join(f"{c.id} ({c.health_reason or 'unhealthy'})" for c in able), "model")
    scores = {c.id: score(c, ctx) for c in healthy}
    ranked = tuple(sorted(scores, key=lambda m: (-scores[m], m)))
    chosen = ranked[0]
    best = next(c for c in healthy if c.id == chosen)
    f, p = ctx.features, ctx.policy
    detail = (f"quality {best.quality_for(f.task):.2f}, est ${best.cost(f.prompt_tokens, f.max_output_tokens):.6f}, "
              f"latency {best.latency_s:.2g}s")
    if p.kind == "cheapest-adequate" and best.quality_for(f.task) < p.min_quality:
        detail += f"; none reaches min quality {p.min_quality:g}, best quality taken"
    reason = (f"policy={p.name} task={f.task}({f.task_source}) chose {chosen} ({detail}) "
              f"of {len(healthy)} candidate(s)")
    if excluded:
        reason += f"; excluded {len(excluded)}: " + ", ".join(
            f"{m}:{c}" for m, (c, _) in sorted(excluded.items())[:5]) + ("..." if len(excluded) > 5 else "")
    return Decision(chosen, ranked, scores, excluded, reason)
