"""Ray Serve deployments that host in-cluster engines, one Serve application per model.

A model that fails to load keeps its replica alive and reports why through `status()`: the
gateway marks it unhealthy and every other model goes on serving. (A constructor that raised
would make Serve restart the replica in a loop and fail the application.)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from config import ModelSpec
from models.engines.sentence_embedder import SentenceEmbedder
from models.engines.transformers_engine import TransformersEngine
from models.errors import InvalidRequest, ModelUnavailable
from models.protocol import GenerationParams

log = logging.getLogger(__name__)


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

    async def generate(self, kind: str, payload: dict[str, Any], params: dict[str, Any]) -> AsyncIterator[dict]:
        """Stream generation events (as dicts) for a chat (`messages`) or completion (`prompt`) payload."""
        self._ready()
        tools = None
        if kind == "chat":
            # tool_choice "none" offers no tools; "required" or a named tool cannot be enforced
            # without guided decoding, so they are offered as "auto" (vLLM enforces them).
            offered = payload.get("tools") if payload.get("tool_choice") != "none" else None
            prompt_ids = self.engine.chat_prompt_ids(payload["messages"], offered)
            tools = {t["function"]["name"] for t in offered} if offered else None
        elif kind == "completion":
            prompt_ids = self.engine.text_prompt_ids(payload["prompt"])
        else:
            raise InvalidRequest(f"unknown generation kind {kind!r}")
        async for event in self.engine.stream(prompt_ids, GenerationParams.model_validate(params), tools):
            yield event.model_dump()


@serve.deployment
class EmbeddingServer(_Hosted):
    def __init__(self, spec: dict[str, Any]):
        self._load(SentenceEmbedder(ModelSpec.model_validate(spec)))

    def status(self) -> dict[str, Any]:
        out = super().status()
        if not self.error:
            out["dimension"] = self.engine.dimension
        return out

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        self._ready()
        return await self._embed_batched(texts)

    # Concurrent requests are encoded together: one forward pass instead of many small ones.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _embed_batched(self, requests: list[list[str]]) -> list[tuple[list[list[float]], list[int]]]:
        flat = [t for texts in requests for t in texts]
        vectors, counts = self.engine.embed(flat)
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
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
    ).bind(spec.model_dump(mode="json"))
