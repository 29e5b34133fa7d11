"""The server span of every request (observability.tracing): the client's W3C `traceparent` is
followed when it sends one, and the response carries the server span's own `traceparent` so a
client can find its trace. With tracing off the middleware only passes the request on."""

from __future__ import annotations

from starlette.types import Message, Receive, Scope, Send

from observability import tracing
from serve.http.metrics import route_label
from serve.http.middleware import HttpMiddleware

_TRACEPARENT = tracing.TRACEPARENT.encode()


class TracingMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not tracing.enabled():
            await self.app(scope, receive, send)
            return
        parent = next(({tracing.TRACEPARENT: v.decode("latin-1")} for k, v in scope["headers"] if k == _TRACEPARENT),
                      None)
        method = scope.get("method", "")
        state = scope.setdefault("state", {})
        # The app is the span's service (orfeas-<app>), not an attribute of its own.
        attributes = {"http.request.method": method, "url.path": scope.get("path", ""),
                      "orfeas.request_id": state.get("request_id", "")}
        with tracing.span(f"{method} {scope.get('path', '')}", attributes, parent=parent, kind="server") as s:
            header = (_TRACEPARENT, (tracing.traceparent(s) or "").encode())
            status = [0]

            async def send_(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                    if header[1]:
                        message["headers"] = [*(h for h in message.get("headers", ()) if h[0].lower() != _TRACEPARENT),
                                              header]
                await send(message)

            try:
                await self.app(scope, receive, send_)
            finally:
                route = route_label(scope)
                end = {"http.route": route}  # set once, at the end: one attribute update per span
                if status[0]:
                    end["http.response.status_code"] = status[0]
                    if status[0] >= 500:
                        end["error.type"] = str(status[0])
                s.set_attributes(end)
                s.update_name(f"{method} {route}")
