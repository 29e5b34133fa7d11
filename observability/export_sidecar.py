"""OTLP export from a child process: the request process's BatchSpanProcessor hands each batch to
`SidecarSpanExporter`, which ships the spans' plain fields (ints, strings, attribute dicts) over a
pipe to a sidecar Python process; there the SDK's own OTLPSpanExporter rebuilds them as
`ReadableSpan`s, encodes them as OTLP protobuf and POSTs them.

Why: in a replica, encoding a span to protobuf and the POST cost ~5x more CPU than pickling its
fields, all of it holding the GIL the request path needs (docs/benchmarks.md, "Tracing
overhead"). The sidecar exits when the pipe closes (its parent ended or shut the exporter down),
after exporting what it was given.

The sidecar is a grandchild, not a child: the process started here forks it and exits at once.
Ray kills a worker's direct children when the worker exits (`RAY_kill_child_processes_on_worker_exit`,
on by default), and the agent actors a workflow run starts for itself are killed (`ray.kill`) as
soon as the run finishes: a child sidecar died with them, the run's last spans still in its pipe.
A grandchild outlives its parent just long enough to export what the pipe holds, then exits.

    python -m observability.export_sidecar --parent PID   # started by SidecarSpanExporter, not by hand
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
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
        self._child: _Sidecar | None = None
        self._flushes = 0

    def start_soon(self) -> None:
        """Start the sidecar now, in the background, instead of at the first export: a process
        that lives a short while (an agent actor a workflow run kills when it ends) hands its
        batches to a running sidecar, not to one still starting when the process is killed."""
        threading.Thread(target=self._start_quietly, name="span-export-sidecar-start", daemon=True).start()

    def _start_quietly(self) -> None:
        with self._lock:
            try:
                self._start()
            except (OSError, ValueError) as e:  # the first export tries again
                log.warning("span export sidecar did not start (%s)", e)
                self._close()

    def _start(self) -> _Sidecar:
        if self._child is None:
            self._child = _Sidecar.spawn(self._config["timeout_s"] + 5)
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
            except (OSError, ValueError) as e:  # the sidecar died (a broken pipe): the next batch starts another
                log.warning("span export sidecar failed (%s); %d spans dropped", e, len(batch))
                self._close()
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait until the sidecar has sent everything handed to it so far."""
        with self._lock:
            if self._child is None:
                return True
            self._flushes += 1
            try:
                self._send(("flush", self._flushes))
                out = self._child.stdout
                while select.select([out], [], [], timeout_millis / 1000)[0]:
                    line = out.readline()
                    if not line:  # it exited
                        self._close()
                        return False
                    if int(line) == self._flushes:
                        return True
            except (OSError, ValueError):
                self._close()
            return False

    def shutdown(self) -> None:
        with self._lock:
            if self._child is not None:
                try:
                    self._child.stdin.close()  # the sidecar exports what it has and exits
                except OSError:
                    pass
                self._child.wait_exit(self._config["timeout_s"] + 5)
            self._close()

    def _close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None


class _Sidecar:
    """The pipes to a running sidecar, and its pid. It is a grandchild of this process (its
    parent exited), so it is not waited for: its stdout ends when it exits."""

    def __init__(self, pid: int, stdin: Any, stdout: Any):
        self.pid, self.stdin, self.stdout = pid, stdin, stdout

    @classmethod
    def spawn(cls, timeout_s: float) -> _Sidecar:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        launcher = subprocess.Popen([sys.executable, "-m", "observability.export_sidecar", "--parent", str(os.getpid())],
                                    env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        try:
            launcher.wait(timeout=timeout_s)  # it forks the sidecar (which keeps the pipes) and exits
            ready = select.select([launcher.stdout], [], [], timeout_s)[0]
            line = launcher.stdout.readline() if ready else b""
        except subprocess.TimeoutExpired:
            launcher.kill()
            line = b""
        if not line.strip().isdigit():
            cls(0, launcher.stdin, launcher.stdout).close()
            raise OSError("the span export sidecar did not start")
        return cls(int(line), launcher.stdin, launcher.stdout)

    def wait_exit(self, timeout_s: float) -> None:
        """Until its stdout ends (it exported what it had and exited); killed after `timeout_s`."""
        try:
            while select.select([self.stdout], [], [], timeout_s)[0]:
                if not self.stdout.readline():
                    return
            os.kill(self.pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for f in (self.stdin, self.stdout):
            try:
                f.close()
            except OSError:
                pass


def _read(stream) -> Any:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    return pickle.loads(stream.read(_FRAME.unpack(head)[0]))


def _detach() -> None:
    """Fork: the parent (the process SidecarSpanExporter started) exits at once; the child, the
    sidecar, a grandchild of the traced process, says its pid on stdout and carries on."""
    if os.fork():
        os._exit(0)
    os.setsid()  # its own session: a signal to the traced process's group does not reach it
    sys.stdout.write(f"{os.getpid()}\n")
    sys.stdout.flush()


def main() -> None:
    _detach()
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
