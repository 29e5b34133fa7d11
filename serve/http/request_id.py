"""Request ids: taken from the client's `x-request-id` when it is sane (at most 128 characters
of letters, digits and `-_.:/+=@`), else made up; kept in a contextvar for the request's life
(handlers, streams and every log record made meanwhile: `record.request_id`) and echoed in the
response's `x-request-id`.

Behind Ray Serve, Serve's own proxy (or direct-ingress server) already passes the client's id
on, or a generated one, and echoes it: the layer then takes that id and adds no second header,
except when it had to replace an insane one (the response then carries both).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.types import Message, Receive, Scope, Send

from serve.http.middleware import HttpMiddleware

HEADER = b"x-request-id"
MAX_LENGTH = 128
_SANE = re.compile(rb"[A-Za-z0-9\-_.:/+=@]{1,%d}" % MAX_LENGTH)

_current: ContextVar[str | None] = ContextVar("orfeas_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled (None outside one)."""
    return _current.get()


def sane(value: bytes | None) -> str | None:
    return value.decode("ascii") if value is not None and _SANE.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware(HttpMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = next((v for k, v in scope["headers"] if k == HEADER), None)
        rid = sane(incoming)
        # Serve echoes the id it passed on: add ours only when Serve's is not the one we use.
        echo = rid is None or not self.http.behind_serve
        if rid is None:
            rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id
        token = _current.set(rid)
        header = (HEADER, rid.encode("ascii"))

        async def send_(message: Message) -> None:
            if echo and message["type"] == "http.response.start":
                message["headers"] = [*(h for h in message.get("headers", ()) if h[0].lower() != HEADER), header]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            _current.reset(token)


_installed = False


def install_log_record_factory() -> None:
    """Every log record made while a request is handled carries `request_id` (once per process).

    Records outside a request get none (so Serve's formatter, which prints the attribute when
    present, stays as it is); a handler whose format names `%(request_id)s` adds
    `RequestIdFilter`, which fills in "-"."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        rid = _current.get()
        if rid is not None:
            record.request_id = rid
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


class RequestIdFilter(logging.Filter):
    """For handlers that format `%(request_id)s`: "-" on records made outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _current.get() or "-"
        return True
