"""OTLP export from a child process: the request process's BatchSpanProcessor hands each batch to
`SidecarSpanExporter`, which ships the spans' plain fields (ints, strings, attribute dicts) over a
pipe to a child Python process; there the SDK's own OTLPSpanExporter rebuilds them as
`ReadableSpan`s, encodes them as OTLP protobuf and POSTs them.

Why: in a replica, encoding a span to protobuf and the POST cost ~5x more CPU than pickling its
fields, all of it holding the GIL the request path needs (docs/benchmarks.md, "Tracing
overhead"). The child exits when the pipe closes (its parent ended or shut the exporter down),
after exporting what it was given.

    python -m observability.export_sidecar   # started by SidecarSpanExporter, not by hand
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger(__name__)

_FRAME = struct.Struct("!I")  # each message: its pickled length, then the pickle


def _fields(s: Any) -> tuple:
    """What the child needs of one ReadableSpan, as plain values (cheap to pickle)."""
    c, p, st = s.context, s.parent, s.status
    return (s.name, c.trace_id, c.span_id, c.trace_flags, p.span_id if p else 0, bool(p and p.is_remote),
            s.kind.value, s.start_time, s.end_time, dict(s.attributes or {}),
            [(e.name, e.timestamp, dict(e.attributes or {})) for e in s.events],
            [(ln.context.trace_id, ln.context.span_id, ln.context.trace_flags, dict(ln.attributes or {}))
             for ln in s.links],
            st.status_code.value, st.description)


class SidecarSpanExporter(SpanExporter):
    """A SpanExporter whose batches are encoded and sent by a child process. `resource` and `scope` are the provider's (every span
    of a process shares them, so they cross once, at start)."""

    def __init__(self, endpoint: str, timeout_s: float, resource: Any, scope_name: str):
        self._config = {"endpoint": endpoint, "timeout_s": timeout_s, "scope": scope_name,
                        "resource": dict(resource.attributes), "schema_url": resource.schema_url}
        self._lock = threading.Lock()  # the export thread and a flush() caller share the pipe
        self._child: subprocess.Popen | None = None
        self._flushes = 0

    def _start(self) -> subprocess.Popen:
        if self._child is None or self._child.poll() is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            self._child = subprocess.Popen([sys.executable, "-m", "observability.export_sidecar"], env=env,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
            self._send(self._config)
        return self._child

    def _send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._child.stdin.write(_FRAME.pack(len(data)) + data)
        self._child.stdin.flush()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        batch = [_fields(s) for s in spans]
        with self._lock:
            try:
                self._start()
                self._send(batch)
            except (OSError, ValueError) as e:  # the child died: the next batch starts another
                log.warning("span export sidecar failed (%s); %d spans dropped", e, len(batch))
                self._child = None
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until the child has sent everything handed to it so far."""
        with self._lock:
            if self._child is None or self._child.poll() is not None:
                return True
            self._flushes += 1
            try:
                self._send(("flush", self._flushes))
                out = self._child.stdout
                while select.select([out], [], [], timeout_millis / 1000)[0]:
                    line = out.readline()
                    if not line:
                        return False
                    if int(line) == self._flushes:
                        return True
            except (OSError, ValueError):
                self._child = None
            return False

    def shutdown(self) -> None:
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                try:
                    self._child.stdin.close()  # the child exports what it has and exits
                    self._child.wait(timeout=self._config["timeout_s"] + 5)
                except (OSError, subprocess.TimeoutExpired):
                    self._child.kill()
            self._child = None


def _read(stream) -> Any:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    return pickle.loads(stream.read(_FRAME.unpack(head)[0]))


def main() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    stdin = sys.stdin.buffer
    config = _read(stdin)
    if config is None:
        return
    exporter = OTLPSpanExporter(endpoint=config["endpoint"], timeout=config["timeout_s"])
    resource = Resource(config["resource"], config["schema_url"])
    scope = InstrumentationScope(config["scope"])
    kinds = {k.value: k for k in SpanKind}
    codes = {c.value: c for c in StatusCode}

    def span(f: tuple) -> Any:
        (name, trace_id, span_id, flags, parent_id, parent_remote, kind, start, end, attributes, events, links,
         code, description) = f
        return ReadableSpan(
            name, SpanContext(trace_id, span_id, False, TraceFlags(flags)),
            SpanContext(trace_id, parent_id, parent_remote, TraceFlags(flags)) if parent_id else None,
            resource, attributes, [Event(n, a, t) for n, t, a in events],
            [Link(SpanContext(t, s, True, TraceFlags(fl)), a) for t, s, fl, a in links], kinds[kind],
            status=Status(codes[code], description), start_time=start, end_time=end, instrumentation_scope=scope)

    while (message := _read(stdin)) is not None:
        if isinstance(message, tuple):  # ("flush", n): all before it is exported
            sys.stdout.write(f"{message[1]}\n")
            sys.stdout.flush()
            continue
        try:
            exporter.export([span(f) for f in message])
        except Exception:  # noqa: BLE001 - a bad batch must not end the sidecar
            log.exception("span export failed")
    exporter.shutdown()


if __name__ == "__main__":
    main()
