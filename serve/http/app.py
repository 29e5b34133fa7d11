"""The one HTTP app builder of ORFEAS: every Serve app's FastAPI app comes from `http_app`.

    app = http_app("ORFEAS RAG")                    # module level: routes are declared on it

    @serve.ingress(app)
    class RagServer:
        def __init__(self, settings):
            self.settings = settings_from_dict(settings)
            app.state.configure(self.settings)      # limits, Authenticator, model labels

        @app.post("/query", response_model=Answer)
        async def query(self, req: Query, request: Request, principal: Principal = Depends(authenticated)):
            label_model(request, req.model)         # the layer maps unknown names to "other"
            ...

Built once, the app has: the error handlers (serve.http.errors), the request-id, metrics,
body-limit and error middlewares (pure ASGI, in that order from the outside in), OpenAI-style
error schemas on every route, and `app.state` an `HttpState` that the replica configures.

`serve.ingress` serves a copy of the app (it pickles it at decoration time, and the replica
unpickles the class, and may import the module again): every copy of one app's `HttpState` in
a process is the same object (it pickles as a reference to a per-process registry entry keyed
by the defining module and the title), so `configure` on the module's app reaches the app that
Serve serves. One module defines one app per title.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.datastructures import State
from starlette.middleware import Middleware

from config import Settings
from models.protocol import ErrorResponse
from security.auth import Authenticator
from security.log_redaction import install_log_redaction
from serve.http.admission import ShedMiddleware, Shedder
from serve.http.body import BodyLimitMiddleware
from serve.http.errors import ErrorMiddleware, install_error_handlers
from serve.http.json_guard import DEFAULT_MAX_JSON_DEPTH, JsonGuardMiddleware
from serve.http.metrics import MetricsMiddleware, request_metrics
from serve.http.request_id import RequestIdMiddleware, install_log_record_factory
from serve.http.surface import ApiSurfaceMiddleware
from serve.http.tracing import TracingMiddleware
from observability import tracing

DEFAULT_MAX_BODY_BYTES = 1_048_576
NO_MODEL, OTHER_MODEL = "-", "other"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "An OpenAI-style error: the bad parameter in `param`."},
    "5XX": {"model": ErrorResponse, "description": "An OpenAI-style error."},
}
# The statuses every route may answer, each named, so that tools (schemathesis, client generators)
# see them: a bad body, a missing key, a scope, an unknown id, a wrong method (with `Allow`), a
# body too large, a limit (with `Retry-After`), no capacity (with `Retry-After`).
for _status, _why in {400: "Invalid request: the bad parameter is in `param`.",
                      401: "No valid API key (`WWW-Authenticate: Bearer`).",
                      403: "The key may not do this.", 404: "No such resource.",
                      405: "Method not allowed; `Allow` lists the methods.", 413: "Request body too large.",
                      429: "A limit was reached; retry after `Retry-After` seconds.",
                      503: "No capacity or a part is down; retry after `Retry-After` seconds."}.items():
    ERROR_RESPONSES[_status] = {"model": ErrorResponse, "description": _why}

# The dependencies that authenticate (serve.http.auth adds them): routes that use one get the
# bearer scheme in their OpenAPI operation.
AUTH_DEPENDENCIES: set[Callable] = set()
BEARER_SCHEME = {"type": "http", "scheme": "bearer",
                 "description": "An ORFEAS API key: `Authorization: Bearer <key>`."}

_registry: dict[str, HttpState] = {}
_registry_lock = threading.Lock()


def _shared_state(key: str, name: str) -> HttpState:
    with _registry_lock:
        state = _registry.get(key)
        if state is None:
            state = _registry[key] = HttpState(key, name)
        return state


def catalog_label(settings: Settings, *extra: str) -> Callable[[str | None], str]:
    """A model label: the catalog's ids (and `extra` names) as they are, any other name "other"."""
    known = frozenset(m.id for m in settings.models) | frozenset(extra)
    return lambda model: (model if model in known else OTHER_MODEL) if model else NO_MODEL


def _unknown_label(model: str | None) -> str:
    return OTHER_MODEL if model else NO_MODEL


def _in_serve_replica() -> bool:
    try:
        from ray import serve

        serve.get_replica_context()
        return True
    except Exception:
        return False


