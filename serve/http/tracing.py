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
        attributes = {"http.request.method": method, "url.path": scope.get("path", ""), "orfeas.app": self.http.name,
                      "orfeas.request_id": state.get("request_id", "")}
        with tracing.span(f"{method} {scope.get('path', '')}", attributes, parent=parent, kind="server") as s:
            header = (_TRACEPARENT, (tracing.traceparent(s) or "").encode())

            async def send_(message: Message) -> None:
                if message["type"] == "http.response.start":
                    s.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        s.set_attribute("error.type", str(message["status"]))
                    if header[1]:
                        message["headers"] = [*(h for h in message.get("headers", ()) if h[0].lower() != _TRACEPARENT),
                                              header]
                await send(message)

            try:
                await self.app(scope, receive, send_)
            finally:
                route = route_label(scope)
                s.set_attribute("http.route", route)
                s.update_name(f"{method} {route}")
