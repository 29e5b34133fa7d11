"""Names a chat request may use that are not catalog models: the `rag` alias (the RAG service
answers) and the orchestrator alias (plan, fan out, combine). Both call back into `ChatService`
with the caller's principal, so that key's scopes, budget and ledger apply to every model call."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from pydantic import BaseModel, Field
from ray import serve

from config import Settings
from config.names import RAG_APP
from models.errors import APIError, InvalidRequest, ModelNotFound, ModelUnavailable, NotFound, UpstreamTimeout
from models.protocol import (
    ChatCompletionRequest,
    GenerationKind,
    GenerationParams,
    GenerationRequest,
    Usage,
    new_id,
)
from observability import tracing
from rag.conversation import MAX_HISTORY_CHARS, MAX_HISTORY_MESSAGES
from security.auth import Principal
from serve.gateway.catalog import RAG_ALIAS, Catalog
from serve.gateway.chat import Answer, ChatCall, ChatService
from serve.http import unwrap
from serve.router.orchestrator import CallResult, OrchestrateRequest, Orchestrator

RAG_DISABLED = "the RAG service is not enabled on this platform (rag.enabled: false)"


class RagAliasInfo(BaseModel):
    """The `rag` field of a `rag` chat alias response (and its x-orfeas-rag-* headers)."""

    generation: Literal["chat", "extractive", "none"] = Field(description="Who wrote the answer: the chat model, "
                                                              "or the extractive answerer (quotes).")
    fallback_reason: str | None = Field(None, description="Why the answer is extractive: no chat model usable, the "
                                        "generation failed, or the quality gate replaced it (with its scores).")
    groundedness: float | None = Field(None, description="The answer's groundedness (rag.quality).")

    def headers(self) -> dict[str, str]:
        out = {"x-orfeas-rag-generation": self.generation}
        if self.fallback_reason:  # a header value is one line of latin-1
            out["x-orfeas-rag-fallback"] = " ".join(self.fallback_reason.split()).encode("latin-1", "replace").decode(
                "latin-1")[:300]
        return out


def rag_collection(model: str) -> tuple[bool, str | None]:
    """(is this the RAG alias, the collection it names)."""
    name, sep, collection = model.partition(":")
    return name == RAG_ALIAS and (not sep or bool(collection)), collection or None


def conversation_history(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The user and assistant messages before the last user message (the RAG service rewrites the
    question to stand alone from them and packs them to its budget): the newest
    MAX_HISTORY_MESSAGES, each cut to MAX_HISTORY_CHARS (older text is summarised anyway)."""
    last = max((i for i, m in enumerate(req.messages) if m.role == "user"), default=0)
    turns = [{"role": m.role, "content": m.text()[:MAX_HISTORY_CHARS]} for m in req.messages[:last]
             if m.role in ("user", "assistant") and m.text().strip()]
    return turns[-MAX_HISTORY_MESSAGES:]


def last_user_text(req: ChatCompletionRequest, what: str) -> str:
    text = next((m.text() for m in reversed(req.messages) if m.role == "user"), "").strip()
    if not text:
        raise InvalidRequest(f"the {what} answers the last user message, and there is none", "messages")
    return text


