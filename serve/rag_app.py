"""The RAG service as its own Serve application: retrieval, packing and cited answers.

The gateway authenticates and picks the chat model; this service retrieves and packs, then
generates through the gateway's own chat path (so generation gets the same backends, limits
and metrics as any chat request), or answers extractively when no chat model is given.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from config import settings_from_dict
from rag.service import RagService

log = logging.getLogger(__name__)

# Answers of a RAG call are short: a few cited sentences.
RAG_MAX_TOKENS = 512


@serve.deployment
class RagServer:
    def __init__(self, settings: dict[str, Any]):
        self.settings = settings_from_dict(settings)
        self.service = RagService(self.settings)

    def _generate_with(self, model_id: str):
        from serve.applications import GATEWAY_APP

        timeout = self.settings.gateway.request_timeout_s
        gateway = serve.get_app_handle(GATEWAY_APP)

        def generate(messages: list[dict]) -> str:
            # Called from the worker thread that runs the query: blocking on the handle is fine there.
            return gateway.complete_chat.remote(model_id, messages, RAG_MAX_TOKENS).result(timeout_s=timeout)

        return generate

    async def query(self, body: dict[str, Any], model_id: str | None) -> dict[str, Any]:
        generate = self._generate_with(model_id) if model_id else None
        response = await asyncio.to_thread(self.service.query, body, generate=generate, generator=model_id)
        out = response.model_dump(mode="json")
        out["completion_tokens"] = self.service.count_tokens(response.answer)  # for the chat alias's usage
        return out


def build_app(args: dict[str, Any]):
    settings = settings_from_dict(args["settings"])
    return RagServer.options(
        name="RagServer",
        num_replicas=settings.rag.num_replicas,
        max_ongoing_requests=32,
        ray_actor_options={"num_cpus": settings.rag.num_cpus},
    ).bind(settings.to_dict())
