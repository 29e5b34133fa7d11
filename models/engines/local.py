"""The engine for a catalog entry's in-process chat model: llama.cpp for `engine: llama.cpp`
(falling back to transformers' GGUF loading of the same file where llama.cpp cannot be
imported), transformers for `engine: transformers`. Used by the Serve model replicas and by the
edge node alike (no Ray here)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from config import ModelSpec
from models.engine import Engine, EngineStatus
from models.engines.llamacpp_engine import LlamaCppEngine, LlamaCppUnavailable
from models.engines.transformers_engine import TransformersEngine
from models.protocol import GenerationEvent, GenerationRequest

log = logging.getLogger(__name__)


class GGUFEngine(Engine):
    """llama.cpp, or transformers for the same GGUF file when llama.cpp is not available here.
    Only an unavailable llama.cpp falls back: a missing or corrupt file fails in both engines, and
    the llama.cpp error names it."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.active: Engine = LlamaCppEngine(spec)
        self.fallback_reason: str | None = None

    def load(self) -> None:
        try:
            self.active.load()
        except LlamaCppUnavailable as e:
            self.fallback_reason = str(e)
            log.warning("model %s: %s; loading the same GGUF file with transformers (slower)", self.spec.id, e)
            self.active = TransformersEngine(self.spec)
            self.active.load()

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        return self.active.stream(request)

    async def status(self) -> EngineStatus:
        status = await self.active.status()
        if self.fallback_reason:
            status = EngineStatus(**{**status.model_dump(), "engine": "transformers",
                                     "fallback_reason": self.fallback_reason})
        return status

    @property
    def engine_name(self) -> str:
        return "transformers" if self.fallback_reason else "llama.cpp"

    async def aclose(self) -> None:
        await self.active.aclose()


def local_chat_engine(spec: ModelSpec) -> Engine:
    """The (not yet loaded) engine that runs this chat model in this process."""
    if spec.engine == "llama.cpp":
        return GGUFEngine(spec)
    if spec.engine == "transformers":
        return TransformersEngine(spec)
    raise ValueError(f"model {spec.id!r}: engine {spec.engine!r} does not run in process")