class HttpState(State):
    """`app.state` of an app built by `http_app`: what the layer needs from the replica.

    Apps may keep their own values on it too (`app.state.x = ...`, as on any Starlette state)."""

    def __init__(self, key: str, name: str):
        super().__init__()
        for attr, value in {"key": key, "name": name, "settings": None, "authenticator": None,
                            "max_body_bytes": DEFAULT_MAX_BODY_BYTES, "model_label": _unknown_label,
                            "behind_serve": False, "max_json_depth": DEFAULT_MAX_JSON_DEPTH,
                            "deprecated": {}, "shed": None}.items():
            object.__setattr__(self, attr, value)

    def __reduce__(self):
        return _shared_state, (self.key, self.name)

    def configure(self, settings: Settings, *, authenticator: Authenticator | None = None,
                  model_label: Callable[[str | None], str] | None = None,
                  behind_serve: bool | None = None, shed: Shedder | None = None) -> HttpState:
        """Set at replica init: the body limit, the Authenticator the `authenticated` dependency
        uses (one from the settings unless given), and the model label (catalog ids, else
        "other"); `behind_serve` (detected) says Serve's ingress already echoes request ids;
        `shed` refuses requests for capacity before the body checks and handlers (serve.http.admission)."""
        values = {"settings": settings, "max_body_bytes": settings.limits.max_body_bytes,
                  "authenticator": authenticator or Authenticator(settings),
                  "model_label": model_label or catalog_label(settings),
                  "behind_serve": _in_serve_replica() if behind_serve is None else behind_serve,
                  "max_json_depth": settings.limits.max_json_depth, "shed": shed}
        for attr, value in values.items():
            object.__setattr__(self, attr, value)
        request_metrics()  # registered with the replica's metrics agent before the first request
        tracing.configure(settings.tracing, self.name)  # the replica's tracer (nothing when tracing is off)
        install_log_redaction(settings)  # the replica's ORFEAS log records never carry raw PII (pii.logs)
        return self


def http_app(title: str, *, name: str | None = None, version: str = "0.1.0", **fastapi_kwargs: Any) -> FastAPI:
    """A FastAPI app with ORFEAS's HTTP layer installed. `name` is the app's metrics label (by
    default the title without "ORFEAS ", lower case, dashes for spaces)."""
    name = name or title.removeprefix("ORFEAS ").strip().lower().replace(" ", "-")
    fastapi_kwargs.setdefault("docs_url", "/docs")
    fastapi_kwargs.setdefault("redoc_url", None)
    responses = {**ERROR_RESPONSES, **fastapi_kwargs.pop("responses", {})}
    module = sys._getframe(1).f_globals.get("__name__", "?")
    state = _shared_state(f"{module}:{title}", name)
    # Outside in: the request id first (so everything after, logs included, has it), then the
    # metrics (which see the final status, 413s and 500s included), the body limit, and the
    # catch-all that turns what no handler took into a JSON response.
    # The server span sits just inside the request id (which it records).
    middleware = [Middleware(RequestIdMiddleware, http=state), Middleware(TracingMiddleware, http=state),
                  Middleware(MetricsMiddleware, http=state), Middleware(ApiSurfaceMiddleware, http=state),
                  Middleware(ShedMiddleware, http=state),  # capacity refusals, before the body is checked
                  Middleware(BodyLimitMiddleware, http=state), Middleware(JsonGuardMiddleware, http=state),
                  Middleware(ErrorMiddleware),
                  *fastapi_kwargs.pop("middleware", ())]
    app = FastAPI(title=title, version=version, responses=responses, middleware=middleware, **fastapi_kwargs)
    app.state = state
    install_error_handlers(app)
    install_log_record_factory()
    app.openapi = _openapi_with_bearer(app, app.openapi)
    return app


def _authenticates(dependant) -> bool:
    return any(d.call in AUTH_DEPENDENCIES or _authenticates(d) for d in dependant.dependencies)


def _api_routes(router: Any, prefix: str = ""):
    """(route, its full path) for every API route under `router`. Since FastAPI 0.137,
    `include_router` (and `serve.ingress`'s class routes) nest an `_IncludedRouter` node instead
    of copying its routes up, so the walk goes into those, as Ray Serve's own route walk does."""
    for route in router.routes:
        if isinstance(route, APIRoute):
            yield route, prefix + route.path_format
        elif hasattr(route, "original_router"):
            yield from _api_routes(route.original_router, prefix + route.include_context.prefix)


def _openapi_with_bearer(app: FastAPI, generate: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            secured = False
            for route, path in _api_routes(app.router):
                if _authenticates(route.dependant):
                    for method in route.methods:
                        op = schema.get("paths", {}).get(path, {}).get(method.lower())
                        if op is not None:
                            op["security"], secured = [{"bearer": []}], True
            # Routes that check credentials themselves name the scheme (openapi_extra): the
            # scheme they name must be defined too.
            secured = secured or any("security" in op for ops in schema.get("paths", {}).values()
                                     for op in ops.values() if isinstance(op, dict))
            if secured:
                schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = BEARER_SCHEME
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


build_app = http_app


def http_state(app: Any) -> HttpState:
    state = getattr(app, "state", None)
    if not isinstance(state, HttpState):
        raise RuntimeError("this app was not built with serve.http.http_app")
    return state


def label_model(request: Request, model: str | None, error_type: str | None = None) -> None:
    """Name the model a request is about, for the request metrics (the layer maps names outside
    the catalog to "other"); `error_type` marks a failure the status does not show (a stream
    that failed after its 200)."""
    request.state.model = model
    if error_type is not None:
        request.state.error_type = error_type
