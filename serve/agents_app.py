"""The agents and workflows HTTP API: two small Serve ingress apps over the coordinator actor
(no postponed annotations: FastAPI reads the route signatures at class-decoration time).

    /v1/workflows/runs                POST start (registered name or inline definition), GET list
    /v1/workflows/runs/{id}           GET status, steps, output, analytics
    /v1/workflows/runs/{id}/events    GET server-sent events as steps progress
    /v1/workflows/runs/{id}/cancel    POST
    /v1/workflows/runs/{id}/approve   POST {"step"?, "approved"?, "comment"?}
    /v1/workflows/runs/{id}/resume    POST continue from the last checkpoint
    /v1/workflows/definitions         GET registered workflows
    /v1/agents                        GET the agent registry (?capability=)

Same API keys as every /v1 route; a user sees only the runs their key started, an admin all.
"""

import asyncio
import json
import logging
from typing import Any, Generic, Literal, TypeVar

from fastapi import Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError

from config import Settings, settings_from_dict
from config.names import AGENTS_APP, WORKFLOWS_APP
from models.errors import InvalidRequest, ModelNotFound
from security.auth import Principal
from observability import tracing
from scaling.serve_options import replica_count
from serve.applications import AGENTS_DEPLOYMENT, WORKFLOWS_DEPLOYMENT, replica_actor_options
from serve.http import authenticated, http_app, label_model, permitted

log = logging.getLogger(__name__)

EVENT_POLL_S = 15.0
# Coordinator calls that change nothing: retried once when the coordinator is lost.
IDEMPOTENT_READS = frozenset({"get_run", "list_runs", "events_after", "workflows", "agents"})
COORDINATOR_RETRY_WAIT_S = 0.5


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: str | None = Field(None, description="A registered workflow's name.")
    definition: dict[str, Any] | str | None = Field(None, description="An inline definition (object or YAML).")
    inputs: dict[str, Any] = Field(default_factory=dict)


class Approval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: str | None = Field(None, description="The step to settle (default: the one awaiting approval).")
    approved: bool = True
    comment: str = Field("", max_length=2000)


# ---------------------------------------------------------------- responses (the coordinator's dicts)

T = TypeVar("T")


class Listing(BaseModel, Generic[T]):
    """An OpenAI-style list: `{"object": "list", "data": [...]}`."""

    object: Literal["list"] = "list"
    data: list[T]


class RunSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["workflow.run"] = "workflow.run"
    workflow: str
    owner: str
    status: str = Field(description="pending, running, awaiting_approval, succeeded, failed, cancelled, ...")
    created_at: float
    finished_at: float | None = None
    error: str | None = None
    awaiting_approval: list[str] = Field(default_factory=list, description="Steps waiting for an approval.")


class RunDetail(RunSummary):
    inputs: dict[str, Any] | None = None
    output: Any = None
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Each step's state, by id.")
    analytics: dict[str, Any] = Field(default_factory=dict, description="Model calls, tokens, cost, timings.")
    definition: dict[str, Any] = Field(default_factory=dict, description="The workflow definition run.")


class ResumeResult(RunSummary):
    resumed: bool
    reason: str | None = None


class Definition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    steps: list[str] | None = None
    error: str | None = Field(None, description="Why a registered definition does not parse.")


class AgentCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    role: str | None = None
    capabilities: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)
    model: str | None = None
    fallback_models: list[str] = Field(default_factory=list)
    priority: int = 0
    replicas: int | None = None
    scope: str = Field("global", description="`global`, or the run id of a workflow's own agent.")
    load: int = Field(0, description="Tasks in flight on this agent's actors.")
    actors: list[dict[str, Any]] = Field(default_factory=list)


