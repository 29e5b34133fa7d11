"""The OpenAI-compatible gateway: thin routes over `ChatService` (no postponed annotations:
FastAPI reads the route signatures at class-decoration time).

The HTTP layer (`serve.http`) authenticates, limits the body, validates typed bodies, maps
errors, counts requests and tags them with a request id; a route picks its handler and shapes
the response. A stream starts only once the first event is in hand, so every failure before the
first token gets its proper HTTP status.
"""


import asyncio
import logging
import time
from typing import Any, Literal

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import RayServeException

from analytics.budgets import UsageBook
from analytics.ledger import period_start
from config import Settings, settings_from_dict
from config.names import GATEWAY_APP
from models.errors import (
    APIError,
    AuthenticationFailed,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    PermissionDenied,
    UpstreamTimeout,
)
from models.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    GenerationKind,
    GenerationParams,
    GenerationRequest,
    ModelList,
    Usage,
    new_id,
    now,
)
from security.auth import Principal
from security.keys import bootstrap_admin
from scaling.serve_options import replica_count
from serve.admin_api import admin_router
from serve.applications import GATEWAY_DEPLOYMENT, replica_actor_options
from serve.audit_api import router as audit_router
from serve.gateway.aliases import RAG_DISABLED, OrchestratorAlias, RagAlias, RagAliasInfo, rag_collection
from serve.gateway.auth_routes import router as auth_router
from serve.gateway.backends import BackendRegistry
from serve.gateway.catalog import Catalog
from serve.gateway.chat import ChatCall, ChatService
from serve.gateway.metrics import GatewayMetrics, RouterMetrics
from serve.gateway.responses import (SSE_HEADERS, SettledStreamingResponse, encode_vector, one_answer, stream_sse,
                                     whole)
from serve.gateway.threads_routes import router as threads_router
from serve.gateway.schemas import (Feedback, FeedbackResult, Health, Orchestration, Readiness, RouterStatus,
                                   UsageReport)
from observability import tracing
from serve.http import admin, authenticated, http_app, label_model, permitted
from serve.http.admission import Shedder, admitted
from serve.router.features import estimate_tokens
from serve.router.orchestrator import OrchestrateRequest
from serve.router.runtime import Claim, Router

# The router's own embedding calls (its task classifier): the platform's work, never a user's.
ROUTER_SELF = Principal("router", "admin", None, credential="platform")
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})  # shed early (serve.http.admission)
SHED_KEY_AGE_S = 60.0  # how recently a key must have been verified for its requests to be shed early
STREAM_DOC = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when `stream` is true"}}

app = http_app("ORFEAS gateway")
app.include_router(auth_router)  # /v1/auth/*: sign-in, sessions, MFA enrolment (serve/gateway/auth_routes.py)
app.include_router(admin_router)  # /v1/admin/*: keys, teams, budgets, roles, limits (serve/admin_api.py)
app.include_router(audit_router)  # GET /v1/audit/entries, /v1/audit/verify (serve/audit_api.py)
app.include_router(threads_router)  # /v1/threads: a key's own RAG conversations (serve/gateway/threads_routes.py)


# Defined before the class: `serve.ingress` pickles the routes when the class is made, with the
# module globals that exist then.
async def _has_valid_key(request: Request) -> bool:
    try:
        await authenticated(request)
        return True
    except APIError:
        return False


def _replica_rank() -> int:
    """This gateway replica's rank in its deployment (0 .. replicas - 1; Serve keeps ranks
    contiguous), 0 outside Serve."""
    try:
        rank = serve.get_replica_context().rank
    except RayServeException:
        return 0
    return getattr(rank, "rank", rank) or 0


