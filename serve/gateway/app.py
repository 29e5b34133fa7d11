"""The OpenAI-compatible gateway: a FastAPI app as the Serve ingress (no postponed annotations:
FastAPI reads the route signatures at class-decoration time).

Each request: size limit -> authenticate -> parse -> resolve the model (exists, allowed, right
task, healthy) -> generate through the model's backend. A stream starts only once the first
event is in hand, so every failure before the first token gets its proper HTTP status.
"""


import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from config import Settings, settings_from_dict
from models.errors import (
    APIError,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    NotFound,
    PermissionDenied,
    UpstreamTimeout,
)
from models.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    GenerationEvent,
    GenerationParams,
    ModelCard,
    ModelList,
    ToolCall,
    ToolCallCollector,
    Usage,
    new_id,
    now,
)
from security.auth import Authenticator, Principal
from config.names import RAG_APP
from serve.applications import replica_actor_options
from serve.gateway.backends import Backend, BackendRegistry, unwrap
from serve.gateway.body import read_json
from serve.gateway.errors import error_response, install_error_handlers, invalid_request
from serve.gateway.metrics import GatewayMetrics, RouterMetrics
from analytics.budgets import UsageBook
from serve.router.orchestrator import CallResult, OrchestrateRequest, Orchestrator
from serve.router.runtime import Opened, Route, Router, ascii_header

log = logging.getLogger(__name__)

# `model: "rag"` (default collection) or `"rag:<collection>"` in a chat request answers from the
# RAG service, so any OpenAI client can ask the knowledge base.
RAG_ALIAS = "rag"
RAG_DISABLED = "the RAG service is not enabled on this platform (rag.enabled: false)"


def rag_collection(model: str) -> tuple[bool, str | None]:
    """(is this the RAG alias, the collection it names)."""
    name, sep, collection = model.partition(":")
    return name == RAG_ALIAS and (not sep or bool(collection)), collection or None


# Who in-cluster callers (RAG generation, agents) are to the router and the ledger.
INTERNAL_CALLER = Principal("internal", "admin", None)

app = FastAPI(title="ORFEAS gateway", version="0.1.0", docs_url="/docs", redoc_url=None)
install_error_handlers(app)


def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


class _Feedback(BaseModel):
    model_config = {"extra": "forbid"}
    response_id: str = Field(min_length=1, max_length=200)
    score: float = Field(ge=-1, le=1, description="1 good, 0 neutral, -1 bad (any value in between).")
    comment: str = Field("", max_length=2000)


def _since(since: str | None, period: str | None) -> float | None:
    """`since` (unix seconds) or `period` (day | month: the current one) as a start time."""
    from analytics.ledger import period_start

    if since is not None and period is not None:
        raise InvalidRequest("give since or period, not both", "since")
    if period is not None:
        if period not in ("day", "month"):
            raise InvalidRequest(f"period must be 'day' or 'month', not {period!r}", "period")
        return period_start(period, time.time())
    if since is not None:
        try:
            return float(since)
        except ValueError:
            raise InvalidRequest(f"since must be unix seconds, not {since!r}", "since") from None
    return None


class _Call:
    """Bookkeeping for one request: its route, model tag and start time, for metrics and the ledger."""

    def __init__(self, route: str):
        self.route, self.model, self.start = route, "-", time.perf_counter()
        self.principal: Principal | None = None
        self.routed: Route | None = None
        self.response_id: str | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@serve.ingress(app)
