"""Hostile JSON bodies are refused before any parser sees them (400, naming what is wrong):

- nesting deeper than `limits.max_json_depth`: Python's `json` and pydantic recurse, so 10,000
  levels of `[` would be a `RecursionError` (a 500) in whatever parses it first;
- bytes that are not UTF-8;
- lone UTF-16 surrogates (`"a\\ud800b"`): valid JSON, but not text; tokenizers, embedders and
  Qdrant fail on them deep inside, with messages that name their internals.

The depth is found by a scan over the bytes (strings blanked out first), never by recursion; a
body with no `\\uD8..`-`\\uDF..` escape is never parsed here. The checked body is handed on.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from models.errors import InvalidRequest, PayloadTooLarge
from serve.http.errors import BodyTooLarge, error_response
from serve.http.middleware import HttpMiddleware

DEFAULT_MAX_JSON_DEPTH = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(rb"[\[\]{}]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_depth(body: bytes, limit: int) -> int:
    """The nesting depth of a JSON text, counted up to `limit + 1` (no parse, no recursion); a
    text with no more brackets than `limit` gets their count (it cannot be deeper)."""
    opening = body.count(b"[") + body.count(b"{")
    if opening <= limit:
        return opening
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', body)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
        else:
            depth -= 1
    return deepest


def _surrogate_at(value: Any) -> str | None:
    """The path (`messages.0.content`) of the first string (or key) holding a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                here = f"{path}.{k}" if path else str(k)
                if _SURROGATE.search(k):
                    return here
                stack.append((here, item))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(v))
    return None


def check_json_body(body: bytes, max_depth: int) -> None:
    """Raise `InvalidRequest` for a body too deep, not UTF-8, or with a lone surrogate."""
    if not body:
        return
    depth = json_depth(body, max_depth)
    if depth > max_depth:
        raise InvalidRequest(f"request body nests deeper than the limit of {max_depth} levels "
                             "(limits.max_json_depth)", code="json_too_deep")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_unicode") from None
    if not _SURROGATE_ESCAPE.search(text):
        return
    try:
        data = json.loads(text)
    except ValueError:
        return  # not JSON: the route's own parser says so
    where = _surrogate_at(data)
    if where is not None:
        where = where.encode("utf-8", "backslashreplace").decode("ascii", "replace")  # a key may hold it
        raise InvalidRequest(f"invalid value for '{where}': text holds a lone UTF-16 surrogate "
                             "(a \\uD800-\\uDFFF escape without its pair); send valid Unicode",
                             None if where == "body" else where, code="invalid_unicode")


class JsonGuardMiddleware(HttpMiddleware):
    """Reads a JSON request body (POST, PUT, PATCH), checks it with `check_json_body`, and hands
    it on; inside the body limit, so the bytes it holds are bounded by `limits.max_body_bytes`."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("POST", "PUT", "PATCH") or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        try:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    await self.app(scope, _replay([message], receive), send)  # the client left
                    return
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
        except BodyTooLarge as e:
            await self._refuse(PayloadTooLarge(str(e.detail)), scope, receive, send)
            return
        body = b"".join(chunks)
        try:
            check_json_body(body, getattr(self.http, "max_json_depth", DEFAULT_MAX_JSON_DEPTH))
        except InvalidRequest as e:
            await self._refuse(e, scope, receive, send)
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    @staticmethod
    async def _refuse(e, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["error_type"] = e.type
        await error_response(e)(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    for k, v in scope["headers"]:
        if k == b"content-type":
            media = v.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
