"""The one chat path: resolve -> reserve -> open -> stream or collect -> settle.

Every generation the platform makes goes through `ChatService`: the OpenAI routes, the `rag`
alias and RAG answers, the orchestrator, agents and the CLI. Each call carries the principal it
is made for, so that key's scopes and budget apply and the ledger charges it.

Settling happens exactly once per call, however the stream ends: a finished answer is priced by
the usage its backend reported; an answer cut short (client gone, deadline, error mid-stream) or
one from a backend that reports no usage is priced by the tokens actually sent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from analytics.budgets import UsageBook
from config import Settings
from models.errors import APIError, InvalidRequest, ModelUnavailable
from models.protocol import GenerationEvent, GenerationKind, GenerationRequest, ToolCall, ToolCallCollector, Usage, new_id
from security.auth import Principal
from observability import tracing
from observability.metrics import llm_metrics
from serve.gateway import tracing as gtrace
from security.ratelimit import Admission, Limiter, RateLimited
from serve.gateway.metrics import GatewayMetrics, RouterMetrics
from serve.router.features import estimate_tokens
from serve.router.runtime import Claim, Opened, Route, Router, ascii_header


@dataclass
class ChatCall:
    """One call's bookkeeping: who, which route label, which model answered, since when."""

    principal: Principal
    route: str  # the metrics route label: chat, completion, chat-rag, orchestrate, internal, ...
    model: str = "-"
    routed: Route | None = None
    response_id: str | None = None
    start: float = field(default_factory=time.perf_counter)
    span: Any = tracing.NO_SPAN  # the call's `chat` span (serve.gateway.tracing), ended when it settles
    admission: Admission | None = None  # rate-limit slots and token reservation (security.ratelimit)
    fallback_admissions: dict[str, Admission] = field(default_factory=dict)  # model -> its own scope's
    tokens: int = 0  # the most tokens the call may use, as reserved
    reservation: str | None = None  # budget reservation id (analytics.budgets)
    claim: Claim | None = None  # counted against its model since the gateway's door (serve.http.admission)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class Answer:
    """A collected answer: what the model said, how it finished, what it cost."""

    model: str
    response_id: str
    text: str
    finish_reason: str
    usage: Usage
    cost_usd: float
    tool_calls: list[ToolCall] | None = None
    logprobs: dict[str, Any] | None = None


def _prompt_text(gen: GenerationRequest) -> str:
    if gen.kind is GenerationKind.COMPLETION:
        return gen.prompt or ""
    parts = []
    for m in gen.messages or []:
        c = m.get("content") or ""
        if isinstance(c, list):  # multi-part content: its text parts
            c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
        parts.append(str(c))
    return " ".join(parts)


class ChatStream:
    """An opened generation whose first event is in hand. Iterate `events()` once (or `collect()`);
    closing it, however early, settles the call."""

    def __init__(self, service: "ChatService", call: ChatCall, route: Route, opened: Opened, gen: GenerationRequest):
        self.service, self.call, self.route, self.opened, self.gen = service, call, route, opened, gen
        self.usage: Usage | None = None
        self.cost_usd = 0.0
        self._sent: list[str] = []  # text handed to the caller so far, for pricing a cut stream
        self._settled = False

    @property
    def model(self) -> str:
        return self.opened.model

    def headers(self) -> dict[str, str]:
        """What the router did, for the response headers."""
        h = {"x-orfeas-model": self.opened.model, "x-orfeas-route": ascii_header(self.route.reason),
             "x-orfeas-attempts": ascii_header(",".join(f"{m}:{o}" for m, o in self.opened.attempts)),
             "x-orfeas-response-id": self.call.response_id or ""}
        if self.call.admission is not None:
            h.update(self.call.admission.headers)
        if self.route.experiment:
            h["x-orfeas-experiment"] = f"{self.route.experiment}/{self.route.arm}"
        return h

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """Every event, the first included; the finishing one carries the usage."""
        error = True
        try:
            event: GenerationEvent | None = self.opened.first
            first_output = True
            llm, last_at = self.service.llm, 0.0
            while event is not None:
                if first_output and (event.text or event.tool_calls):
                    ttft = self.call.elapsed()
                    self.service.metrics.ttft.observe(ttft, {"route": self.call.route, "model": self.call.model})
                    self.call.span.set_attribute(gtrace.TTFT, ttft)
                    llm.first_token(self.call.model, ttft)
                    first_output, last_at = False, time.perf_counter()
                elif event.text and last_at:
                    now = time.perf_counter()
                    llm.inter_token(self.call.model, now - last_at)
                    last_at = now
                if event.text:
                    self._sent.append(event.text)
                if event.finish_reason:
                    self.usage = event.usage
                    error = False
                    yield event
                    return
                yield event
                event = await anext(self.opened.events, None)
            raise ModelUnavailable(f"model {self.call.model!r} ended its answer without finishing")
        finally:
            await self.close(error=error)

    async def collect(self) -> Answer:
        """The whole answer (the call is settled when this returns)."""
        calls = ToolCallCollector()
        logprobs: dict[str, list] = {}
        last: GenerationEvent | None = None
        async for event in self.events():
            calls.add(event.tool_calls)
            for k, v in (event.logprobs or {}).items():
                if isinstance(v, list):
                    logprobs.setdefault(k, []).extend(v)
            last = event
        assert last is not None and last.finish_reason  # events() raises otherwise
        return Answer(self.opened.model, self.call.response_id or "", "".join(self._sent), last.finish_reason,
                      self.usage_or_counted(), self.cost_usd, calls.calls(), logprobs or None)

    def usage_or_counted(self) -> Usage:
        """The backend's usage when it reported one, else counted from the request and the text sent."""
        if self.usage is not None and (self.usage.prompt_tokens or self.usage.completion_tokens):
            return self.usage
        sent = "".join(self._sent)
        return Usage.of(estimate_tokens(_prompt_text(self.gen)), estimate_tokens(sent) if sent else 0)

    async def close(self, error: bool = False) -> None:
        """Stop the backend's stream and settle the call; later calls do nothing."""
        if self._settled:
            return
        self._settled = True
        try:
            await self.opened.events.aclose()
        finally:
            self.cost_usd = self.service.settle(self.call, self.usage_or_counted(), error=error)
            gtrace.settled(self.call.span, self.usage_or_counted(), self.cost_usd, error)


