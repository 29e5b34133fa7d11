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

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayTaskError

from config import Settings, settings_from_dict
from models.errors import APIError, InvalidRequest, ModelNotFound
from security.auth import Authenticator, Principal
from serve.gateway.body import read_json
from serve.applications import replica_actor_options
from serve.gateway.errors import install_error_handlers, invalid_request

log = logging.getLogger(__name__)

EVENT_POLL_S = 15.0


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: str | None = Field(None, description="A registered workflow's name.")
    definition: dict[str, Any] | str | None = Field(None, description="An inline definition (object or YAML).")
    inputs: dict[str, Any] = Field(default_factory=dict)


class Approval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: str | None = None
    approved: bool = True
    comment: str = Field("", max_length=2000)


def _unwrap(e: BaseException) -> BaseException:
    if isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), APIError):
        return e.cause
    return e


def _owner(principal: Principal) -> str | None:
    """Whose runs a caller sees: admins see all (None)."""
    return None if principal.role == "admin" else principal.key_id


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
        self.auth = Authenticator(self.settings)
        self._make = coordinator
        self._coord = None

    @property
    def coord(self):
        if self._coord is None:
            self._coord = self._make(self.settings)
        return self._coord

    async def _principal(self, request: Request) -> Principal:
        return await self.auth.authenticate(request.headers.get("authorization"))

    async def _call(self, method: str, *args, **kwargs) -> Any:
        try:
            return await getattr(self.coord, method).remote(*args, **kwargs)
        except Exception as e:
            cause = _unwrap(e)
            if isinstance(cause, APIError):
                raise cause from None
            if "ActorDiedError" in type(e).__name__ or "ActorUnavailable" in type(e).__name__:
                self._coord = None  # a restarted coordinator gets a fresh handle next time
            raise

    async def _body(self, request: Request, cls: type[BaseModel]) -> BaseModel:
        data = await read_json(request, self.settings.limits.max_body_bytes)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise invalid_request(e) from None


workflows_api = FastAPI(title="ORFEAS workflows", docs_url="/docs", redoc_url=None)
install_error_handlers(workflows_api)
agents_api = FastAPI(title="ORFEAS agents", docs_url="/docs", redoc_url=None)
install_error_handlers(agents_api)


@agents_api.middleware("http")
async def _bare_prefix(request: Request, call_next):
    """`GET /v1/agents` (the route prefix itself) is the listing, not a redirect to `/v1/agents/`."""
    root = request.scope.get("root_path", "")
    if root and request.scope["path"] == root:
        request.scope["path"] = root + "/"
        request.scope["raw_path"] = (root + "/").encode()
    return await call_next(request)


@serve.ingress(workflows_api)
class WorkflowsApi(_Api):
    @workflows_api.post("/runs")
    async def start(self, request: Request) -> JSONResponse:
        principal = await self._principal(request)
        body = await self._body(request, StartRun)
        if (body.workflow is None) == (body.definition is None):
            raise InvalidRequest("give either 'workflow' (a registered name) or 'definition' (inline)", "workflow")
        definition = body.definition if body.definition is not None else body.workflow
        if body.definition is not None:
            for model in sorted(_models_of(body.definition, self.settings)):
                if self.settings.model(model) is None:
                    raise ModelNotFound(f"model {model!r} does not exist; GET /v1/models lists the models", "model")
                principal.check_model(model)
        run = await self._call("start_run", definition, body.inputs, principal.key_id)
        return JSONResponse(run, status_code=201)

    @workflows_api.get("/runs")
    async def list_runs(self, request: Request, limit: int = 100) -> JSONResponse:
        principal = await self._principal(request)
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000", "limit")
        runs = await self._call("list_runs", _owner(principal), limit)
        return JSONResponse({"object": "list", "data": runs})

    @workflows_api.get("/runs/{run_id}")
    async def get_run(self, run_id: str, request: Request) -> JSONResponse:
        principal = await self._principal(request)
        return JSONResponse(await self._call("get_run", run_id, _owner(principal)))

    @workflows_api.get("/runs/{run_id}/events")
    async def events(self, run_id: str, request: Request, after: int = 0) -> StreamingResponse:
        principal = await self._principal(request)
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

    @workflows_api.post("/runs/{run_id}/cancel")
    async def cancel(self, run_id: str, request: Request) -> JSONResponse:
        principal = await self._principal(request)
        return JSONResponse(await self._call("cancel", run_id, _owner(principal)))

    @workflows_api.post("/runs/{run_id}/approve")
    async def approve(self, run_id: str, request: Request) -> JSONResponse:
        principal = await self._principal(request)
        body = await self._body(request, Approval)
        return JSONResponse(await self._call("approve", run_id, body.step, principal.key_id, body.approved,
                                             body.comment, _owner(principal)))

    @workflows_api.post("/runs/{run_id}/resume")
    async def resume(self, run_id: str, request: Request) -> JSONResponse:
        principal = await self._principal(request)
        return JSONResponse(await self._call("resume", run_id, _owner(principal)))

    @workflows_api.get("/definitions")
    async def definitions(self, request: Request) -> JSONResponse:
        await self._principal(request)
        return JSONResponse({"object": "list", "data": await self._call("workflows")})


@serve.ingress(agents_api)
class AgentsApi(_Api):
    @agents_api.get("/")
    async def list_agents(self, request: Request, capability: str | None = None) -> JSONResponse:
        await self._principal(request)
        return JSONResponse({"object": "list", "data": await self._call("agents", capability)})


def _deployment(cls, name: str, settings: Settings):
    return serve.deployment(cls).options(
        name=name, num_replicas=1, max_ongoing_requests=200,
        ray_actor_options=replica_actor_options(settings.serve,
                                                num_cpus=settings.agents.api_num_cpus),
    ).bind(settings.to_dict())


def build_workflows_app(args: dict[str, Any]):
    settings = settings_from_dict(args["settings"])
    return _deployment(WorkflowsApi, "WorkflowsApi", settings)


def build_agents_app(args: dict[str, Any]):
    settings = settings_from_dict(args["settings"])
    return _deployment(AgentsApi, "AgentsApi", settings)
