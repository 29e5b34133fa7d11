"""Ray Serve LLM's LLMServer with JSON-in, JSON-out entry points (imported on GPU workers only).

The gateway runs on CPU-image workers, which have no vLLM: it must never build or unpickle
vLLM's request and error types (`ray.serve.llm.openai_api_models` imports vLLM). So it sends the
OpenAI body as a dict; this replica validates it into vLLM's type, and turns error objects back
into dicts before they travel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.serve.llm import LLMServer
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest


def _plain(item: Any) -> Any:
    return item if isinstance(item, str) else item.model_dump() if hasattr(item, "model_dump") else item


class OrfeasLLMServer(LLMServer):
    async def _json(self, method: str, request) -> AsyncIterator[Any]:
        stream = await getattr(self, method)(request)
        async for batch in stream:
            yield [_plain(i) for i in batch] if isinstance(batch, list) else _plain(batch)

    async def chat_json(self, body: dict[str, Any]) -> AsyncIterator[Any]:
        async for out in self._json("chat", ChatCompletionRequest(**body)):
            yield out

    async def completions_json(self, body: dict[str, Any]) -> AsyncIterator[Any]:
        async for out in self._json("completions", CompletionRequest(**body)):
            yield out
