"""Reading a request's JSON body within the size limit: one place for every ORFEAS ingress."""

from __future__ import annotations

import json

from fastapi import Request

from models.errors import InvalidRequest, PayloadTooLarge


async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object; a declared or actual size over `max_bytes` is refused before parsing."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body is {declared} bytes, over the limit of {max_bytes}")
    body = await request.body()
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(body)} bytes, over the limit of {max_bytes}")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise InvalidRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data
