"""Admission at the door: a request the app already knows it will refuse for capacity is
answered before the layer's body checks, FastAPI's routing and dependencies, body validation and
the handler run, and one it lets in is counted from here (issue 18: a refusal in < 50 ms, on
cores the model shares, also for a burst that arrives at once).

An app opts in at replica init with a `Shedder` (`app.state.configure(..., shed=Shedder(...))`):
the POST paths it covers and a plain function of (path, model, Authorization header) that returns
a refusal (an `APIError`), a ticket (anything with `release()`: the request counted against its
model; the route finds it with `admitted(request)`) or None. The function must be cheap and
certain: no await, no Ray call, and a refusal only where the full path would refuse too (the
gateway's asks the router whether the named model and its fallbacks have their whole queue in
flight or claimed, for a key verified lately). A ticket is released however the request ends
(answered, streamed to the end, failed, refused later, the client gone), so a count never leaks.

Only small bodies with a declared length are peeked at (`PEEK_BYTES`); the model name is read
from the top level of a JSON object after the same depth check the JSON guard makes. Anything
else, and every request not refused, goes on with its body replayed as it came.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from models.errors import APIError
from serve.http.errors import error_headers
from serve.http.json_guard import json_depth
from serve.http.middleware import HttpMiddleware

if TYPE_CHECKING:
    from serve.http.app import HttpState

PEEK_BYTES = 65_536  # larger bodies (long prompts) take the full path: their parse dwarfs the saving
TICKET = "admission"  # the scope-state key of a request's ticket


def _always() -> bool:
    return True


class Ticket(Protocol):
    def release(self) -> None: ...  # idempotent


@dataclass(frozen=True)
class Shedder:
    paths: frozenset[str]  # the POST paths (without the app's root path) whose requests it may refuse
    # (path, model, Authorization) -> a refusal, a ticket (counted until the response ends) or None
    admit: Callable[[str, str, str | None], APIError | Ticket | None]
    # Whether `admit` could refuse or count anything now (cheap, no body needed): when not, a
    # request goes on without its body being buffered and parsed twice.
    armed: Callable[[], bool] = _always


def admitted(request: Request) -> Ticket | None:
    """The ticket the door gave this request, if any (for the route to hand over)."""
    return getattr(request.state, TICKET, None)


def peek_model(body: bytes, max_depth: int) -> str | None:
    """The top-level `model` of a JSON object body, or None (not JSON, too deep, no string model)."""
    if json_depth(body, max_depth) > max_depth:
        return None
    try:
        value = json.loads(body)
    except ValueError:  # not JSON, not UTF-8: the full path's error says which
        return None
    model = value.get("model") if isinstance(value, dict) else None
    return model if isinstance(model, str) else None


class ShedMiddleware(HttpMiddleware):
    def __init__(self, app, http: HttpState):
        super().__init__(app, http)
        self._routes: dict[str, object] = {}  # path -> its route (the metrics' route label)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        shed: Shedder | None = self.http.shed
        path = scope.get("path", "")
        root = scope.get("root_path", "").rstrip("/")
        local = path[len(root):] if root and path.startswith(root) else path
        if shed is None or scope.get("method") != "POST" or local not in shed.paths or not shed.armed():
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if not length.isdigit() or int(length) > min(PEEK_BYTES, self.http.max_body_bytes):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []  # as they came, replayed to the app when not refused
        size, more = 0, True
        while more and size <= int(length):
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            messages.append(message)
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        model = peek_model(b"".join(m.get("body", b"") for m in messages), self.http.max_json_depth) \
            if not more else None
        auth = headers.get(b"authorization")
        verdict = shed.admit(local, model, auth.decode("latin-1") if auth else None) if model else None
        if isinstance(verdict, APIError):
            state = scope.setdefault("state", {})
            state["model"], state["error_type"] = model, verdict.type
            scope.setdefault("route", self._route(scope, local))
            response = JSONResponse(verdict.body(), status_code=verdict.status, headers=error_headers(verdict))
            await response(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        if verdict is None:
            await self.app(scope, replay, send)
            return
        scope.setdefault("state", {})[TICKET] = verdict
        try:
            await self.app(scope, replay, send)  # returns once the response is sent, a stream included
        finally:
            verdict.release()

    def _route(self, scope: Scope, local: str):
        """The app's route for this path, so a shed request is counted under its route template."""
        if local not in self._routes:
            app = scope.get("app")
            self._routes[local] = next(
                (r for r in getattr(getattr(app, "router", None), "routes", ())
                 if r.matches(scope)[0] is Match.FULL), None)
        return self._routes[local]
