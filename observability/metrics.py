"""ORFEAS's metrics: one catalog of every `orfeas_*` metric, and the definitions of those that no
other room defines (LLM latency, usage and SLOs per team, rate limits, caches, RAG, ingest,
budgets, the audit chain), recorded through `ray.util.metrics` (Ray's Prometheus export names
each one `ray_<name>`, counters with `_total`, histograms with `_bucket`/`_sum`/`_count`).

The HTTP layer's request metrics stay in `serve.http.metrics`, the gateway's first-token, token,
routing and breaker metrics in `serve.gateway.metrics`, the workflow metrics in `agents.metrics`;
`CATALOG` lists them too (with where they are defined), so docs/observability.md's table and the
dashboards' test read one list. Labels are bounded: models are catalog ids, routes are route
labels, teams pass through `BoundedLabel` (the first `MAX_TEAMS` teams seen, then "other").

Recording is cheap and never raises on the request path:

    llm = llm_metrics()                    # one set per process, made on first use
    llm.finished(model, route, team, seconds=..., prompt_tokens=..., completion_tokens=..., cost_usd=...)
    rate_limited("key", "requests", team, model)  # for the rate limiter (security) to call
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_GAP_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SCORE_BOUNDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STEP_BOUNDS = (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600)
MAX_TEAMS = 50
OTHER = "other"
NONE = "-"

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Kind
    help: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] | None = None
    defined_in: str = "observability.metrics"

    def exported(self) -> tuple[str, ...]:
        """The series names Ray's Prometheus export gives it."""
        base = "ray_" + self.name
        if self.kind == "counter":
            return (base if base.endswith("_total") else base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


def _d(name: str, kind: Kind, help: str, tags: tuple[str, ...], boundaries: tuple[float, ...] | None = None,
       where: str = "observability.metrics") -> MetricDef:
    return MetricDef(name, kind, help, tags, boundaries, where)


HTTP, GATEWAY, AGENTS = "serve.http.metrics", "serve.gateway.metrics", "agents.metrics"
_HTTP_TAGS = ("app", "method", "route", "model", "status")

CATALOG: tuple[MetricDef, ...] = (
    # the HTTP layer (every app)
    _d("orfeas_http_requests", "counter", "HTTP requests by app, method, route template, model and status.",
       _HTTP_TAGS, where=HTTP),
    _d("orfeas_http_errors", "counter", "HTTP error responses (and streams that failed) by error type.",
       ("app", "method", "route", "model", "type"), where=HTTP),
    _d("orfeas_http_request_latency_seconds", "histogram", "Time to the last byte of the response.", _HTTP_TAGS,
       LATENCY_BOUNDS, HTTP),
    # the gateway's own
    _d("orfeas_gateway_time_to_first_token_seconds", "histogram", "Time to the first generated token.",
       ("route", "model"), LATENCY_BOUNDS, GATEWAY),
    _d("orfeas_gateway_tokens", "counter", "Tokens in (prompt) and out (completion).", ("model", "direction"),
       where=GATEWAY),
    _d("orfeas_router_decisions", "counter", "Requests routed, by requested name, route kind and chosen model.",
       ("requested", "kind", "model"), where=GATEWAY),
    _d("orfeas_router_fallbacks", "counter", "Failed attempts that moved on to another try.", ("model", "outcome"),
       where=GATEWAY),
    _d("orfeas_router_breaker_state", "gauge", "Circuit state per model: 0 closed, 1 half-open, 2 open.",
       ("model",), where=GATEWAY),
    _d("orfeas_router_cost_usd", "counter", "Priced usage in USD, by model.", ("model",), where=GATEWAY),
    # LLM calls (ChatService), per model, route and team
    _d("orfeas_llm_inter_token_latency_seconds", "histogram", "Time between consecutive streamed chunks.",
       ("model",), TOKEN_GAP_BOUNDS),
    _d("orfeas_llm_request_latency_seconds", "histogram", "End-to-end time of a ChatService call, open to settle.",
       ("model", "route", "team"), LATENCY_BOUNDS),
    _d("orfeas_llm_requests", "counter", "ChatService calls settled, by outcome (ok, error).",
       ("model", "route", "team", "outcome")),
    _d("orfeas_llm_tokens", "counter", "Tokens by model, team and direction (in, out).", ("model", "team", "direction")),
    _d("orfeas_llm_cost_usd", "counter", "Priced usage in USD by model and team.", ("model", "team")),
    _d("orfeas_llm_slo_requests", "counter", "Calls judged against the SLOs (monitoring.ttft_slo_s, "
       "monitoring.latency_slo_s), by SLO and whether it was met.", ("model", "slo", "met")),
    _d("orfeas_llm_in_flight", "gauge", "Backend calls in flight per model (this replica).", ("model",)),
    _d("orfeas_llm_queued", "gauge", "Requests waiting for admission per model (the admission controller sets it).",
       ("model",)),
    _d("orfeas_ratelimit_rejections", "counter", "Requests refused by a rate limit (429), by the scope that "
       "refused (key, team, model), the limit (requests, tokens, concurrent), model and team.",
       ("scope", "limit", "model", "team")),
    _d("orfeas_cache_lookups", "counter", "Cache lookups by cache and result (hit, miss).", ("cache", "result")),
    _d("orfeas_cache_hit_ratio", "gauge", "Share of a cache's lookups that hit, since this replica started "
       "(rag: exact answers, rag_semantic: similar questions, asked after an exact miss).", ("cache",)),
    _d("orfeas_cache_saved_cost_usd", "counter", "Chat usage in USD that cache hits did not spend again: what "
       "each served answer cost when it was made.", ("cache",)),
    _d("orfeas_cache_saved_seconds", "counter", "Query time cache hits did not spend again: what each served "
       "answer took when it was made.", ("cache",)),
    _d("orfeas_budget_spent_ratio", "gauge", "Share of a team's budget spent in its period.", ("team",)),
    # RAG and ingest
    _d("orfeas_rag_retrieval_latency_seconds", "histogram", "Retrieval time (embed, search, re-rank) of a query.",
       ("mode",), LATENCY_BOUNDS),
    _d("orfeas_rag_groundedness", "histogram", "Support of an answer's sentences by its context: the mean best "
       "cosine of each sentence to a context sentence (rag.quality).", ("generation",), SCORE_BOUNDS),
    _d("orfeas_rag_citation_coverage", "histogram", "Share of an answer's sentences supported by a passage they "
       "cite.", ("generation",), SCORE_BOUNDS),
    _d("orfeas_rag_context_relevance", "histogram", "Mean best similarity of the packed passages to the query.",
       ("generation",), SCORE_BOUNDS),
    _d("orfeas_rag_quality_gate", "counter", "Generated answers judged by the quality gate, by action (pass, "
       "refuse, extractive).", ("action",)),
    _d("orfeas_rag_injections", "counter", "Prompt injections detected, by where (input, passage) and action "
       "(flag, block, drop).", ("where", "action")),
    _d("orfeas_ingest_runs", "counter", "Ingest runs by final status (succeeded, failed).", ("status",)),
    _d("orfeas_ingest_chunks", "counter", "Chunks written by ingest runs.", ()),
    _d("orfeas_ingest_chunks_per_second", "gauge", "Throughput of the last finished ingest run.", ()),
    _d("orfeas_ingest_failed_files", "counter", "Files an ingest run could not read or parse.", ()),
    # workflows (agents.metrics)
    _d("orfeas_workflow_runs_total", "counter", "Workflow runs by final status.", ("workflow", "status"),
       where=AGENTS),
    _d("orfeas_workflow_runs_active", "gauge", "Workflow runs in progress.", ("workflow",), where=AGENTS),
    _d("orfeas_workflow_steps_total", "counter", "Workflow step attempts by outcome.", ("workflow", "kind", "status"),
       where=AGENTS),
    _d("orfeas_workflow_step_seconds", "histogram", "Step run time (all attempts).", ("workflow", "kind"),
       STEP_BOUNDS, AGENTS),
    _d("orfeas_workflow_step_retries_total", "counter", "Step attempts that were retried.", ("workflow", "kind"),
       where=AGENTS),
    _d("orfeas_workflow_cost_total", "counter", "Estimated model cost of workflow runs.", ("workflow",),
       where=AGENTS),
    _d("orfeas_workflow_model_calls_total", "counter", "Model calls made by workflow steps.", ("workflow",),
       where=AGENTS),
    # security
    _d("orfeas_audit_verify_failures", "counter", "Audit-chain verifications that found a broken link.", ()),
    _d("orfeas_alerts_received", "counter", "Alerts taken by the alert receiver, by source and severity.",
       ("source", "severity")),
)

BY_NAME = {m.name: m for m in CATALOG}


def exported_names() -> set[str]:
    """Every series name ORFEAS's metrics appear under in Prometheus."""
    return {n for m in CATALOG for n in m.exported()}


def markdown_table() -> str:
    """The docs table (docs/observability.md keeps a copy; a test compares them)."""
    rows = ["| metric (Prometheus) | kind | labels | what | defined in |", "|---|---|---|---|---|"]
    for m in CATALOG:
        rows.append(f"| `{m.exported()[0].removesuffix('_bucket')}` | {m.kind} | {', '.join(m.tags) or '—'} "
                    f"| {m.help} | `{m.defined_in}` |")
    return "\n".join(rows)


class BoundedLabel:
    """A label with at most `limit` values: the first ones seen pass, later new ones are "other"."""

    def __init__(self, limit: int = MAX_TEAMS):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        if not value:
            return NONE
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


team_label = BoundedLabel()

_live: dict[str, Any] = {}
_live_lock = threading.Lock()


def metric(name: str):
    """The process's `ray.util.metrics` object for a metric defined here (made on first use)."""
    m = _live.get(name)
    if m is not None:
        return m
    d = BY_NAME[name]
    if d.defined_in != "observability.metrics":
        raise ValueError(f"{name} is defined in {d.defined_in}; record it there")
    from ray.util import metrics as rm

    with _live_lock:
        if name not in _live:
            if d.kind == "counter":
                _live[name] = rm.Counter(name, d.help, tag_keys=d.tags)
            elif d.kind == "gauge":
                _live[name] = rm.Gauge(name, d.help, tag_keys=d.tags)
            else:
                _live[name] = rm.Histogram(name, d.help, boundaries=list(d.boundaries or ()), tag_keys=d.tags)
        return _live[name]


def _safe(fn):
    """Metrics never fail a request: a recording error is logged once per metric function."""
    failed: set[str] = set()

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a metrics bug must not become the caller's error
            if fn.__name__ not in failed:
                failed.add(fn.__name__)
                log.warning("metric %s not recorded: %r", fn.__name__, e)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class LlmMetrics:
    """ChatService's per-call metrics."""

    def __init__(self, ttft_slo_s: float = 2.0, latency_slo_s: float = 30.0):
        self.ttft_slo_s, self.latency_slo_s = ttft_slo_s, latency_slo_s
        for name in ("orfeas_llm_inter_token_latency_seconds", "orfeas_llm_request_latency_seconds",
                     "orfeas_llm_requests", "orfeas_llm_tokens", "orfeas_llm_cost_usd", "orfeas_llm_slo_requests",
                     "orfeas_llm_in_flight"):
            metric(name)  # registered before the first request

    @_safe
    def inter_token(self, model: str, seconds: float) -> None:
        metric("orfeas_llm_inter_token_latency_seconds").observe(seconds, {"model": model})

    @_safe
    def first_token(self, model: str, seconds: float) -> None:
        met = "true" if seconds <= self.ttft_slo_s else "false"
        metric("orfeas_llm_slo_requests").inc(1, {"model": model, "slo": "ttft", "met": met})

    @_safe
    def in_flight(self, model: str, n: int) -> None:
        metric("orfeas_llm_in_flight").set(n, {"model": model})

    @_safe
    def finished(self, model: str, route: str, team: str | None, *, seconds: float, prompt_tokens: int,
                 completion_tokens: int, cost_usd: float, error: bool) -> None:
        team = team_label(team)
        metric("orfeas_llm_request_latency_seconds").observe(seconds, {"model": model, "route": route, "team": team})
        metric("orfeas_llm_requests").inc(1, {"model": model, "route": route, "team": team,
                                              "outcome": "error" if error else "ok"})
        if prompt_tokens:
            metric("orfeas_llm_tokens").inc(prompt_tokens, {"model": model, "team": team, "direction": "in"})
        if completion_tokens:
            metric("orfeas_llm_tokens").inc(completion_tokens, {"model": model, "team": team, "direction": "out"})
        if cost_usd:
            metric("orfeas_llm_cost_usd").inc(cost_usd, {"model": model, "team": team})
        if not error:
            met = "true" if seconds <= self.latency_slo_s else "false"
            metric("orfeas_llm_slo_requests").inc(1, {"model": model, "slo": "latency", "met": met})


_llm: LlmMetrics | None = None


def llm_metrics(ttft_slo_s: float = 2.0, latency_slo_s: float = 30.0) -> LlmMetrics:
    global _llm
    if _llm is None:
        _llm = LlmMetrics(ttft_slo_s, latency_slo_s)
    return _llm


@_safe
def rate_limited(scope: str, limit: str, team: str | None, model: str | None = None) -> None:
    """A request refused by a rate limit (`scope`: key, team, model; `limit`: requests, tokens,
    concurrent — fixed sets; `model`: a catalog id, as the limiter is asked after resolving)."""
    metric("orfeas_ratelimit_rejections").inc(1, {"scope": scope, "limit": limit, "model": model or NONE,
                                                  "team": team_label(team)})


@_safe
def cache_lookup(cache: str, hit: bool) -> None:
    metric("orfeas_cache_lookups").inc(1, {"cache": cache, "result": "hit" if hit else "miss"})


@_safe
def cache_hit_ratio(cache: str, ratio: float) -> None:
    metric("orfeas_cache_hit_ratio").set(ratio, {"cache": cache})


@_safe
def cache_saved(cache: str, cost_usd: float, seconds: float) -> None:
    """A cache hit: the cost and time the served answer took when it was made."""
    if cost_usd > 0:
        metric("orfeas_cache_saved_cost_usd").inc(cost_usd, {"cache": cache})
    if seconds > 0:
        metric("orfeas_cache_saved_seconds").inc(seconds, {"cache": cache})


@_safe
def queued(model: str, n: int) -> None:
    metric("orfeas_llm_queued").set(n, {"model": model})


@_safe
def budget_spent(team: str | None, ratio: float) -> None:
    metric("orfeas_budget_spent_ratio").set(ratio, {"team": team_label(team)})


@_safe
def rag_query(mode: str, retrieval_s: float, generation: str, groundedness: float | None) -> None:
    metric("orfeas_rag_retrieval_latency_seconds").observe(retrieval_s, {"mode": mode})
    if groundedness is not None:
        metric("orfeas_rag_groundedness").observe(groundedness, {"generation": generation})


@_safe
def rag_answer_quality(generation: str, citation_coverage: float, groundedness: float, context_relevance: float,
                       gate_action: str | None) -> None:
    tags = {"generation": generation}
    metric("orfeas_rag_citation_coverage").observe(citation_coverage, tags)
    metric("orfeas_rag_context_relevance").observe(context_relevance, tags)
    if gate_action:
        metric("orfeas_rag_quality_gate").inc(1, {"action": gate_action})


@_safe
def rag_injection(where: str, action: str) -> None:
    metric("orfeas_rag_injections").inc(1, {"where": where, "action": action})


@_safe
def ingest_finished(status: str, chunks: int = 0, chunks_per_s: float = 0.0, failed_files: int = 0) -> None:
    metric("orfeas_ingest_runs").inc(1, {"status": status})
    if chunks:
        metric("orfeas_ingest_chunks").inc(chunks)
    if status == "succeeded":
        metric("orfeas_ingest_chunks_per_second").set(chunks_per_s)
    if failed_files:
        metric("orfeas_ingest_failed_files").inc(failed_files)


@_safe
def audit_verify_failed() -> None:
    metric("orfeas_audit_verify_failures").inc(1)


@_safe
def alert_received(source: str, severity: str) -> None:
    metric("orfeas_alerts_received").inc(1, {"source": source, "severity": severity})
