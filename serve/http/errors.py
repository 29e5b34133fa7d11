"""Every error leaves an ORFEAS app as an OpenAI-style JSON error object, from this one module.

Typed `APIError`s map to their status and body; a `RequestValidationError` becomes a 400 that
names the parameter; a Ray wrapper (`RayTaskError`, also the dual "instance of its cause" class
Ray raises from actor and handle calls) is unwrapped here and nowhere else; anything else is a
logged 500 that says nothing about the internals.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import RayActorError, RayTaskError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import APIError, InvalidRequest, PayloadTooLarge, ServiceUnavailable

log = logging.getLogger(__name__)

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def unwrap(e: BaseException) -> BaseException:
    """The `APIError` a replica or actor raised, out of Ray's wrapper(s); any other error as it is.

    For code that awaits handles or actors itself and wants the typed error (to branch on it, or
    to re-raise it as its own); routes need not call it: the layer unwraps what they let through."""
    seen = e
    for _ in range(8):  # an actor calling an actor wraps twice; never loop on a cycle
        cause = getattr(seen, "cause", None) if isinstance(seen, RayTaskError) else None
        if cause is None:
            break
        if isinstance(cause, APIError):
            return cause
        seen = cause
    return e


def api_error(e: BaseException) -> APIError | None:
    """The typed error behind `e`, if there is one; a lost actor (Ray's RayActorError family,
    raised here or by an actor that called it) is a 503 `ServiceUnavailable` with Retry-After."""
    e = unwrap(e)
    if isinstance(e, APIError):
        return e
    return ServiceUnavailable("a platform service this request needs was lost and is being restarted; "
                              "retry shortly") if lost_actor(e) else None


def lost_actor(e: BaseException) -> bool:
    """Whether `e` is, or wraps, Ray's error for an actor that died or cannot be reached."""
    for _ in range(8):
        if isinstance(e, RayActorError):
            return True
        e = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
        if e is None:
            return False
    return False


def error_type_for(status: int) -> str:
    """The OpenAI error type of a bare HTTP status (when no typed error says better)."""
    return _HTTP_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def invalid_request(err: ValidationError | RequestValidationError) -> InvalidRequest:
    """The first problem of a validation error, with the parameter named; never a raw pydantic dump."""
    first = err.errors()[0]
    kind = first.get("type")
    raw = tuple(first.get("loc", ()))
    if kind == "json_invalid":
        why = (first.get("ctx") or {}).get("error")
        where = f" at position {raw[1]}" if len(raw) > 1 and isinstance(raw[1], int) else ""
        return InvalidRequest(f"request body is not valid JSON{': ' + str(why) if why else ''}{where}")
    whole_body = raw == ("body",)
    if raw[:1] in (("body",), ("query",), ("path",), ("header",), ("cookie",)):
        raw = raw[1:]  # where FastAPI found it: the parameter's own name is what a client sent
    param = ".".join(str(p) for p in raw) or None
    if whole_body:
        if kind == "missing":
            return InvalidRequest("request body is required: a JSON object")
        return InvalidRequest("request body must be a JSON object")
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "missing":
        return InvalidRequest(f"missing required parameter '{param}'", param)
    if kind == "extra_forbidden":
        return InvalidRequest(f"unknown parameter '{param}'", param)
    return InvalidRequest(f"invalid value for '{param}': {msg}" if param else msg, param)


def error_response(e: APIError, request: Request | None = None) -> JSONResponse:
    """The JSON response of a typed error (a 401 says how to authenticate). With the request,
    the error's type is noted for the request metrics."""
    if request is not None:
        request.state.error_type = e.type
    return JSONResponse(e.body(), status_code=e.status, headers=error_headers(e))


def error_headers(e: APIError) -> dict[str, str] | None:
    """A 401's challenge; `Retry-After` (whole seconds) for an error that says when to come back
    (a class or instance attribute `retry_after_s`: a 429 or 503 of a limit or of capacity); and
    the headers an error carries itself (a rate limit's Retry-After and x-ratelimit-*)."""
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    retry = getattr(e, "retry_after_s", None)
    if retry is not None:
        headers["Retry-After"] = str(max(int(-(-float(retry) // 1)), 1))
        if float(retry) != int(retry):  # a fraction (a jittered refusal): exact for clients that read it (OpenAI's)
            headers["retry-after-ms"] = str(max(int(float(retry) * 1000), 1))
    headers.update(getattr(e, "headers", None) or {})
    return headers or None


def _internal(scope: Scope, e: BaseException) -> JSONResponse:
    app = scope.get("app")
    state = scope.setdefault("state", {})
    log.error("unhandled error in %s %s (%s, request %s)", scope.get("method"), scope.get("path"),
              getattr(app, "title", "app"), state.get("request_id", "-"), exc_info=e)
    state["error_type"] = "api_error"
    return JSONResponse({"error": {"message": "internal error", "type": "api_error", "param": None,
                                   "code": None}}, status_code=500)


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body without (or past) its declared length goes over the
    limit; an HTTPException so that FastAPI's body reader lets it through to the handler."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is over the limit of {limit} bytes")
        self.limit = limit


def allowed_methods(request: Request) -> str:
    """Every method some route of the app serves at this path (Starlette's 405 names only the
    first route that matched the path: a path with a GET and a POST route said `Allow: POST`)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "\x00"})  # no method matches: path only
        if match is Match.PARTIAL and getattr(route, "methods", None):
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    """The handlers every ORFEAS app has (`http_app` installs them; a bare FastAPI may call this)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(api_error(e) or e, request)  # Ray's dual class is an APIError too

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request(e), request)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        if isinstance(e, BodyTooLarge):
            return error_response(PayloadTooLarge(str(e.detail)), request)
        kind = error_type_for(e.status_code)
        request.state.error_type = kind
        headers = getattr(e, "headers", None)
        if e.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return JSONResponse({"error": {"message": str(e.detail), "type": kind, "param": None, "code": None}},
                            status_code=e.status_code, headers=headers)

    @app.exception_handler(RayTaskError)
    async def _ray(request: Request, e: RayTaskError) -> JSONResponse:
        typed = api_error(e)
        return error_response(typed, request) if typed is not None else _internal(request.scope, e)

    @app.exception_handler(Exception)  # the last resort, outside every middleware
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        typed = api_error(e)  # a lost actor
        return error_response(typed, request) if typed is not None else _internal(request.scope, e)


class ErrorMiddleware:
    """Innermost of the layer's middlewares: an error no handler took (a plain exception, or a
    Ray wrapper whose cause is typed) becomes its JSON response here, so that the request-id
    and metrics middlewares around it still see a response. After the response has started
    (a stream), the error is re-raised: nothing can be sent in its place."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception as e:
            if started:
                raise
            typed = api_error(e)
            if typed is not None:
                scope.setdefault("state", {})["error_type"] = typed.type
                response = JSONResponse(typed.body(), status_code=typed.status, headers=error_headers(typed))
            else:
                response = _internal(scope, e)
            await response(scope, receive, send)
