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

from config import ModelSpec, TracingSettings
from models.embedders import DenseEmbedder
from models.engines.local import local_chat_engine
from models.errors import InvalidRequest, ModelUnavailable
from models.protocol import GenerationEvent, GenerationRequest
from config.settings import AutoscalingSettings, ServeSettings
from observability import tracing
from serve.applications import model_autoscaling, replica_actor_options

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
    def __init__(self, spec: dict[str, Any], tracing_settings: dict[str, Any] | None = None):
        tracing.configure(TracingSettings.model_validate(tracing_settings or {}), "model")
        self._load(local_chat_engine(ModelSpec.model_validate(spec)))
        self._tokens_in_flight = 0

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (AutoscalingContext.aggregated_metrics): the token
        load of the requests in flight, which the ORFEAS policy forecasts besides the count."""
        return {"tokens_in_flight": float(self._tokens_in_flight)}

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["engine"] = getattr(self.engine, "engine_name", self.engine.spec.engine)  # llama.cpp or its fallback
        return out

    async def generate(self, request: dict[str, Any], trace: dict[str, str] | None = None) -> AsyncIterator[dict]:
        """Stream generation events (as dicts) for a `GenerationRequest` (as JSON: a Serve handle
        call takes JSON-able arguments; it is validated here, on the replica). `trace`: the
        caller's W3C carrier, the parent of this generation's span."""
        self._ready()
        try:
            gen = GenerationRequest.model_validate(request)
        except ValidationError as e:
            raise InvalidRequest(f"not a generation request: {e}") from None
        # A bound without a tokenizer pass: ~4 characters a prompt token, plus the output budget.
        load = len(str(gen.messages or gen.prompt or "")) // 4 + min(gen.params.max_tokens or gen.params.max_tokens_cap,
                                                                      gen.params.max_tokens_cap)
        self._tokens_in_flight += load
        try:
            if not tracing.enabled():
                async for event in batched(self.engine.stream(gen), self.engine.spec.stream_interval_ms / 1000):
                    yield event.model_dump()
                return
            async for event in self._traced(gen, trace):
                yield event
        finally:
            self._tokens_in_flight -= load

    async def _traced(self, gen: GenerationRequest, trace: dict[str, str] | None) -> AsyncIterator[dict]:
        """`generate` inside a `gen_ai.generate` span (GenAI semantic conventions: model, tokens, TTFT)."""
        import time

        spec = self.engine.spec
        span = tracing.start(f"generate {spec.id}", {
            "gen_ai.operation.name": gen.kind.value, "gen_ai.system": spec.engine, "gen_ai.request.model": spec.id,
            "gen_ai.request.max_tokens": gen.params.max_tokens or 0}, parent=trace)
        start, first = time.perf_counter(), True
        try:
            async for event in batched(self.engine.stream(gen), spec.stream_interval_ms / 1000):
                if first and (event.text or event.tool_calls):
                    span.set_attribute("gen_ai.server.time_to_first_token", time.perf_counter() - start)
                    first = False
                if event.finish_reason:
                    done: dict[str, Any] = {"gen_ai.response.finish_reasons": [event.finish_reason]}
                    if event.usage is not None:
                        done.update({"gen_ai.usage.input_tokens": event.usage.prompt_tokens,
                                     "gen_ai.usage.output_tokens": event.usage.completion_tokens})
                    span.set_attributes(done)
                yield event.model_dump()
        except BaseException as e:
            tracing.fail(span, e)
            raise
        finally:
            span.end()


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
    """Serve application builder for one catalog entry (llama.cpp, transformers or sentence-transformers)."""
    spec = ModelSpec.model_validate(args["model"])
    deployment = EmbeddingServer if spec.task == "embedding" else ChatModelServer
    extra = (args["tracing"],) if args.get("tracing") and deployment is ChatModelServer else ()
    scaling = model_autoscaling(spec, AutoscalingSettings.model_validate(args.get("autoscaling") or {}))
    count = {"autoscaling_config": scaling} if scaling is not None else {"num_replicas": spec.num_replicas}
    return deployment.options(
        **count,
        max_ongoing_requests=spec.max_ongoing_requests,
        max_queued_requests=spec.max_queued_requests,  # beyond it: BackPressureError, a 503 at the gateway
        ray_actor_options=replica_actor_options(ServeSettings.model_validate(args["serve"]), num_cpus=spec.num_cpus,
                                                num_gpus=spec.num_gpus),
    ).bind(spec.model_dump(mode="json"), *extra)