@serve.ingress(app)
class Gateway:
    def __init__(self, settings: dict[str, Any]):
        self.settings: Settings = settings_from_dict(settings)
        self.limits = self.settings.limits
        self.timeout_s = self.settings.gateway.request_timeout_s
        self.backends = BackendRegistry(self.settings)
        self.catalog = Catalog(self.settings, self.backends)
        shed = Shedder(GENERATION_PATHS, self._door) if self.settings.gateway.shed_early else None
        app.state.configure(self.settings, model_label=self.catalog.known, shed=shed)
        if self.settings.auth.enabled:
            bootstrap_admin(self.settings.resolved_data_dir(), self.settings.auth.bootstrap_key_env, self.settings)
        self.metrics, self.router_metrics = GatewayMetrics(), RouterMetrics()
        self.router = Router(self.settings, self.backends, embed=self._classifier_embed)
        self.router.gateway_share = (_replica_rank(), self.settings.gateway.num_replicas)
        self.router.listeners.append(self.router_metrics.breaker_transition)
        self.chat = ChatService(self.settings, self.router, UsageBook(self.settings), self.metrics,
                                self.router_metrics)
        self.rag = RagAlias(self.settings, self.catalog)
        app.state.rag_alias = self.rag  # the /v1/threads routes ask through it
        self.orchestrator = OrchestratorAlias(self.settings, self.chat)

    def _door(self, path: str, model: str, authorization: str | None) -> APIError | Claim | None:
        """Admission before the HTTP layer's body checks and this route's work
        (serve.http.admission), only for a key verified lately that may call `path`: a capacity
        refusal when the router would refuse the named model anyway, else the request's claim
        on it, which `_generate` hands to the router (`Router.claim`). "Lately": within
        SHED_KEY_AGE_S, past the key cache's TTL, since a refusal grants nothing (a key revoked
        meanwhile gets a 503 instead of its 401 until then) and accepted requests, which take
        the full path, keep verifying the key."""
        principal = app.state.authenticator.cached(authorization, max(SHED_KEY_AGE_S, self.settings.auth.key_cache_s))
        if principal is None or (principal.endpoints is not None and not principal.allows("endpoints:call", path)):
            return None
        return self.router.claim(model, principal)

    async def _classifier_embed(self, texts: list[str]) -> list[list[float]]:
        """Embeddings for the router's task classifier (router.classifier_model)."""
        backend = await self.catalog.usable(self.settings.router.classifier_model, ROUTER_SELF, "embedding")
        return (await backend.embed(texts))[0]

    # ------------------------------------------------------------ health and the catalog

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz(self, request: Request) -> JSONResponse:
        cards = await self.catalog.cards(None)
        ready = any(c.status == "ready" for c in cards)
        # Ready or not for anyone (load balancers, probes); which models exist only for a valid key.
        known = request.headers.get("authorization") is not None and await _has_valid_key(request)
        body = Readiness(status="ready" if ready else "unavailable",
                         models={c.id: c.status for c in cards} if known else {})
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    async def model_states(self) -> dict[str, str]:
        """Each catalog model's health (for `orfeas status`, over the handle: no key needed)."""
        return {c.id: c.status for c in await self.catalog.cards(None)}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self, principal: Principal = Depends(permitted("models:list"))) -> ModelList:
        return ModelList(data=await self.catalog.cards(principal))

    # ------------------------------------------------------------ generation

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAM_DOC)
    async def chat_completions(self, req: ChatCompletionRequest, request: Request,
                               principal: Principal = Depends(authenticated)):
        label_model(request, req.model)
        if rag_collection(req.model)[0]:
            answer, extra = await self.rag.answer(req, principal)
            return self._alias_response(req, answer, extra, RagAliasInfo(**extra["rag"]).headers())
        if req.model == self.settings.router.orchestrator.alias:
            answer, orchestration = await self.orchestrator.answer(req, principal)
            return self._alias_response(req, answer, {"orchestration": orchestration})
        return await self._generate(GenerationKind.CHAT, req, request, principal)

    @app.post("/v1/completions", response_model=Completion, responses=STREAM_DOC)
    async def completions(self, req: CompletionRequest, request: Request,
                          principal: Principal = Depends(authenticated)):
        label_model(request, req.model)
        return await self._generate(GenerationKind.COMPLETION, req, request, principal)

    async def _generate(self, kind: GenerationKind, req: ChatCompletionRequest | CompletionRequest, request: Request,
                        principal: Principal):
        self.chat.check_limit(req.token_limit())
        call = ChatCall(principal, kind.value, claim=admitted(request))
        try:
            stream = await self.chat.open(call, req.model, req.to_generation(self.limits.max_tokens),
                                          features=req.model_dump(exclude_none=True), headers=request.headers)
        except APIError as e:
            if isinstance(e, ModelUnavailable):
                self.backends.forget_health(call.model)  # look again on the next request
            self.chat.failed(call, e)
            raise
        label_model(request, stream.model)
        headers = stream.headers()
        if not req.stream:
            answer = await stream.collect()
            headers["x-orfeas-cost-usd"] = f"{answer.cost_usd:.8f}"
            return JSONResponse(whole(kind, answer).model_dump(), headers=headers)
        body = stream_sse(kind, stream.events(), call.response_id, stream.model, req.include_usage,
                          on_error=lambda e: label_model(request, stream.model, e.type),
                          counted=stream.usage_or_counted)
        return SettledStreamingResponse(body, lambda: stream.close(error=True), headers={**SSE_HEADERS, **headers})

    def _alias_response(self, req: ChatCompletionRequest, answer, extra: dict[str, Any],
                        headers: dict[str, str] | None = None):
        if req.stream:
            return StreamingResponse(stream_sse(GenerationKind.CHAT, one_answer(answer.text, answer.usage),
                                                answer.response_id, answer.model, req.include_usage),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
        return JSONResponse({**whole(GenerationKind.CHAT, answer).model_dump(), **extra}, headers=headers)

    @app.post("/v1/embeddings", response_model=EmbeddingList)
    async def embeddings(self, req: EmbeddingRequest, request: Request,
                         principal: Principal = Depends(authenticated)) -> EmbeddingList:
        label_model(request, req.model)
        backend = await self.catalog.usable(req.model, principal, "embedding")
        texts = req.texts()
        if len(texts) > self.limits.max_embedding_inputs:
            raise InvalidRequest(f"{len(texts)} inputs, over the limit of {self.limits.max_embedding_inputs} "
                                 "per request", "input")
        # The key's, team's and model's rate limits hold here too (tokens: counted after the call).
        admission = await self.chat.limiter.admit(principal, req.model, sum(estimate_tokens(t) for t in texts))
        counts: list[int] = []
        try:
            vectors, counts = await asyncio.wait_for(backend.embed(texts), self.timeout_s)
        except TimeoutError:
            raise UpstreamTimeout(f"model {req.model!r} did not answer within {self.timeout_s:g}s") from None
        finally:
            admission.settle(sum(counts) if counts else None)
        if req.dimensions is not None and vectors and req.dimensions != len(vectors[0]):
            raise InvalidRequest(f"model {req.model!r} produces {len(vectors[0])}-dimensional vectors; "
                                 f"dimensions={req.dimensions} is not supported", "dimensions")
        self.metrics.usage(req.model, sum(counts), 0)
        data = [Embedding(index=i, embedding=encode_vector(v, req.encoding_format)) for i, v in enumerate(vectors)]
        return EmbeddingList(data=data, model=req.model, usage=Usage.of(sum(counts)))

    # ------------------------------------------------------------ orchestrator, usage, feedback, router

    @app.post("/v1/orchestrate", response_model=Orchestration)
    async def orchestrate(self, req: OrchestrateRequest, principal: Principal = Depends(authenticated)) -> dict:
        """Plan, run subtasks in parallel across backends, combine (see serve.router.orchestrator)."""
        return {"id": new_id("orch"), "created": now(), **await self.orchestrator.run(req, principal)}

    @app.get("/v1/usage", response_model=UsageReport)
    async def usage(self, request: Request, key_id: str | None = None, since: float | None = None,
                    period: Literal["day", "month"] | None = None,
                    principal: Principal = Depends(authenticated)) -> dict:
        """Usage and cost from the ledger: admins see every key (or `key_id=`), users their own."""
        unknown = sorted(set(request.query_params) - {"key_id", "since", "period"})
        if unknown:
            raise InvalidRequest(f"unknown query parameter {unknown[0]!r}", unknown[0])
        if since is not None and period is not None:
            raise InvalidRequest("give since or period, not both", "since")
        reads_all = bool(principal.allows("usage:read_all"))  # admins and auditors
        if not reads_all:
            principal.require("usage:read_own")
            if key_id not in (None, principal.key_id):
                raise PermissionDenied("a user key may only read its own usage", "key_id")
            key_id = principal.key_id
        start = period_start(period, time.time()) if period else since
        book = self.chat.book
        body = {"object": "usage", "key_id": key_id, "since": start, **await book.usage(key_id, start)}
        if not reads_all or key_id == principal.key_id:
            body["budget"] = await book.budget_view(principal)
        return body

    @app.post("/v1/feedback", response_model=FeedbackResult)
    async def feedback(self, fb: Feedback, principal: Principal = Depends(authenticated)) -> dict:
        """A score for an earlier response (by its id), counted in its experiment arm's figures."""
        try:
            result = await self.chat.book.add_feedback(
                fb.response_id, fb.score, None if principal.is_admin else principal.key_id, fb.comment)
        except KeyError:  # Ray raises the actor's error as an instance of its cause
            raise NotFound(f"no response {fb.response_id!r} of this key is in the ledger", "response_id") from None
        return {"object": "feedback", **result}

    @app.get("/v1/router/status", response_model=RouterStatus, dependencies=[Depends(admin)])
    async def router_status_http(self) -> dict:
        return await self.router_status()

    @app.get("/v1/admin/resources", dependencies=[Depends(admin)])
    async def admin_resources(self) -> dict:
        """Per node and per deployment resources, and the bottlenecks in words (scaling.resources)."""
        from scaling.resources import resource_monitor

        return await resource_monitor(self.settings).snapshot.remote()

    @app.api_route("/v1/rag/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def rag_disabled(self, path: str) -> None:
        """The RAG app serves /v1/rag/* under its own route prefix; this answers only without it."""
        raise NotFound(RAG_DISABLED)

    # ------------------------------------------------------------ in-cluster callers (Serve handles)

    async def router_status(self, probe: bool = False) -> dict:
        """Per-backend health and breaker state of this replica, and the names the router answers;
        with `probe`, after an active probe round of every backend (`orfeas status --probe`)."""
        if probe:
            await self.router.probe_all()
        return {"backends": self.router.status(),
                "routes": [{"name": n, "routes": what} for n, what in self.router.routed_names()]}

    async def _on_behalf_of(self, principal: Principal | None) -> Principal:
        """The principal an in-cluster call is made for, as the key store has it now (a workflow
        may outlive its key's revocation): every call made for a user carries that user's."""
        if principal is None:
            raise AuthenticationFailed("an in-cluster call must name the principal it is made for "
                                       "(the caller's; there is no internal admin caller)")
        return await app.state.authenticator.refresh(principal)

    async def rag_generator(self, model: str | None, principal: Principal | None = None) -> str | None:
        """The chat model a RAG answer generates with (the RAG app's /v1/rag/query and `orfeas ask`
        ask), for `principal` (required)."""
        return await self.rag.generator(model, await self._on_behalf_of(principal))

    async def complete_chat(self, model_id: str, messages: list[dict], max_tokens: int,
                            principal: Principal | None = None, trace: dict[str, str] | None = None) -> str:
        """The text of one greedy answer, for in-cluster callers that want only text (RAG)."""
        return (await self.chat_message(model_id, messages, max_tokens, principal=principal,
                                        trace=trace))["content"] or ""

    async def chat_message(self, model_id: str, messages: list[dict], max_tokens: int,
                           tools: list[dict] | None = None, principal: Principal | None = None,
                           trace: dict[str, str] | None = None) -> dict[str, Any]:
        """The chat path for in-cluster callers (the RAG service, agents): one greedy answer for
        `principal` (required: the caller's) through the router like any chat request.
        Returns the assistant message (`content`, `tool_calls` in OpenAI's shape) with the model
        that answered, its usage and its cost. `trace`: the caller's W3C carrier (its span parents
        this call's)."""
        cap = min(max_tokens, self.limits.max_tokens)
        gen = GenerationRequest(kind=GenerationKind.CHAT, messages=messages, tools=tools or None,
                                params=GenerationParams(max_tokens_cap=cap, temperature=0.0))
        with tracing.attached(trace):
            a = await self.chat.complete(ChatCall(await self._on_behalf_of(principal), "internal"), model_id, gen)
        return {"content": a.text or None, "tool_calls": [c.model_dump() for c in a.tool_calls] if a.tool_calls else None,
                "model": a.model, "usage": a.usage.model_dump(), "cost_usd": a.cost_usd}


def build_app(args: dict[str, Any]):
    """Serve application builder for the gateway (see serve.applications). A declarative deploy
    (a RayService's serveConfigV2, `serve deploy`) runs it once per config change, in Serve's
    build task: its `audit_deploy` arg has it audit the change (`orfeas up` does so itself)."""
    settings = settings_from_dict(args["settings"])
    if args.get("audit_deploy"):
        audit_declarative_deploy(settings)
    g = settings.gateway
    return serve.deployment(Gateway).options(
        name=GATEWAY_DEPLOYMENT,
        **replica_count(settings.autoscaling, GATEWAY_APP, num_replicas=g.num_replicas,
                        target_ongoing_requests=settings.autoscaling.api_target_ongoing_requests),
        max_ongoing_requests=g.max_ongoing_requests,
        ray_actor_options=replica_actor_options(settings.serve, num_cpus=g.num_cpus),
    ).bind(settings.to_dict())


def audit_declarative_deploy(settings) -> None:
    """`config.deploy`/`config.change` for the gateway's sections of a declarative deploy, by
    setting name (security/config_changes.py). Never fails the deploy."""
    from security.config_changes import record_deploy

    try:
        record_deploy(settings, actor="serve:declarative-deploy", source="serveConfigV2")
    except Exception:
        logging.getLogger(__name__).exception("could not audit the deployed configuration")
