"""Prompts to remote providers with their PII redacted, and optionally restored in the answer.

`pii.remote_prompts` (per model: `pii.remote_prompts_models`) says what leaves the cluster for a
remote provider (engine `openai`):
  off             prompts go as they are
  redact          PII in message contents (text parts included), a completion prompt and the
                  `user` field is replaced by typed placeholders (`<EMAIL_ADDRESS_1>`) before the
                  request is sent; the answer comes back as the provider wrote it
  redact_restore  the same, and the placeholders the answer repeats are mapped back to the
                  original values for the caller, streamed or not (a placeholder split across
                  stream chunks is held back until it is whole)

`guarded` wraps only remote engines, so in-cluster models never pay for a Presidio call. One
request numbers its values once across all its messages (the same email is one placeholder);
the mapping lives only for that request, in the gateway replica.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from typing import Any

from config import ModelSpec, Settings
from models.engine import Engine, EngineStatus
from models.protocol import GenerationEvent, GenerationRequest, ToolCallDelta
from security.pii import PiiDetector, detector

# A tail that may still grow into a placeholder (`<`, `<EMAIL`, `<EMAIL_ADDRESS_1`): held back.
_PARTIAL = re.compile(r"<[A-Z_]*(?:_\d*)?$")


def policy_for(settings: Settings, spec: ModelSpec) -> str:
    """What happens to prompts sent to this model: off, redact or redact_restore."""
    if spec.engine != "openai" or not settings.pii.enabled:
        return "off"
    return settings.pii.remote_prompts_models.get(spec.id, settings.pii.remote_prompts)


def guarded(engine: Engine, settings: Settings) -> Engine:
    """`engine` itself, or, when its prompts are to be redacted, the engine behind a `RedactingEngine`."""
    policy = policy_for(settings, engine.spec)
    if policy == "off":
        return engine
    return RedactingEngine(engine, settings, restore=policy == "redact_restore")


class Restorer:
    """Maps placeholders back in a text that arrives in pieces: `feed` returns what can be sent
    now (a trailing piece that may be the start of a placeholder is kept), `flush` the rest."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = mapping
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        m = _PARTIAL.search(text)
        cut = m.start() if m else len(text)
        self._held = text[cut:]
        return PiiDetector.restore(text[:cut], self.mapping)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return PiiDetector.restore(held, self.mapping)


class RedactedRequest:
    """One request's redaction: the request to send, and the placeholder -> value mapping."""

    def __init__(self, pii: PiiDetector, request: GenerationRequest):
        self.mapping: dict[str, str] = {}
        update: dict[str, Any] = {}
        if request.messages is not None:
            update["messages"] = [self._message(pii, m) for m in request.messages]
        if request.prompt:
            update["prompt"] = pii.redact(request.prompt, self.mapping)[0]
        if request.params.user:
            update["params"] = request.params.model_copy(
                update={"user": pii.redact(request.params.user, self.mapping)[0]})
        self.request = request.model_copy(update=update)

    def _message(self, pii: PiiDetector, message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": pii.redact(content, self.mapping)[0]}
        if isinstance(content, list):
            parts = [{**p, "text": pii.redact(p["text"], self.mapping)[0]}
                     if isinstance(p, dict) and isinstance(p.get("text"), str) else p for p in content]
            return {**message, "content": parts}
        return message


class RedactingEngine(Engine):
    """A remote engine whose prompts leave without PII (see the module doc)."""

    def __init__(self, inner: Engine, settings: Settings, restore: bool):
        super().__init__(inner.spec)
        self.inner, self.restore = inner, restore
        self._settings = settings
        # Presidio's analyzer takes seconds to build: start now, off the request path (the first
        # request waits for it under the detector cache's lock if it comes sooner).
        threading.Thread(target=detector, args=(settings,), name="pii-detector-warmup", daemon=True).start()

    def load(self) -> None:
        self.inner.load()

    @property
    def pii(self) -> PiiDetector:
        return detector(self._settings)  # built once per process, on the first redacted request

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        # Presidio is synchronous CPU work: off the replica's event loop.
        redacted = await asyncio.to_thread(RedactedRequest, self.pii, request)
        events = self.inner.stream(redacted.request)
        if not self.restore or not redacted.mapping:
            async for event in events:
                yield event
            return
        text = Restorer(redacted.mapping)
        arguments: dict[int, Restorer] = {}
        async for event in events:
            update: dict[str, Any] = {}
            if event.text:
                update["text"] = text.feed(event.text)
            if event.tool_calls:
                update["tool_calls"] = [self._tool_call(d, arguments, redacted.mapping) for d in event.tool_calls]
            if event.finish_reason:  # the last event: nothing may stay held back
                update["text"] = update.get("text", "") + text.flush()
                for index, r in arguments.items():
                    if rest := r.flush():
                        update.setdefault("tool_calls", []).append(ToolCallDelta.model_validate(
                            {"index": index, "function": {"arguments": rest}}))
            if update.get("text", event.text) == "" and event.text and not event.finish_reason \
                    and not event.tool_calls and not event.logprobs:
                continue  # all of it is held back for now
            yield event.model_copy(update=update) if update else event

    @staticmethod
    def _tool_call(delta: ToolCallDelta, arguments: dict[int, Restorer], mapping: dict[str, str]) -> ToolCallDelta:
        if delta.function is None or not delta.function.arguments:
            return delta
        r = arguments.setdefault(delta.index, Restorer(mapping))
        return delta.model_copy(update={"function": delta.function.model_copy(
            update={"arguments": r.feed(delta.function.arguments)})})

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        # Embedding inputs are not prompts: redacting them would change the vectors (docs/security.md).
        return await self.inner.embed(texts)

    async def status(self) -> EngineStatus:
        return await self.inner.status()

    async def probe(self) -> EngineStatus:
        return await self.inner.probe()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:  # the remote engine's own facts (problem(), base_url)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