class RagAlias:
    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings, self.catalog = settings, catalog
        self.timeout_s = settings.gateway.request_timeout_s
        self._handle = None

    async def generator(self, model: str | None, principal: Principal) -> str | None:
        """The chat model a RAG answer generates with: a named model must be usable by this key
        (its errors are the caller's); else rag.chat_model when it is usable now; else None, and
        the answer is extractive."""
        if model:
            await self.catalog.usable(model, principal, "chat")
            return model
        if self.settings.rag.chat_model:
            try:
                await self.catalog.usable(self.settings.rag.chat_model, principal, "chat")
                return self.settings.rag.chat_model
            except APIError:
                pass  # the default generator is not usable now: answer extractively
        return None

    async def answer(self, req: ChatCompletionRequest, principal: Principal) -> tuple[Answer, dict[str, Any]]:
        """A chat request to `rag[:collection]`: the last user message is the question. Returns
        the answer and the response's extra fields: `citations` and `rag` (a RagAliasInfo: how the
        answer was made and, when it was not the chat model's, why)."""
        if not self.settings.rag.enabled:
            raise NotFound(RAG_DISABLED)
        question = last_user_text(req, "rag model")
        _, collection = rag_collection(req.model)
        body: dict[str, Any] = {"query": question, "collection": collection}
        if history := conversation_history(req):  # the conversation, not only its last message
            body["history"] = history
        result = await self.query(body, None, principal)
        completion = result.get("completion_tokens") or len(result["answer"].split())
        usage = Usage.of(result["diagnostics"]["context_tokens"], completion)
        answer = Answer(f"{RAG_ALIAS}/{result['model']}", new_id("chatcmpl"), result["answer"], "stop", usage, 0.0)
        d = result["diagnostics"]
        info = RagAliasInfo(generation=d["generation"], fallback_reason=d.get("fallback_reason"),
                            groundedness=(result.get("quality") or {}).get("groundedness"))
        return answer, {"citations": result["citations"], "rag": info.model_dump()}

    async def query(self, body: dict[str, Any], model: str | None, principal: Principal) -> dict[str, Any]:
        """One RAG query on the RAG app (a thread's question too), generated with `model` or the
        default generator, on this principal's behalf; the RAG app's answer as a dict."""
        if not self.settings.rag.enabled:
            raise NotFound(RAG_DISABLED)
        if self._handle is None:
            self._handle = serve.get_app_handle(RAG_APP)
        generator = await self.generator(model, principal) if body.get("answer", True) else None
        try:
            return await asyncio.wait_for(
                self._handle.query.remote(body, generator, principal, trace=tracing.inject()), self.timeout_s)
        except TimeoutError:
            raise UpstreamTimeout(f"the RAG service did not answer within {self.timeout_s:g}s") from None
        except Exception as e:
            raise unwrap(e) from None


class OrchestratorAlias:
    def __init__(self, settings: Settings, chat: ChatService):
        self.settings, self.chat = settings, chat
        self.max_tokens = settings.limits.max_tokens

    async def run(self, req: OrchestrateRequest, principal: Principal) -> dict[str, Any]:
        """Plan, run subtasks in parallel across backends, combine (see serve.router.orchestrator)."""
        self.chat.check_limit(req.max_tokens)
        router = self.chat.router
        for m in req.models or []:
            if self.settings.model(m) is not None:
                principal.check_model(m)
            elif router.policy(m) is None and m not in router.groups and m not in router.experiments:
                raise ModelNotFound(f"model {m!r} does not exist; GET /v1/models lists the models", "models")
        await self.chat.book.remaining(principal)  # refuse up front when the budget is spent
        deadline = time.monotonic() + self.chat.timeout_s

        async def call_model(model: str, messages: list[dict], max_tokens: int, task: str | None,
                             json_mode: bool) -> CallResult:
            # JSON mode only steers routing (to models good at it): the orchestrator reads JSON out of
            # any text, and a model without constrained decoding would refuse response_format.
            params = GenerationParams(max_tokens=min(max_tokens, self.max_tokens), max_tokens_cap=self.max_tokens,
                                      temperature=0.0)
            gen = GenerationRequest(kind=GenerationKind.CHAT, messages=messages, params=params)
            features: dict[str, Any] = {"model": model, "messages": messages}
            if json_mode:
                features["response_format"] = {"type": "json_object"}
            call = ChatCall(principal, "orchestrate", response_id=new_id("orchcall"))
            a = await self.chat.complete(call, model, gen, features=features,
                                         headers={"x-orfeas-task": task} if task else {}, deadline=deadline)
            return CallResult(model=a.model, text=a.text, prompt_tokens=a.usage.prompt_tokens,
                              completion_tokens=a.usage.completion_tokens, cost_usd=a.cost_usd)

        try:
            return await Orchestrator(self.settings.router.orchestrator, call_model).run(req)
        except RuntimeError as e:
            raise ModelUnavailable(str(e)[:1000]) from None

    async def answer(self, req: ChatCompletionRequest, principal: Principal) -> tuple[Answer, dict[str, Any]]:
        """The orchestrator as a chat model: the last user message is the task, answered in one message."""
        task = last_user_text(req, "orchestrator")
        result = await self.run(OrchestrateRequest(task=task, max_tokens=req.token_limit()), principal)
        usage = Usage.of(result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"])
        answer = Answer(req.model, new_id("chatcmpl"), result["answer"], "stop", usage, result["cost_usd"])
        return answer, {k: result[k] for k in ("strategy", "plan", "subtasks", "timings", "cost_usd")}
