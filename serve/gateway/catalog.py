"""The catalog as a caller sees it: which models exist, may be used by this key, and are healthy."""

from __future__ import annotations

import asyncio

from config import Settings
from config.names import RAG_APP
from models.errors import InvalidRequest, ModelNotFound, ModelUnavailable
from models.protocol import ModelCard
from security.auth import Principal
from models.engine import Engine
from serve.gateway.backends import BackendRegistry

# `model: "rag"` (default collection) or `"rag:<collection>"` in a chat request answers from the
# RAG service, so any OpenAI client can ask the knowledge base.
RAG_ALIAS = "rag"


class Catalog:
    def __init__(self, settings: Settings, backends: BackendRegistry):
        self.settings, self.backends = settings, backends

    async def cards(self, principal: Principal | None) -> list[ModelCard]:
        """Every model this key may use (all of them for None), with its health now."""
        specs = [m for m in self.settings.models if principal is None or principal.may_use(m.id)]
        healths = await asyncio.gather(*(self.backends.health(m.id) for m in specs))
        cards = [
            ModelCard(id=m.id, task=m.task, engine=m.engine, status=h.status, error=h.error, max_context=m.max_context,
                      **({"capabilities": list(m.capabilities), "price_input_per_m": m.price_input_per_m,
                          "price_output_per_m": m.price_output_per_m, "tags": list(m.tags), "serves": m.serves}
                         if m.task == "chat" else {}))
            for m, h in zip(specs, healths)
        ]
        if self.settings.rag.enabled:
            h = await self.backends.app_health(RAG_APP)
            cards.append(ModelCard(id=RAG_ALIAS, task="rag", engine="rag", status=h.status, error=h.error))
        return cards

    async def usable(self, model_id: str, principal: Principal, task: str) -> Engine:
        """The backend of a model this key may use for `task`, healthy now; else the error that says why."""
        spec = self.settings.model(model_id)
        if spec is None:
            raise ModelNotFound(f"model {model_id!r} does not exist; GET /v1/models lists the models", "model")
        principal.check_model(model_id)
        if spec.task != task:
            use = "/v1/embeddings" if spec.task == "embedding" else "/v1/chat/completions or /v1/completions"
            raise InvalidRequest(f"model {model_id!r} is a {spec.task} model: use {use}", "model")
        health = await self.backends.health(model_id)
        if health.status != "ready":
            why = f": {health.error}" if health.error else ""
            raise ModelUnavailable(f"model {model_id!r} is {health.status}{why}", "model")
        return self.backends.get(model_id)

    def known(self, model: str | None) -> str:
        """A metrics label for a requested name: catalog ids, the aliases, or "other" (bounded)."""
        if not model:
            return "-"
        if self.settings.model(model) is not None or model == self.settings.router.orchestrator.alias:
            return model
        return RAG_ALIAS if model.partition(":")[0] == RAG_ALIAS else "other"
