"""The edge node's HTTP surface (FastAPI): the cluster's routes and shapes, served from one process.

    POST /v1/chat/completions   the local chat engine (models.engines.factory), streamed or not
    POST /v1/embeddings         the INT8 ONNX embedder
    POST /v1/rag/query          RAG over the synced local Qdrant Edge shard (rag.service)
    POST /v1/rag/notes          a note ingested here, queued for the cluster
    POST /v1/rag/feedback       feedback, queued for the cluster
    POST /v1/edge/sync          pull the delta and push the queue now
    GET  /healthz, /v1/edge/status

Errors are `models.errors` types in the cluster's body shape ({"error": {message, type, param,
code}}); auth is a bearer API key, the one the cluster accepted at the last sync. (The cluster's
serve/http layer cannot be imported here; the two small handlers below mirror it.)
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from edge.node import EdgeNode
from models.errors import APIError, InvalidRequest, ModelUnavailable
from models.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Embedding,
                             EmbeddingList, EmbeddingRequest, GenerationKind, GenerationParams, GenerationRequest,
                             Usage, new_id, now)
from rag.service import RagQueryRequest, parse_request

CHAT_MAX_TOKENS = 512


class NoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    title: str = ""


def build_app(node: EdgeNode) -> FastAPI:
    app = FastAPI(title="ORFEAS edge", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return api_error_body(InvalidRequest(f"invalid value for '{param}': {first.get('msg')}", param))

    def api_error_body(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def authenticated(request: Request) -> None:
        header = request.headers.get("authorization", "")
        node.check_key(header[7:].strip() if header.lower().startswith("bearer ") else None)

    auth = [Depends(authenticated)]

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "synced": node.synced()}

    @app.get("/v1/edge/status", dependencies=auth)
    async def status() -> dict[str, Any]:
        return {"collection": node.collection, "sync": node.syncer.state(), "pending_writes": len(node.outbox.pending()),
                "embedder": node.dense.variant, "chat_model": node.chat_spec.id if node.chat_spec else None}

    @app.post("/v1/edge/sync", dependencies=auth)
    async def sync() -> dict[str, Any]:
        return await asyncio.to_thread(node.sync)  # queries keep answering from the old version meanwhile

    @app.post("/v1/embeddings", response_model=EmbeddingList, dependencies=auth)
    async def embeddings(req: EmbeddingRequest) -> EmbeddingList:
        if req.dimensions is not None and req.dimensions != node.dense.dim:
            raise InvalidRequest(f"the edge's embedder has {node.dense.dim} dimensions", "dimensions")
        texts = req.texts()
        vecs, counts = await asyncio.to_thread(lambda: (node.dense.embed(texts), node.dense.token_counts(texts)))

        def encode(v):  # base64: little-endian float32 bytes, as OpenAI sends them (the openai client's default)
            return base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" \
                else v.tolist()

        return EmbeddingList(data=[Embedding(index=i, embedding=encode(v)) for i, v in enumerate(vecs)],
                             model=req.model, usage=Usage.of(sum(counts)))

    @app.post("/v1/rag/query", dependencies=auth)
    async def rag_query(body: dict[str, Any]) -> JSONResponse:
        req: RagQueryRequest = parse_request(body)
        generate = _generator(node) if req.answer and node.chat is not None else None
        resp = await asyncio.to_thread(node.rag.query, req, generate, node.chat_spec.id if generate else None)
        return JSONResponse(resp.model_dump(mode="json"))

    @app.post("/v1/rag/notes", dependencies=auth, status_code=201)
    async def notes(req: NoteRequest) -> dict[str, Any]:
        return await asyncio.to_thread(node.add_note, req.text, req.title)

    @app.post("/v1/rag/feedback", dependencies=auth, status_code=201)
    async def feedback(body: dict[str, Any]) -> dict[str, Any]:
        return node.add_feedback(body)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(req: ChatCompletionRequest):
        if node.chat is None:
            raise ModelUnavailable("this edge node serves no chat model (start it with --chat-model)", "model")
        gen = req.to_generation(CHAT_MAX_TOKENS)
        model = node.chat_spec.id
        if req.stream:
            return StreamingResponse(_sse(node, gen, model), media_type="text/event-stream")
        text, finish, usage = "", None, Usage()
        async for ev in node.chat.stream(gen):
            text += ev.text
            finish = ev.finish_reason or finish
            usage = ev.usage or usage
        return ChatCompletion(model=model, usage=usage, choices=[ChatChoice(
            message=AssistantMessage(content=text), finish_reason=finish or "stop")])

    return app


async def _sse(node: EdgeNode, gen, model: str):
    cid, created = new_id("chatcmpl"), now()
    first = True
    try:
        async for ev in node.chat.stream(gen):
            delta: dict[str, Any] = {"content": ev.text} if ev.text else {}
            if first:
                delta["role"], first = "assistant", False
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": ev.finish_reason}]}
            yield f"data: {json.dumps(chunk)}\n\n"
    except APIError as e:  # after the first byte the status is sent: the error goes in the stream
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


def rag_generation(messages: list[dict], max_tokens: int = CHAT_MAX_TOKENS) -> GenerationRequest:
    """The chat call a RAG answer (or a question rewrite) makes: the cluster's (the gateway's
    `chat_message`): greedy, and as many tokens as fit up to `max_tokens`. (It used to sample at
    the default temperature 1.0, so the edge's answers were not the cluster's and changed per call.)"""
    return GenerationRequest(kind=GenerationKind.CHAT, messages=messages,
                             params=GenerationParams(max_tokens_cap=min(max_tokens, CHAT_MAX_TOKENS), temperature=0.0))


def _generator(node: EdgeNode):
    loop = asyncio.get_event_loop()

    def generate(messages: list[dict], max_tokens: int = CHAT_MAX_TOKENS) -> str:
        async def run() -> str:
            return "".join([ev.text async for ev in node.chat.stream(rag_generation(messages, max_tokens))])

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=120)

    return generate


def serve(node: EdgeNode, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Run the edge app with uvicorn in this process (blocks)."""
    import uvicorn

    uvicorn.run(build_app(node), host=host, port=port, log_level="warning")
