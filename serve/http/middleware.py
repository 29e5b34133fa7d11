"""The shape of the layer's pure ASGI middlewares (no `BaseHTTPMiddleware`: it costs latency
and buffers streams): HTTP requests go to `handle`, every other scope passes straight through."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from serve.http.app import HttpState


class HttpMiddleware(ABC):
    def __init__(self, app: ASGIApp, http: HttpState):
        self.app, self.http = app, http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    @abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One HTTP request: call `self.app` (or answer it without)."""
