"""Request bodies: the size limit (413 `limits.max_body_bytes`) as ASGI middleware, and the
one JSON reader for code that reads a body itself.

The limit holds for a declared `content-length` (refused before a byte is read) and for a
chunked body without one (refused once the bytes received pass it). Every ORFEAS body is JSON:
a body sent without a content type, or as `application/x-www-form-urlencoded` / `text/plain`
(what `curl -d` sends), is read as JSON, as the routes always did.
"""

from __future__ import annotations

import json

from fastapi import Request
from starlette.types import Message, Receive, Scope, Send

from models.errors import InvalidRequest, PayloadTooLarge
from serve.http.errors import BodyTooLarge, error_response
from serve.http.middleware import HttpMiddleware

_JSON = (b"content-type", b"application/json")
_READ_AS_JSON = (b"application/x-www-form-urlencoded", b"text/plain")


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


class BodyLimitMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.http.max_body_bytes
        declared = ctype_at = None
        headers = scope["headers"]
        for i, (k, v) in enumerate(headers):
            if k == b"content-length":
                declared = v
            elif k == b"content-type":
                ctype_at = i
        if declared is not None and declared.isdigit() and int(declared) > limit:
            e = PayloadTooLarge(f"request body is {int(declared)} bytes, over the limit of {limit}")
            scope.setdefault("state", {})["error_type"] = e.type
            await error_response(e)(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            if ctype_at is None:
                scope["headers"] = [*headers, _JSON]
            elif headers[ctype_at][1].split(b";", 1)[0].strip().lower() in _READ_AS_JSON:
                scope["headers"] = [*headers[:ctype_at], _JSON, *headers[ctype_at + 1:]]
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)
