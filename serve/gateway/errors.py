"""Every error leaves the gateway as an OpenAI-style JSON error object, from one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from models.errors import APIError, InvalidRequest

log = logging.getLogger(__name__)


def invalid_request(err: ValidationError | RequestValidationError) -> InvalidRequest:
    """The first problem of a validation error, with the parameter named; never a raw pydantic dump."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        return InvalidRequest(f"missing required parameter '{param}'", param)
    if first.get("type") == "extra_forbidden":
        return InvalidRequest(f"unknown parameter '{param}'", param)
    return InvalidRequest(f"invalid value for '{param}': {msg}" if param else msg, param)


def error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request(e))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "api_error")
        return JSONResponse({"error": {"message": str(e.detail), "type": kind, "param": None, "code": None}},
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in the gateway")
        return JSONResponse({"error": {"message": "internal error in the gateway", "type": "api_error",
                                       "param": None, "code": None}}, status_code=500)
