"""The one interface every engine implements (Ray Serve LLM's `LLMEngine` is the model).

An engine takes a `GenerationRequest` (chat or completion, with every sampling parameter) and
streams `GenerationEvent`s; what a chat or a completion means to it, and which parameters it can
honour, is its own business: it refuses a parameter it cannot honour with `InvalidRequest`
naming it, and never drops one silently. Callers never branch on the engine or on the kind.

Engines: `models.engines.transformers_engine.TransformersEngine` (in a model replica),
`models.engines.openai_remote.RemoteOpenAIEngine` (any OpenAI-compatible provider, called from
the gateway), `models.engines.vllm_engine.VLLMEngine` (vLLM's LLMServer from `ray.serve.llm`,
through its deployment handle); the gateway reaches our own model replicas through a
handle-backed engine of its own (`serve.gateway.backends.ServeAppEngine`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel, ConfigDict

from config import ModelSpec
from models.errors import ModelUnavailable
from models.protocol import GenerationEvent, GenerationRequest


class EngineStatus(BaseModel):
    """Whether an engine can serve now, and why not."""

    model_config = ConfigDict(extra="allow")  # engines may add facts (an embedder's dimension)

    status: Literal["ready", "loading", "unhealthy"]
    error: str | None = None
    max_context: int | None = None

    @classmethod
    def ready(cls, **facts) -> "EngineStatus":
        return cls(status="ready", **facts)

    @classmethod
    def unhealthy(cls, error: str, **facts) -> "EngineStatus":
        return cls(status="unhealthy", error=error, **facts)


class Engine(ABC):
    """A model that generates (and, where it can, embeds)."""

    spec: ModelSpec

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def load(self) -> None:
        """Make the engine ready to serve (weights, clients). Blocking; called once where the engine
        lives before its first request. Engines whose model lives elsewhere have nothing to load."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """The generation's events, the last one with the finish reason and the usage. An async
        generator: errors (`models.errors.APIError`) are raised from it, the first before any event."""

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """(one vector per text, the token count of each text)."""
        raise ModelUnavailable(f"model {self.spec.id!r} does not serve embeddings", "model")

    @abstractmethod
    async def status(self) -> EngineStatus:
        """Whether it can serve now; cheap enough for every health period."""

    async def probe(self) -> EngineStatus:
        """An active, possibly dearer check for the router's probe rounds (by default, `status`)."""
        return await self.status()

    async def aclose(self) -> None:
        """Release what `load` or the first requests opened."""
