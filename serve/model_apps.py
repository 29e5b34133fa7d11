"""Ray Serve deployments that host in-cluster engines, one Serve application per model.

A model that fails to load keeps its replica alive and reports why through `status()`: the
gateway marks it unhealthy and every other model goes on serving. (A constructor that raised
would make Serve restart the replica in a loop and fail the application.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from ray import serve

from config import ModelSpec
from models.embedders import DenseEmbedder
from models.engines.transformers_engine import TransformersEngine
from models.errors import InvalidRequest, ModelUnavailable
from models.protocol import GenerationEvent, GenerationRequest
from config.settings import ServeSettings
from serve.applications import replica_actor_options

log = logging.getLogger(__name__)


def merge(a: GenerationEvent, b: GenerationEvent) -> GenerationEvent:
    """Two consecutive events as one (b is the later: its finish and usage stand)."""
    return a.followed_by(b)


async def batched(events: AsyncIterator[GenerationEvent], interval_s: float) -> AsyncIterator[GenerationEvent]:
    """The first event at once, then everything that arrives within each interval as one event.

    Every event is a Ray message to the caller and, through the gateway, an SSE write to the
    proxy: on a CPU a tiny model produces tokens faster than those hops are worth (Ray Serve
    LLM batches its streams the same way). The engine runs in a pump task so that waiting
    with a timeout never cancels the engine's generator mid-step."""
    if interval_s <= 0:
        async for event in events:
            yield event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump() -> None:
        try:
            async for event in events:
                await queue.put(event)
            await queue.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            await queue.put(e)

    task = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    try:
        item = await queue.get()
        held: GenerationEvent | None = None
        deadline = 0.0
        first = True
        while True:
            if isinstance(item, BaseException):
                raise item
            if item is done:
                break
            if first:
                yield item
                first = False
            else:
                held = item if held is None else merge(held, item)
                if held.finish_reason:
                    break
                if deadline == 0.0:
                    deadline = loop.time() + interval_s
            try:
                timeout = None if held is None else max(deadline - loop.time(), 0)
                item = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                yield held
                held, deadline = None, 0.0
                item = await queue.get()
        if held is not None:
            yield held
    finally:
        task.cancel()  # the caller went away or we are done: the engine stops at its next token
        await asyncio.gather(task, return_exceptions=True)
        await events.aclose()


class _Hosted:
    """Load once, remember the failure, refuse requests with it."""

    def _load(self, engine) -> None:
        self.engine = engine
        self.error: str | None = None
        try:
            engine.load()
        except Exception as e:  # any load failure is reported, never retried in a loop
            self.error = str(e) or type(e).__name__
            log.error("model %s failed to load: %s", engine.spec.id, self.error)

    def _ready(self) -> None:
        if self.error:
            raise ModelUnavailable(f"model {self.engine.spec.id!r} is unavailable: {self.error}")

    def status(self) -> dict[str, Any]:
        return {
            "status": "unhealthy" if self.error else "ready",
            "error": self.error,
            "max_context": self.engine.spec.max_context,
        }


@serve.deployment
class ChatModelServer(_Hosted):
    def __init__(self, spec: dict[str, Any]):
        self._load(TransformersEngine(ModelSpec.model_validate(spec)))

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict]:
        """Stream generation events (as dicts) for a `GenerationRequest` (as JSON: a Serve handle
        call takes JSON-able arguments; it is validated here, on the replica)."""
        self._ready()
        try:
            gen = GenerationRequest.model_validate(request)
        except ValidationError as e:
            raise InvalidRequest(f"not a generation request: {e}") from None
        async for event in batched(self.engine.stream(gen), self.engine.spec.stream_interval_ms / 1000):
            yield event.model_dump()


@serve.deployment
class EmbeddingServer(_Hosted):
    def __init__(self, spec: dict[str, Any]):
        self._load(DenseEmbedder.from_spec(ModelSpec.model_validate(spec)))

    def status(self) -> dict[str, Any]:
        out = super().status()
        if not self.error:
            out["dimension"] = self.engine.dim
        return out

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        self._ready()
        return await self._embed_batched(texts)

    # Concurrent requests are encoded together: one forward pass instead of many small ones.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _embed_batched(self, requests: list[list[str]]) -> list[tuple[list[list[float]], list[int]]]:
        flat = [t for texts in requests for t in texts]
        vectors, counts = self.engine.embed(flat).tolist(), self.engine.token_counts(flat)
        out, i = [], 0
        for texts in requests:
            out.append((vectors[i : i + len(texts)], counts[i : i + len(texts)]))
            i += len(texts)
        return out


def build_model_app(args: dict[str, Any]):
    """Serve application builder for one catalog entry (transformers or sentence-transformers)."""
    spec = ModelSpec.model_validate(args["model"])
    deployment = EmbeddingServer if spec.task == "embedding" else ChatModelServer
    return deployment.options(
        num_replicas=spec.num_replicas,
        max_ongoing_requests=spec.max_ongoing_requests,
        max_queued_requests=spec.max_queued_requests,  # beyond it: BackPressureError, a 503 at the gateway
        ray_actor_options=replica_actor_options(ServeSettings.model_validate(args["serve"]), num_cpus=spec.num_cpus,
                                                num_gpus=spec.num_gpus),
    ).bind(spec.model_dump(mode="json"))