class Gateway:
    def __init__(self, settings: dict[str, Any]):
        self.settings: Settings = settings_from_dict(settings)
        self.auth = Authenticator(self.settings)
        self.backends = BackendRegistry(self.settings)
        self.metrics = GatewayMetrics()
        self.limits = self.settings.limits
        self.timeout_s = self.settings.gateway.request_timeout_s
        self._rag = None
        self.router = Router(self.settings, self.backends, embed=self._classifier_embed)
        self.router_metrics = RouterMetrics()
        self.router.listeners.append(self.router_metrics.breaker_transition)
        self.book = UsageBook(self.settings)

    async def _classifier_embed(self, texts: list[str]) -> list[list[float]]:
        """Embeddings for the router's task classifier (router.classifier_model)."""
        mid = self.settings.router.classifier_model
        spec = self.settings.model(mid)
        if spec is None or spec.task != "embedding" or (await self.backends.health(mid)).status != "ready":
            raise ModelUnavailable(f"classifier model {mid!r} is not available")
        vectors, _ = await self.backends.get(mid).embed(texts)
        return vectors

    # ------------------------------------------------------------ health

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        states = await self._all_health(None)
        ready = any(card.status == "ready" for card in states)
        body = {"status": "ready" if ready else "unavailable",
                "models": {c.id: c.status for c in states}}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def _all_health(self, principal: Principal | None) -> list[ModelCard]:
        specs = [m for m in self.settings.models if principal is None or principal.may_use(m.id)]
        healths = await asyncio.gather(*(self.backends.health(m.id) for m in specs))
        cards = [
            ModelCard(id=m.id, task=m.task, engine=m.engine, status=h.status, error=h.error, max_context=m.max_context,
                      **({"capabilities": list(m.capabilities), "price_input_per_m": m.price_input_per_m,
                          "price_output_per_m": m.price_output_per_m, "tags": list(m.tags), "serves": m.serves}
                         if m.task == "chat" else {}))
            for m, h in zip(specs, healths)
        ]
        if self.settings.rag.enabled:
            h = await self.backends.app_health(RAG_APP)
            cards.append(ModelCard(id=RAG_ALIAS, task="rag", engine="rag", status=h.status, error=h.error))
        return cards

    # ------------------------------------------------------------ /v1/models

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        call = _Call("models")
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            cards = await self._all_health(principal)
        except APIError as e:
            return self._fail(call, e)
        self.metrics.record(call.route, call.model, 200, call.elapsed())
        return JSONResponse(ModelList(data=cards).model_dump())

    # ------------------------------------------------------------ generation

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, "chat", ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, "completion", CompletionRequest)

    async def _generate(self, request: Request, kind: str, request_cls):
        call = _Call(kind)
        try:
            principal = call.principal = await self.auth.authenticate(request.headers.get("authorization"))
            req = await self._parse(request, request_cls)
            if kind == "chat" and rag_collection(req.model)[0]:
                return await self._rag_chat(req, principal, call)
            if kind == "chat" and req.model == self.settings.router.orchestrator.alias:
                return await self._orchestrate_chat(req, principal, call)
            params = self._params(req)
            if kind == "chat":
                payload = {"messages": [m.model_dump(exclude_none=True) for m in req.messages], **req.tool_payload()}
            else:
                payload = {"prompt": req.prompt}
            call.model = req.model
            remaining = await self.book.remaining(principal)
            max_out = params.max_tokens or min(self.settings.router.expected_output_tokens, self.limits.max_tokens)
            route = call.routed = await self.router.resolve(
                req.model, req.model_dump(exclude_none=True), principal, request.headers, max_out, remaining)
            opened = await self.router.open(route, kind, payload, params.model_dump(),
                                            time.monotonic() + self.timeout_s)
            call.model = opened.model
            call.response_id = new_id("chatcmpl" if kind == "chat" else "cmpl")
            self.router_metrics.routed(route, opened)
            headers = self._route_headers(call, route, opened)
            if not req.stream:
                text, last, calls = await self._collect(self._chain(opened), call)
                body = self._final_response(kind, opened.model, text, last, call.response_id, calls)
                cost = self._count(call, last.usage)
                headers["x-orfeas-cost-usd"] = f"{cost:.8f}"
                self.metrics.record(call.route, call.model, 200, call.elapsed())
                return JSONResponse(body.model_dump(), headers=headers)
        except APIError as e:
            if isinstance(e, ModelUnavailable):
                self.backends.forget_health(call.model)  # look again on the next request
            return self._fail(call, e)
        return StreamingResponse(
            self._stream(kind, req, opened.first, opened.events, call),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )

    @staticmethod
    async def _chain(opened: Opened) -> AsyncIterator[GenerationEvent]:
        yield opened.first
        async for event in opened.events:
            yield event

    def _route_headers(self, call: _Call, route: Route, opened: Opened) -> dict[str, str]:
        headers = {"x-orfeas-model": opened.model, "x-orfeas-route": ascii_header(route.reason),
                   "x-orfeas-attempts": ascii_header(",".join(f"{m}:{o}" for m, o in opened.attempts)),
                   "x-orfeas-response-id": call.response_id or ""}
        if route.experiment:
            headers["x-orfeas-experiment"] = f"{route.experiment}/{route.arm}"
        return headers

    async def _stream(self, kind: str, req, first: GenerationEvent, events: AsyncIterator[GenerationEvent], call: _Call):
        rid, created = call.response_id or new_id("chatcmpl" if kind == "chat" else "cmpl"), now()
        call.response_id = rid
        model = call.model if call.routed is not None else req.model
        status, error_type, usage = 200, None, None

        def chunk(text: str | None = None, finish: str | None = None, role: bool = False, calls=None) -> str:
            if kind == "chat":
                delta = ChatDelta(role="assistant" if role else None, content=text, tool_calls=calls)
                return _sse(ChatCompletionChunk(id=rid, created=created, model=model,
                                                choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]))
            return _sse(Completion(id=rid, created=created, model=model,
                                   choices=[CompletionChoice(text=text or "", finish_reason=finish)]))

        # SSE events are sent in as few writes as the stream allows (the role with the first text,
        # the finish with usage and [DONE]): each write is one message from this replica to the proxy.
        pending = chunk("", role=True) if kind == "chat" else ""
        try:
            event: GenerationEvent | None = first
            ttft_seen = False
            while event is not None:
                if event.text:
                    if not ttft_seen:
                        self.metrics.ttft.observe(call.elapsed(), {"route": call.route, "model": call.model})
                        ttft_seen = True
                    pending += chunk(event.text)
                if event.tool_calls and kind == "chat":
                    pending += chunk(calls=event.tool_calls)
                if event.finish_reason:
                    usage = event.usage
                    pending += chunk(None if kind == "chat" else "", finish=event.finish_reason)
                    break
                if pending:
                    yield pending
                    pending = ""
                event = await anext(events, None)
            if req.include_usage:
                usage = usage or Usage()
                cls = ChatCompletionChunk if kind == "chat" else Completion
                pending += _sse(cls(id=rid, created=created, model=model, choices=[], usage=usage))
            yield pending + "data: [DONE]\n\n"
            pending = ""
        except Exception as e:
            # Past the first token the status line is sent: report the error in the stream itself.
            if not isinstance(e, APIError):
                log.exception("stream from %s failed", call.model)
                e = ModelUnavailable(f"model {call.model!r} failed while streaming: {type(e).__name__}")
            status, error_type = e.status, e.type
            yield pending + _sse(e.body())
        finally:
            await events.aclose()
            self._count(call, usage, error=status != 200)
            self.metrics.record(call.route, call.model, status, call.elapsed(), error_type)

    async def _collect(self, events: AsyncIterator[GenerationEvent],
                       call: _Call) -> tuple[str, GenerationEvent, list[ToolCall] | None]:
        """The whole answer: its text, the finishing event and the tool calls it made (if any)."""
        parts: list[str] = []
        calls = ToolCallCollector()
        first = True
        async for event in events:
            if (event.text or event.tool_calls) and first:
                self.metrics.ttft.observe(call.elapsed(), {"route": call.route, "model": call.model})
                first = False
            if event.text:
                parts.append(event.text)
            calls.add(event.tool_calls)
            if event.finish_reason:
                return "".join(parts), event, calls.calls()
        raise ModelUnavailable(f"model {call.model!r} ended its answer without finishing")

    def _final_response(self, kind: str, model: str, text: str, last: GenerationEvent, rid: str,
                        calls: list[ToolCall] | None = None) -> BaseModel:
        usage = last.usage or Usage()
        if kind == "chat":
            message = AssistantMessage(content=text or (None if calls else ""), tool_calls=calls)
            choice = ChatChoice(message=message, finish_reason=last.finish_reason)
            return ChatCompletion(id=rid, model=model, choices=[choice], usage=usage)
        return Completion(id=rid, model=model, choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
                          usage=usage)

    async def _bounded(self, events: AsyncIterator[GenerationEvent], model: str) -> AsyncIterator[GenerationEvent]:
        """The backend's events within the request deadline; closing this closes the backend stream."""
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                        event = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise UpstreamTimeout(f"model {model!r} did not finish within {self.timeout_s:g}s") from None
                yield event
        finally:
            await events.aclose()

    def _params(self, req: ChatCompletionRequest | CompletionRequest) -> GenerationParams:
        limit = req.token_limit()
        if limit is not None and limit > self.limits.max_tokens:
            raise InvalidRequest(
                f"max_tokens is {limit}, over this gateway's limit of {self.limits.max_tokens}", "max_tokens"
            )
        return GenerationParams(max_tokens=limit, max_tokens_cap=self.limits.max_tokens, temperature=req.temperature,
                                top_p=req.top_p, stop=req.stop, seed=req.seed)

    # ------------------------------------------------------------ RAG

    @app.api_route("/v1/rag/{path:path}", methods=["GET", "POST"])
    async def rag_disabled(self, path: str) -> JSONResponse:
        """The RAG app serves /v1/rag/* under its own route prefix; this answers only without it."""
        return error_response(NotFound(RAG_DISABLED))

    async def _rag_call(self, method: str, *args):
        if not self.settings.rag.enabled:
            raise NotFound(RAG_DISABLED)
        if self._rag is None:
            self._rag = serve.get_app_handle(RAG_APP)
        try:
            return await asyncio.wait_for(getattr(self._rag, method).remote(*args), self.timeout_s)
        except TimeoutError:
            raise UpstreamTimeout(f"the RAG service did not answer within {self.timeout_s:g}s") from None
        except Exception as e:
            raise unwrap(e) from None

    async def rag_generator(self, model: str | None, principal: Principal) -> str | None:
        """The chat model a RAG answer generates with (also called by the RAG app's /v1/rag/query):
        a named model must be usable by this key (its errors are the caller's); else rag.chat_model
        when it is usable now; else None, and the answer is extractive."""
        if model:
            await self._backend(model, principal, "chat")
            return model
        if self.settings.rag.chat_model:
            try:
                await self._backend(self.settings.rag.chat_model, principal, "chat")
                return self.settings.rag.chat_model
            except APIError:
                pass  # the default generator is not usable now: answer extractively
        return None

    async def _rag_query(self, body: dict, principal: Principal) -> dict:
        return await self._rag_call("query", body, await self.rag_generator(None, principal))

    async def _rag_chat(self, req: ChatCompletionRequest, principal: Principal, call: _Call):
        """A chat request to the `rag` alias: the last user message is the question."""
        call.route, call.model = "chat-rag", RAG_ALIAS
        question = next((m.text() for m in reversed(req.messages) if m.role == "user"), "").strip()
        if not question:
            raise InvalidRequest("the rag model answers the last user message, and there is none", "messages")
        _, collection = rag_collection(req.model)
        result = await self._rag_query({"query": question, "collection": collection}, principal)
        answered_by = f"{RAG_ALIAS}/{result['model']}"
        diag = result["diagnostics"]
        usage = Usage.of(diag["context_tokens"], result.get("completion_tokens") or len(result["answer"].split()))
        if req.stream:
            async def events():
                yield GenerationEvent(finish_reason="stop", usage=usage)

            req.model = answered_by
            return StreamingResponse(self._stream("chat", req, GenerationEvent(text=result["answer"]), events(), call),
                                     media_type="text/event-stream")
        body = ChatCompletion(model=answered_by, usage=usage, choices=[
            ChatChoice(message=AssistantMessage(content=result["answer"]), finish_reason="stop")]).model_dump()
        body["citations"] = result["citations"]  # beyond OpenAI's shape; clients see it as an extra field
        self.metrics.record(call.route, call.model, 200, call.elapsed())
        return JSONResponse(body)

    async def complete_chat(self, model_id: str, messages: list[dict], max_tokens: int) -> str:
        """The text of one greedy answer, for in-cluster callers that want only text (RAG)."""
        return (await self.chat_message(model_id, messages, max_tokens))["content"] or ""

    async def chat_message(self, model_id: str, messages: list[dict], max_tokens: int,
                           tools: list[dict] | None = None) -> dict[str, Any]:
        """The chat path for in-cluster callers (the RAG service, agents): one greedy answer.

        It goes through the router like any chat request, so `auto`, policies, logical models,
        fallbacks, breakers and the cost ledger apply; the caller is the platform itself. Returns
        the assistant message (`content`, `tool_calls` in OpenAI's shape when `tools` were offered
        and the model called them) with the model that answered, its usage and its cost.
        """
        call = _Call("internal")
        call.principal, call.model = INTERNAL_CALLER, model_id
        params = GenerationParams(max_tokens=None, max_tokens_cap=min(max_tokens, self.limits.max_tokens),
                                  temperature=0.0)
        payload: dict[str, Any] = {"messages": messages, **({"tools": tools} if tools else {})}
        body = {"model": model_id, "max_tokens": params.max_tokens_cap, **payload}
        route = call.routed = await self.router.resolve(model_id, body, call.principal, {}, params.max_tokens_cap,
                                                        None)
        opened = await self.router.open(route, "chat", payload, params.model_dump(),
                                        time.monotonic() + self.timeout_s)
        call.model, call.response_id = opened.model, new_id("chatcmpl")
        self.router_metrics.routed(route, opened)
        text, last, calls = await self._collect(self._chain(opened), call)
        cost = self._count(call, last.usage)
        usage = last.usage or Usage()
        return {"content": text or None, "tool_calls": [c.model_dump() for c in calls] if calls else None,
                "model": opened.model, "usage": usage.model_dump(), "cost_usd": cost}

    # ------------------------------------------------------------ orchestrator

    @app.post("/v1/orchestrate")
    async def orchestrate(self, request: Request) -> JSONResponse:
        """Plan, run subtasks in parallel across backends, combine (see serve.router.orchestrator)."""
        call = _Call("orchestrate")
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            body = await self._read_json(request)
            try:
                req = OrchestrateRequest.model_validate(body)
            except ValidationError as e:
                raise invalid_request(e) from None
            if req.max_tokens is not None and req.max_tokens > self.limits.max_tokens:
                raise InvalidRequest(f"max_tokens is {req.max_tokens}, over this gateway's limit of "
                                     f"{self.limits.max_tokens}", "max_tokens")
            result = await self._orchestrate(req, principal)
        except APIError as e:
            return self._fail(call, e)
        self.metrics.record(call.route, call.model, 200, call.elapsed())
        return JSONResponse({"id": new_id("orch"), "created": now(), **result})

    async def _orchestrate(self, req: OrchestrateRequest, principal: Principal) -> dict:
        for m in req.models or []:
            spec = self.settings.model(m)
            if spec is not None:
                principal.check_model(m)
            elif self.router.policy(m) is None and m not in self.router.groups and m not in self.router.experiments:
                raise ModelNotFound(f"model {m!r} does not exist; GET /v1/models lists the models", "models")
        await self.book.remaining(principal)  # refuse up front when the budget is spent
        deadline = time.monotonic() + self.timeout_s

        async def call_model(model: str, messages: list[dict], max_tokens: int, task: str | None,
                             json_mode: bool) -> CallResult:
            c = _Call("orchestrate")
            c.principal = principal
            body: dict[str, Any] = {"model": model, "messages": messages}
            if json_mode:
                body["response_format"] = {"type": "json_object"}
            headers = {"x-orfeas-task": task} if task else {}
            route = c.routed = await self.router.resolve(model, body, principal, headers, max_tokens,
                                                         await self.book.remaining(principal))
            max_tokens = min(max_tokens, self.limits.max_tokens)
            params = GenerationParams(max_tokens=max_tokens, max_tokens_cap=self.limits.max_tokens, temperature=0.0)
            opened = await self.router.open(route, "chat", {"messages": messages}, params.model_dump(), deadline)
            c.model, c.response_id = opened.model, new_id("orchcall")
            text, last, _ = await self._collect(self._chain(opened), c)
            u = last.usage or Usage()
            cost = self._count(c, u)
            return CallResult(model=opened.model, text=text, prompt_tokens=u.prompt_tokens,
                              completion_tokens=u.completion_tokens, cost_usd=cost)

        try:
            return await Orchestrator(self.settings.router.orchestrator, call_model).run(req)
        except RuntimeError as e:
            raise ModelUnavailable(str(e)[:1000]) from None

    async def _orchestrate_chat(self, req: ChatCompletionRequest, principal: Principal, call: _Call):
        """The orchestrator as a chat model: the last user message is the task, answered in one message."""
        call.route, call.model = "chat-orchestrate", req.model
        task = next((m.text() for m in reversed(req.messages) if m.role == "user"), "").strip()
        if not task:
            raise InvalidRequest("the orchestrator answers the last user message, and there is none", "messages")
        limit = req.token_limit()
        if limit is not None and limit > self.limits.max_tokens:
            raise InvalidRequest(f"max_tokens is {limit}, over this gateway's limit of {self.limits.max_tokens}",
                                 "max_tokens")
        result = await self._orchestrate(OrchestrateRequest(task=task, max_tokens=limit), principal)
        usage = Usage.of(result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"])
        rid = new_id("chatcmpl")
        if req.stream:
            async def events():
                yield GenerationEvent(finish_reason="stop", usage=usage)

            call.response_id = rid
            return StreamingResponse(self._stream("chat", req, GenerationEvent(text=result["answer"]), events(), call),
                                     media_type="text/event-stream")
        body = ChatCompletion(id=rid, model=req.model, usage=usage, choices=[
            ChatChoice(message=AssistantMessage(content=result["answer"]), finish_reason="stop")]).model_dump()
        body["orchestration"] = {k: result[k] for k in ("strategy", "plan", "subtasks", "timings", "cost_usd")}
        self.metrics.record(call.route, call.model, 200, call.elapsed())
        return JSONResponse(body)

    # ------------------------------------------------------------ router: usage, feedback, status

    @app.get("/v1/usage")
    async def usage(self, request: Request) -> JSONResponse:
        """Usage and cost from the ledger: admins see every key (or `key_id=`), users their own."""
        call = _Call("usage")
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            q = request.query_params
            unknown = set(q) - {"key_id", "since", "period"}
            if unknown:
                raise InvalidRequest(f"unknown query parameter {sorted(unknown)[0]!r}", sorted(unknown)[0])
            key_id = q.get("key_id")
            if principal.role != "admin":
                if key_id not in (None, principal.key_id):
                    raise PermissionDenied("a user key may only read its own usage", "key_id")
                key_id = principal.key_id
            since = _since(q.get("since"), q.get("period"))
            data = await self.book.actor.usage.remote(key_id, since)
            body = {"object": "usage", "key_id": key_id, "since": since, **data}
            if principal.role != "admin" or key_id == principal.key_id:
                body["budget"] = await self._budget_view(principal)
        except APIError as e:
            return self._fail(call, e)
        self.metrics.record(call.route, call.model, 200, call.elapsed())
        return JSONResponse(body)

    async def _budget_view(self, principal: Principal) -> dict | None:
        if principal.budget_usd is None:
            return None
        spent = await self.book.spend(principal.key_id, principal.budget_period)
        return {"period": principal.budget_period, "limit_usd": principal.budget_usd, "spent_usd": spent,
                "remaining_usd": max(principal.budget_usd - spent, 0.0)}

    @app.post("/v1/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        """A score for an earlier response (by its id), counted in its experiment arm's figures."""
        call = _Call("feedback")
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            fb = _Feedback.model_validate(await self._read_json(request))
            try:
                result = await self.book.actor.add_feedback.remote(
                    fb.response_id, fb.score, None if principal.role == "admin" else principal.key_id, fb.comment)
            except KeyError:  # Ray raises the actor's error as an instance of its cause
                raise NotFound(f"no response {fb.response_id!r} of this key is in the ledger", "response_id") \
                    from None
        except ValidationError as e:
            return self._fail(call, invalid_request(e))
        except APIError as e:
            return self._fail(call, e)
        self.metrics.record(call.route, call.model, 200, call.elapsed())
        return JSONResponse({"object": "feedback", **result})

    @app.get("/v1/router/status")
    async def router_status_http(self, request: Request) -> JSONResponse:
        call = _Call("router-status")
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            if principal.role != "admin":
                raise PermissionDenied("router status is for admin keys")
        except APIError as e:
            return self._fail(call, e)
        return JSONResponse(await self.router_status())

    async def router_status(self, probe: bool = False) -> dict:
        """Per-backend health and breaker state of this replica, and the names the router answers;
        with `probe`, after an active probe round of every backend (`orfeas status --probe`)."""
        if probe:
            await self.router.probe_all()
        return {"backends": self.router.status(),
                "routes": [{"name": n, "routes": what} for n, what in self.router.routed_names()]}

    # ------------------------------------------------------------ /v1/embeddings

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        call = _Call("embeddings")
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            req = await self._parse(request, EmbeddingRequest)
            backend = await self._backend(req.model, principal, "embedding")
            call.model = req.model
            texts = req.texts()
            if len(texts) > self.limits.max_embedding_inputs:
                raise InvalidRequest(
                    f"{len(texts)} inputs, over the limit of {self.limits.max_embedding_inputs} per request", "input"
                )
            vectors, counts = await asyncio.wait_for(backend.embed(texts), self.timeout_s)
            if req.dimensions is not None and vectors and req.dimensions != len(vectors[0]):
                raise InvalidRequest(
                    f"model {req.model!r} produces {len(vectors[0])}-dimensional vectors; "
                    f"dimensions={req.dimensions} is not supported", "dimensions",
                )
        except TimeoutError:
            return self._fail(call, UpstreamTimeout(f"model {call.model!r} did not answer within {self.timeout_s:g}s"))
        except APIError as e:
            return self._fail(call, e)
        data = [Embedding(index=i, embedding=_encode(v, req.encoding_format)) for i, v in enumerate(vectors)]
        usage = Usage.of(sum(counts))
        self._count(call, usage)
        self.metrics.record(call.route, call.model, 200, call.elapsed())
        return JSONResponse(EmbeddingList(data=data, model=req.model, usage=usage).model_dump())

    # ------------------------------------------------------------ shared steps

    async def _read_json(self, request: Request) -> dict:
        return await read_json(request, self.limits.max_body_bytes)

    async def _parse(self, request: Request, cls: type[BaseModel]):
        data = await self._read_json(request)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise invalid_request(e) from None

    async def _backend(self, model_id: str, principal: Principal, task: str) -> Backend:
        spec = self.settings.model(model_id)
        if spec is None:
            raise ModelNotFound(f"model {model_id!r} does not exist; GET /v1/models lists the models", "model")
        principal.check_model(model_id)
        if spec.task != task:
            use = "/v1/embeddings" if spec.task == "embedding" else "/v1/chat/completions or /v1/completions"
            raise InvalidRequest(f"model {model_id!r} is a {spec.task} model: use {use}", "model")
        health = await self.backends.health(model_id)
        if health.status != "ready":
            why = f": {health.error}" if health.error else ""
            raise ModelUnavailable(f"model {model_id!r} is {health.status}{why}", "model")
        return self.backends.get(model_id)

    def _count(self, call: _Call, usage: Usage | None, error: bool = False) -> float:
        """Meter, price and (for routed calls) record one response's usage; returns its cost in USD."""
        if usage is not None:
            self.metrics.usage(call.model, usage.prompt_tokens, usage.completion_tokens)
        spec = self.settings.model(call.model)
        u = usage or Usage()
        cost = spec.price(u.prompt_tokens, u.completion_tokens) if spec is not None and spec.task == "chat" else 0.0
        if cost:
            self.router_metrics.cost(call.model, cost)
        if call.routed is not None or call.route in ("orchestrate", "internal"):
            p, r = call.principal, call.routed
            self.book.record({
                "response_id": call.response_id, "key_id": p.key_id if p else None, "team": p.team if p else "",
                "model": call.model, "requested": r.requested if r else call.model, "route": call.route,
                "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "cost_usd": cost,
                "latency_s": round(call.elapsed(), 6), "error": error,
                "experiment": r.experiment if r else None, "arm": r.arm if r else None})
        return cost

    def _fail(self, call: _Call, e: APIError) -> JSONResponse:
        self.metrics.record(call.route, call.model, e.status, call.elapsed(), e.type)
        if call.routed is not None and call.routed.experiment:
            self._count(call, None, error=True)  # experiments count their failures
        return error_response(e)


def build_app(args: dict[str, Any]):
    """Serve application builder for the gateway (see serve.applications)."""
    settings = settings_from_dict(args["settings"])
    g = settings.gateway
    return serve.deployment(Gateway).options(
        name="Gateway",
        num_replicas=g.num_replicas,
        max_ongoing_requests=g.max_ongoing_requests,
        ray_actor_options=replica_actor_options(settings.serve, num_cpus=g.num_cpus),
    ).bind(settings.to_dict())