EVENTS_DOC = {200: {"description": "Server-sent events (`id`, `event`, `data`: the event as JSON) as the run "
                                   "progresses; `event: end` when it is over.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _owner(principal: Principal) -> str | None:
    """Whose runs a caller sees: admins see all (None)."""
    return None if principal.is_admin else principal.key_id


def _models_of(definition: Any, settings: Settings) -> set[str]:
    """Chat models an inline definition names (its model steps and its own agents)."""
    from agents.spec import WorkflowError, WorkflowSpec

    try:
        wf = WorkflowSpec.parse(definition)
    except WorkflowError:
        return set()  # the coordinator reports the definition's problem
    models = {s.model for s in wf.steps if s.kind == "model" and s.model}
    models |= {m for a in wf.agents for m in [a.model, *a.fallback_models] if m}
    return models


class _Api:
    def __init__(self, settings: dict[str, Any]):
        from agents.coordinator import coordinator

        self.settings = settings_from_dict(settings)
        self.api.state.configure(self.settings)
        self._make = coordinator
        self._coord = None

    @property
    def coord(self):
        if self._coord is None:
            self._coord = self._make(self.settings)
        return self._coord

    async def _call(self, method: str, *args, **kwargs) -> Any:
        """A coordinator call; its typed errors reach the client through the HTTP layer. When the
        coordinator is lost, a read is retried once, transparently, on a fresh handle (a new or
        restarted coordinator, resumed from its checkpoints); anything else, or a read that fails
        again, is the layer's 503 with Retry-After."""
        for attempt in (1, 2):
            try:
                return await getattr(self.coord, method).remote(*args, **kwargs)
            except RayActorError:
                self._coord = None  # a restarted coordinator gets a fresh handle next time
                if attempt == 2 or method not in IDEMPOTENT_READS:
                    raise
                await asyncio.sleep(COORDINATOR_RETRY_WAIT_S)


class _BarePrefix:
    """`GET /v1/agents` (the route prefix itself) is the listing, not a redirect to `/v1/agents/`
    (pure ASGI, like every middleware of the HTTP layer)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            root = scope.get("root_path", "")
            if root and scope["path"] == root:
                scope["path"] = root + "/"
                scope["raw_path"] = (root + "/").encode()
        await self.app(scope, receive, send)


workflows_api = http_app("ORFEAS workflows", name=WORKFLOWS_APP)
agents_api = http_app("ORFEAS agents", name=AGENTS_APP)
agents_api.add_middleware(_BarePrefix)  # outermost: it runs before the route is matched


@serve.ingress(workflows_api)
class WorkflowsApi(_Api):
    api = workflows_api

    @workflows_api.post("/runs", response_model=RunSummary, status_code=201)
    async def start(self, request: Request, body: StartRun | None = None,
                    principal: Principal = Depends(authenticated)) -> dict:
        body = body or StartRun()
        if (body.workflow is None) == (body.definition is None):
            raise InvalidRequest("give either 'workflow' (a registered name) or 'definition' (inline)", "workflow")
        definition = body.definition if body.definition is not None else body.workflow
        # An inline definition defines a workflow; a registered one is only run.
        principal.require("workflows:define" if body.definition is not None else "workflows:run")
        if body.definition is not None:
            models = sorted(_models_of(body.definition, self.settings))
            if len(models) == 1:
                label_model(request, models[0])
            for model in models:
                if self.settings.model(model) is None:
                    raise ModelNotFound(f"model {model!r} does not exist; GET /v1/models lists the models", "model")
                principal.check_model(model)
        # The run's model calls are made for this key: its model scopes and budget apply to them.
        return await self._call("start_run", definition, body.inputs, principal.key_id, caller=principal,
                                trace=tracing.inject())  # the run's spans join this request's trace

    @workflows_api.get("/runs", response_model=Listing[RunSummary])
    async def list_runs(self, limit: int = Query(100, description="At most this many runs, newest first (1-1000)."),
                        principal: Principal = Depends(permitted("workflows:read"))) -> dict:
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000", "limit")
        return {"object": "list", "data": await self._call("list_runs", _owner(principal), limit)}

    @workflows_api.get("/runs/{run_id}", response_model=RunDetail)
    async def get_run(self, run_id: str, principal: Principal = Depends(permitted("workflows:read"))) -> dict:
        return await self._call("get_run", run_id, _owner(principal))

    @workflows_api.get("/runs/{run_id}/events", response_class=StreamingResponse, responses=EVENTS_DOC)
    async def events(self, run_id: str, request: Request, after: int = 0,
                     principal: Principal = Depends(permitted("workflows:read"))) -> StreamingResponse:
        owner = _owner(principal)
        last = request.headers.get("last-event-id")
        after = int(last) if last and last.isdigit() else after
        first = await self._call("events_after", run_id, after, 0.0, owner)  # 404 before the stream starts

        async def stream():
            batch, seen = first, after
            while True:
                for e in batch["events"]:
                    seen = e["seq"]
                    yield f"id: {e['seq']}\nevent: {e['event']}\ndata: {json.dumps(e, default=str)}\n\n"
                if batch["done"]:
                    yield "event: end\ndata: {}\n\n"
                    return
                batch = await self._call("events_after", run_id, seen, EVENT_POLL_S, owner)
                if not batch["events"] and not batch["done"]:
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @workflows_api.post("/runs/{run_id}/cancel", response_model=RunSummary)
    async def cancel(self, run_id: str, principal: Principal = Depends(permitted("workflows:run"))) -> dict:
        return await self._call("cancel", run_id, _owner(principal))

    @workflows_api.post("/runs/{run_id}/approve", response_model=RunSummary)
    async def approve(self, run_id: str, request: Request, body: Approval | None = None,
                      principal: Principal = Depends(permitted("workflows:approve"))) -> dict:
        body = body or Approval()
        return await self._call("approve", run_id, body.step, principal.key_id, body.approved, body.comment,
                                _owner(principal), request_id=getattr(request.state, "request_id", "") or "",
                                source=request.client.host if request.client else "")

    @workflows_api.post("/runs/{run_id}/resume", response_model=ResumeResult)
    async def resume(self, run_id: str, principal: Principal = Depends(permitted("workflows:run"))) -> dict:
        return await self._call("resume", run_id, _owner(principal))

    @workflows_api.get("/definitions", response_model=Listing[Definition],
                          dependencies=[Depends(permitted("workflows:read"))])
    async def definitions(self) -> dict:
        return {"object": "list", "data": await self._call("workflows")}


@serve.ingress(agents_api)
class AgentsApi(_Api):
    api = agents_api

    @agents_api.get("/", response_model=Listing[AgentCard], dependencies=[Depends(permitted("agents:read"))])
    async def list_agents(self, capability: str | None = None) -> dict:
        return {"object": "list", "data": await self._call("agents", capability)}


def _deployment(cls, name: str, settings: Settings, app: str):
    return serve.deployment(cls).options(
        name=name, max_ongoing_requests=200,
        **replica_count(settings.autoscaling, app, num_replicas=1,
                        target_ongoing_requests=settings.autoscaling.api_target_ongoing_requests),
        ray_actor_options=replica_actor_options(settings.serve,
                                                num_cpus=settings.agents.api_num_cpus),
    ).bind(settings.to_dict())


def build_workflows_app(args: dict[str, Any]):
    settings = settings_from_dict(args["settings"])
    return _deployment(WorkflowsApi, WORKFLOWS_DEPLOYMENT, settings, WORKFLOWS_APP)


def build_agents_app(args: dict[str, Any]):
    settings = settings_from_dict(args["settings"])
    return _deployment(AgentsApi, AGENTS_DEPLOYMENT, settings, AGENTS_APP)
