"""OpenAI response shapes for the gateway's answers: whole (JSON) and streamed (server-sent events)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from models.errors import APIError, ModelUnavailable
from models.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    GenerationEvent,
    GenerationKind,
    Usage,
    now,
)
from serve.gateway.chat import Answer

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class SettledStreamingResponse(StreamingResponse):
    """A streamed answer whose call is settled however the response ends: `on_end` runs after the
    body, also when the client went away before the body was read at all (then the body's own
    generator never ran, and neither did its cleanup)."""

    def __init__(self, content: AsyncIterator[str], on_end: Callable[[], Awaitable[None]], **kwargs):
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self.on_end = on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_end()


def sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """An embedding as the client asked for it: floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


def whole(kind: GenerationKind, answer: Answer, model: str | None = None) -> ChatCompletion | Completion:
    """The non-streamed response body of an answer."""
    name = model or answer.model
    if kind is GenerationKind.CHAT:
        message = AssistantMessage(content=answer.text or (None if answer.tool_calls else ""),
                                   tool_calls=answer.tool_calls)
        return ChatCompletion(id=answer.response_id, model=name, usage=answer.usage, choices=[
            ChatChoice(message=message, finish_reason=answer.finish_reason, logprobs=answer.logprobs)])
    return Completion(id=answer.response_id, model=name, usage=answer.usage, choices=[
        CompletionChoice(text=answer.text, finish_reason=answer.finish_reason, logprobs=answer.logprobs)])


async def one_answer(text: str, usage: Usage) -> AsyncIterator[GenerationEvent]:
    """A finished answer as events (an alias that answers at once, streamed like any model)."""
    yield GenerationEvent(text=text)
    yield GenerationEvent(finish_reason="stop", usage=usage)


async def stream_sse(kind: GenerationKind, events: AsyncIterator[GenerationEvent], response_id: str, model: str,
                     include_usage: bool, on_error: Callable[[APIError], None] | None = None,
                     counted: Callable[[], Usage] | None = None) -> AsyncIterator[str]:
    """Server-sent events of a generation, ending in `[DONE]`. Past the first token the status line
    is sent, so an error is reported as an `error` event in the stream itself (and to `on_error`).

    Events are written in as few writes as the stream allows (the role with the first text, the
    finish with usage and [DONE]): each write is one message from this replica to the ingress.
    `counted` gives the usage to report when the backend reported none."""
    created = now()
    chat = kind is GenerationKind.CHAT

    def chunk(text: str | None = None, finish: str | None = None, role: bool = False, calls=None,
              logprobs=None) -> str:
        if chat:
            delta = ChatDelta(role="assistant" if role else None, content=text, tool_calls=calls)
            return sse(ChatCompletionChunk(id=response_id, created=created, model=model, choices=[
                ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)]))
        return sse(Completion(id=response_id, created=created, model=model, choices=[
            CompletionChoice(text=text or "", finish_reason=finish, logprobs=logprobs)]))

    pending = chunk("", role=True) if chat else ""
    usage: Usage | None = None
    try:
        async for event in events:
            if event.text or event.logprobs:
                pending += chunk(event.text, logprobs=event.logprobs)
            if event.tool_calls and chat:
                pending += chunk(calls=event.tool_calls)
            if event.finish_reason:
                usage = event.usage
                pending += chunk(None if chat else "", finish=event.finish_reason)
                break
            if pending:
                yield pending
                pending = ""
        if include_usage:
            cls = ChatCompletionChunk if chat else Completion
            pending += sse(cls(id=response_id, created=created, model=model, choices=[],
                           usage=usage or (counted() if counted else Usage())))
        yield pending + "data: [DONE]\n\n"
    except Exception as e:
        if not isinstance(e, APIError):
            log.exception("stream from %s failed", model)
            e = ModelUnavailable(f"model {model!r} failed while streaming: {type(e).__name__}")
        if on_error is not None:
            on_error(e)
        yield pending + sse(e.body())
    finally:
        await events.aclose()