class ChatService:
    def __init__(self, settings: Settings, router: Router, book: UsageBook, metrics: GatewayMetrics,
                 router_metrics: RouterMetrics, limiter: Limiter | None = None):
        self.settings, self.router, self.book = settings, router, book
        self.limiter = limiter if limiter is not None else Limiter(settings)
        self.metrics, self.router_metrics = metrics, router_metrics
        self.max_tokens = settings.limits.max_tokens
        self.timeout_s = settings.gateway.request_timeout_s
        self.llm = llm_metrics(settings.monitoring.ttft_slo_s, settings.monitoring.latency_slo_s)

    def check_limit(self, max_tokens: int | None) -> None:
        """A client's token limit over `limits.max_tokens` is its error (a 400), never silently lowered."""
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise InvalidRequest(f"max_tokens is {max_tokens}, over this gateway's limit of {self.max_tokens}",
                                 "max_tokens")

    async def open(self, call: ChatCall, requested: str, gen: GenerationRequest, *,
                   features: dict[str, Any] | None = None, headers: Mapping[str, str] | None = None,
                   deadline: float | None = None) -> ChatStream:
        """Resolve `requested` for this principal, check its budget, and open the first backend
        that answers. `features` is what the router reads to classify the request (the OpenAI
        body as sent); by default it is made from `gen`. Traced: the call's `chat` span runs
        from here until the stream settles."""
        if not tracing.enabled():
            return await self._open(call, requested, gen, features, headers, deadline)
        s = call.span = gtrace.chat_span(call, requested, gen.kind.value)
        try:
            with tracing.current(s):
                stream = await self._open(call, requested, gen, features, headers, deadline)
        except BaseException as e:
            tracing.fail(s, e)
            s.end()
            raise
        gtrace.opened(s, stream.model, stream.opened.attempts)
        return stream

    async def _open(self, call: ChatCall, requested: str, gen: GenerationRequest, features: dict[str, Any] | None,
                    headers: Mapping[str, str] | None, deadline: float | None) -> ChatStream:
        call.model = requested
        call.principal.require("models:use", None, "model")  # the role first; the model's scope at resolve
        remaining = await self.book.remaining(call.principal)  # BudgetExceeded when the budget is spent
        body = features if features is not None else self._features(requested, gen)
        expected = gen.params.max_tokens or min(self.settings.router.expected_output_tokens, self.max_tokens)
        route = call.routed = await self.router.resolve(requested, body, call.principal, headers or {}, expected,
                                                        remaining)
        if (full := self.router.refusal(route, call.claim)) is not None:
            raise full  # capacity first: shed before any rate-limit or budget round trip
        await self.reserve(call, route, gen, expected)
        try:
            opened = await self.router.open(route, gen, deadline or time.monotonic() + self.timeout_s,
                                            admit=lambda mid: self.admit_fallback(call, mid), claim=call.claim)
        except BaseException:
            self.release(call)
            raise
        call.model = opened.model
        call.response_id = call.response_id or new_id("chatcmpl" if gen.kind is GenerationKind.CHAT else "cmpl")
        self.router_metrics.routed(route, opened)
        return ChatStream(self, call, route, opened, gen)

    async def complete(self, call: ChatCall, requested: str, gen: GenerationRequest, **kwargs: Any) -> Answer:
        """One whole answer through the same path."""
        return await (await self.open(call, requested, gen, **kwargs)).collect()

    @staticmethod
    def _features(requested: str, gen: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": requested, "max_tokens": gen.params.max_tokens}
        if gen.kind is GenerationKind.CHAT:
            body["messages"] = gen.messages
            if gen.tools:
                body["tools"] = gen.tools
        else:
            body["prompt"] = gen.prompt
        if gen.params.response_format is not None:
            body["response_format"] = gen.params.response_format.model_dump(exclude_none=True)
        if gen.params.user:
            body["user"] = gen.params.user
        return body

    async def reserve(self, call: ChatCall, route: Route, gen: GenerationRequest, expected: int) -> None:
        """Before the backend is called: count the request and reserve its most tokens against the
        rate limits (key, team, model), and its most cost against the budgets (key, team, user)."""
        model = route.plan[0] if route.plan else call.model
        tokens = call.tokens = estimate_tokens(_prompt_text(gen)) + expected
        call.admission = await self.limiter.admit(call.principal, model, tokens)
        most = 0.0  # the dearest model the plan may fall back to
        for m in route.plan or [model]:
            spec = self.settings.model(m)
            if spec is not None and spec.task == "chat":
                most = max(most, spec.price(tokens - expected, expected))
        try:
            call.reservation = await self.book.reserve(call.principal, most)
        except BaseException:
            self.release(call)
            raise

    async def admit_fallback(self, call: ChatCall, model: str) -> RateLimited | None:
        """Before the router tries a fallback model: that model's own rate limits (the key and
        team counted the call already); the refusal, if any, for the router to skip it."""
        if model in call.fallback_admissions:
            return None
        try:
            call.fallback_admissions[model] = await self.limiter.admit(call.principal, model, call.tokens,
                                                                       model_only=True)
        except RateLimited as e:
            return e
        return None

    def release(self, call: ChatCall) -> None:
        """A call that never reached a backend gives its reservations back."""
        if call.admission is not None:
            call.admission.settle(None)
        for admission in call.fallback_admissions.values():
            admission.settle(None)
        if call.reservation is not None:
            self.book.release(call.reservation)
            call.reservation = None

    def settle(self, call: ChatCall, usage: Usage | None, error: bool = False) -> float:
        """Meter, price and (for routed calls) record one call's usage; returns its cost in USD."""
        used = usage.prompt_tokens + usage.completion_tokens if usage is not None else None
        if call.admission is not None:
            call.admission.settle(used)
        for model, admission in call.fallback_admissions.items():  # only the model that answered used any
            admission.settle(used if model == call.model else None)
        u = usage or Usage()
        if usage is not None:
            self.metrics.usage(call.model, u.prompt_tokens, u.completion_tokens)
        spec = self.settings.model(call.model)
        cost = spec.price(u.prompt_tokens, u.completion_tokens) if spec is not None and spec.task == "chat" else 0.0
        if cost:
            self.router_metrics.cost(call.model, cost)
        self.llm.finished(call.model, call.route, call.principal.team, seconds=call.elapsed(),
                          prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cost_usd=cost,
                          error=error)
        self.llm.in_flight(call.model, self.router.outstanding.get(call.model, 0))
        if call.routed is not None or call.route == "orchestrate":
            p, r = call.principal, call.routed
            reservation, call.reservation = call.reservation, None
            self.book.record({
                "response_id": call.response_id, "key_id": p.key_id, "team": p.team, "user": p.user,
                "model": call.model,
                "requested": r.requested if r else call.model, "route": call.route,
                "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "cost_usd": cost,
                "latency_s": round(call.elapsed(), 6), "error": error,
                "experiment": r.experiment if r else None, "arm": r.arm if r else None}, reservation)
        elif call.reservation is not None:
            self.book.release(call.reservation)
            call.reservation = None
        return cost

    def failed(self, call: ChatCall, e: APIError) -> None:
        """A call that failed before its answer: experiments count their failures in the ledger."""
        if call.routed is not None and call.routed.experiment:
            self.settle(call, None, error=True)
