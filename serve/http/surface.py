"""The API surface every app shows: the `x-orfeas-api-version` header on every response,
`Deprecation`/`Sunset` (RFC 9745 / RFC 8594) on routes marked deprecated, and who may read
`/docs` and `/openapi.json` (`auth.docs`: open, auth or off).

    deprecate(app, "/v1/old", sunset="2027-06-30", link="/v1/new")   # a route marker

Versioning policy (docs/api-versioning.md): `/v1` is stable; a route is deprecated at least
six months before its sunset date and keeps working until then.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime

from starlette.types import Message, Receive, Scope, Send

from serve.http.middleware import HttpMiddleware

API_VERSION = "v1"
VERSION_HEADER = (b"x-orfeas-api-version", API_VERSION.encode())
DOC_PATHS = ("/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")


@dataclass(frozen=True)
class Deprecation:
    since: str  # ISO date the route was deprecated
    sunset: str  # ISO date after which it may be gone
    link: str | None = None  # what to use instead

    def headers(self) -> list[tuple[bytes, bytes]]:
        since = int(datetime.fromisoformat(self.since).replace(tzinfo=timezone.utc).timestamp())
        sunset = format_datetime(datetime.fromisoformat(self.sunset).replace(tzinfo=timezone.utc), usegmt=True)
        out = [(b"deprecation", f"@{since}".encode()), (b"sunset", sunset.encode())]
        if self.link:
            out.append((b"link", f'<{self.link}>; rel="successor-version"'.encode()))
        return out


def deprecate(app, path: str, *, sunset: str, since: str | None = None, link: str | None = None) -> None:
    """Mark the route template `path` of an `http_app` deprecated (its responses carry the headers)."""
    since = since or datetime.now(timezone.utc).date().isoformat()
    datetime.fromisoformat(sunset)  # a bad date fails here, at import
    app.state.deprecated[path] = Deprecation(since, sunset, link)


class ApiSurfaceMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "").rstrip("/")
        local = path[len(root):] if root and path.startswith(root) else path
        if local in DOC_PATHS and not await self._docs_allowed(scope, receive, send):
            return

        async def send_(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), VERSION_HEADER]
                route = scope.get("route")
                template = getattr(route, "path_format", None) or getattr(route, "path", None)
                dep = self.http.deprecated.get(template) if isinstance(template, str) else None
                if dep is not None:
                    headers += dep.headers()
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_)

    async def _docs_allowed(self, scope: Scope, receive: Receive, send: Send) -> bool:
        from fastapi.responses import JSONResponse

        from models.errors import APIError, NotFound
        from serve.http.errors import error_response

        settings = self.http.settings
        mode = settings.auth.docs if settings is not None else "open"
        if mode == "open":
            return True
        try:
            if mode == "off":
                raise NotFound("the API documentation is switched off here (auth.docs: off)")
            auth = self.http.authenticator
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            await auth.authenticate(header)
            return True
        except APIError as e:
            response: JSONResponse = error_response(e)
            response.headers["x-orfeas-api-version"] = API_VERSION
            await response(scope, receive, send)
            return False

