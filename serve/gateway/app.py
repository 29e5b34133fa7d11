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
from pydantic import BaseModel, ValidationError
from ray import serve

from config import Settings, settings_from_dict
from models.errors import (
    APIError,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    NotFound,
    PayloadTooLarge,
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
    Usage,
    new_id,
    now,
)
from serve.gateway.auth import Authenticator, Principal
from serve.applications import RAG_APP
from serve.gateway.backends import Backend, BackendRegistry, unwrap
from serve.gateway.errors import error_response, install_error_handlers, invalid_request
from serve.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# `model: "rag"` (default collection) or `"rag:<collection>"` in a chat request answers from the
# RAG service, so any OpenAI client can ask the knowledge base.
RAG_ALIAS = "rag"


def rag_collection(model: str) -> tuple[bool, str | None]:
    """(is this the RAG alias, the collection it names)."""
    name, sep, collection = model.partition(":")
    return name == RAG_ALIAS and (not sep or bool(collection)), collection or None


app = FastAPI(title="ORFEAS gateway", version="0.1.0", docs_url="/docs", redoc_url=None)
install_error_handlers(app)


def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


class _Call:
    """Bookkeeping for one request: its route, model tag and start time, for metrics."""

    def __init__(self, route: str):
        self.route, self.model, self.start = route, "-", time.perf_counter()

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
            ModelCard(id=m.id, task=m.task, engine=m.engine, status=h.status, error=h.error, max_context=m.max_context)
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
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            req = await self._parse(request, request_cls)
            if kind == "chat" and rag_collection(req.model)[0]:
                return await self._rag_chat(req, principal, call)
            backend = await self._backend(req.model, principal, "chat")
            call.model = req.model
            params = self._params(req)
            if kind == "chat":
                payload = {"messages": [m.model_dump(exclude_none=True) for m in req.messages]}
            else:
                payload = {"prompt": req.prompt}
            events = self._bounded(backend.stream(kind, payload, params.model_dump()), req.model)
            if not req.stream:
                text, last = await self._collect(events, call)
                body = self._final_response(kind, req.model, text, last)
                self._count(call, last.usage)
                self.metrics.record(call.route, call.model, 200, call.elapsed())
                return JSONResponse(body.model_dump())
            first = await anext(events)  # failures before the first token keep their status
        except APIError as e:
            if isinstance(e, ModelUnavailable):
                self.backends.forget_health(call.model)  # look again on the next request
            return self._fail(call, e)
        return StreamingResponse(
            self._stream(kind, req, first, events, call),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(self, kind: str, req, first: GenerationEvent, events: AsyncIterator[GenerationEvent], call: _Call):
        rid, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), now()
        status, error_type, usage = 200, None, None

        def chunk(text: str | None = None, finish: str | None = None, role: bool = False) -> str:
            if kind == "chat":
                delta = ChatDelta(role="assistant" if role else None, content=text)
                return _sse(ChatCompletionChunk(id=rid, created=created, model=req.model,
                                                choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]))
            return _sse(Completion(id=rid, created=created, model=req.model,
                                   choices=[CompletionChoice(text=text or "", finish_reason=finish)]))

        try:
            if kind == "chat":
                yield chunk("", role=True)
            event: GenerationEvent | None = first
            ttft_seen = False
            while event is not None:
                if event.text:
                    if not ttft_seen:
                        self.metrics.ttft.observe(call.elapsed(), {"route": call.route, "model": call.model})
                        ttft_seen = True
                    yield chunk(event.text)
                if event.finish_reason:
                    usage = event.usage
                    yield chunk(None if kind == "chat" else "", finish=event.finish_reason)
                    break
                event = await anext(events, None)
            if req.include_usage:
                usage = usage or Usage()
                cls = ChatCompletionChunk if kind == "chat" else Completion
                yield _sse(cls(id=rid, created=created, model=req.model, choices=[], usage=usage))
            yield "data: [DONE]\n\n"
        except Exception as e:
            # Past the first token the status line is sent: report the error in the stream itself.
            if not isinstance(e, APIError):
                log.exception("stream from %s failed", call.model)
                e = ModelUnavailable(f"model {call.model!r} failed while streaming: {type(e).__name__}")
            status, error_type = e.status, e.type
            yield _sse(e.body())
        finally:
            self._count(call, usage)
            self.metrics.record(call.route, call.model, status, call.elapsed(), error_type)

    async def _collect(self, events: AsyncIterator[GenerationEvent], call: _Call) -> tuple[str, GenerationEvent]:
        parts: list[str] = []
        async for event in events:
            if event.text:
                if not parts:
                    self.metrics.ttft.observe(call.elapsed(), {"route": call.route, "model": call.model})
                parts.append(event.text)
            if event.finish_reason:
                return "".join(parts), event
        raise ModelUnavailable(f"model {call.model!r} ended its answer without finishing")

    def _final_response(self, kind: str, model: str, text: str, last: GenerationEvent) -> BaseModel:
        usage = last.usage or Usage()
        if kind == "chat":
            choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason)
            return ChatCompletion(model=model, choices=[choice], usage=usage)
        return Completion(model=model, choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
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

    @app.post("/v1/rag/query")
    async def rag_query(self, request: Request) -> JSONResponse:
        call = _Call("rag")
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            result = await self._rag_query(await self._read_json(request), principal)
        except APIError as e:
            return self._fail(call, e)
        self.metrics.record(call.route, call.model, 200, call.elapsed())
        return JSONResponse(result)

    async def _rag_query(self, body: dict, principal: Principal) -> dict:
        """Resolve the generating model (the request's, else rag.chat_model), then ask the RAG service."""
        if not self.settings.rag.enabled:
            raise NotFound("the RAG service is not enabled on this platform (rag.enabled: false)")
        model = body.get("model")
        if body.get("answer") is False:
            model = None  # retrieval only: no generator needed
        elif isinstance(model, str) and model:
            await self._backend(model, principal, "chat")  # named explicitly: it must be usable
        elif self.settings.rag.chat_model:
            model = self.settings.rag.chat_model
            try:
                await self._backend(model, principal, "chat")
            except APIError:
                model = None  # the default generator is not usable now: answer extractively
        else:
            model = None
        if self._rag is None:
            self._rag = serve.get_app_handle(RAG_APP)
        try:
            return await asyncio.wait_for(self._rag.query.remote(body, model), self.timeout_s)
        except TimeoutError:
            raise UpstreamTimeout(f"the RAG service did not answer within {self.timeout_s:g}s") from None
        except Exception as e:
            raise unwrap(e) from None

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
        """The chat path for in-cluster callers (the RAG service): text of one greedy answer."""
        call = _Call("internal")
        call.model = model_id
        backend = self.backends.get(model_id)
        if backend is None:
            raise ModelNotFound(f"model {model_id!r} does not exist", "model")
        params = GenerationParams(max_tokens=None, max_tokens_cap=min(max_tokens, self.limits.max_tokens),
                                  temperature=0.0)
        events = self._bounded(backend.stream("chat", {"messages": messages}, params.model_dump()), model_id)
        text, last = await self._collect(events, call)
        self._count(call, last.usage)
        return text

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
        """The body as a JSON object, within the size limit."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise PayloadTooLarge(f"request body is {declared} bytes, over the limit of {self.limits.max_body_bytes}")
        body = await request.body()
        if len(body) > self.limits.max_body_bytes:
            raise PayloadTooLarge(f"request body is {len(body)} bytes, over the limit of {self.limits.max_body_bytes}")
        try:
            data = json.loads(body)
        except ValueError:
            raise InvalidRequest("request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object")
        return data

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

    def _count(self, call: _Call, usage: Usage | None) -> None:
        if usage is not None:
            self.metrics.usage(call.model, usage.prompt_tokens, usage.completion_tokens)

    def _fail(self, call: _Call, e: APIError) -> JSONResponse:
        self.metrics.record(call.route, call.model, e.status, call.elapsed(), e.type)
        return error_response(e)


def build_app(args: dict[str, Any]):
    """Serve application builder for the gateway (see serve.applications)."""
    settings = settings_from_dict(args["settings"])
    g = settings.gateway
    return serve.deployment(Gateway).options(
        name="Gateway",
        num_replicas=g.num_replicas,
        max_ongoing_requests=g.max_ongoing_requests,
        ray_actor_options={"num_cpus": g.num_cpus},
    ).bind(settings.to_dict())
