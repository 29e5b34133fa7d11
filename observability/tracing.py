"""OpenTelemetry tracing: one set-up per process, spans that cost nothing when tracing is off,
and the W3C carrier that joins one trace across Serve handle calls and actor calls.

    configure(settings.tracing, "gateway")            # at replica / actor / job start (once per process)
    with span("rag.retrieve", {"rag.top_k": 5}):      # the current span's child
        ...
    carrier = inject()                                # {"traceparent": ...} or None: pass it along
    with span("agent.task", parent=carrier): ...      # on the other side of the call

Ray passes no trace context on Serve handle or actor calls, so every hop takes the carrier as an
explicit argument (`trace=`). Off (the default), `configure` loads no SDK, `span` returns one
shared no-op object and `inject` returns None: the cost is a global read per call.

Spans that outlive a `with` block (a stream that ends when its consumer stops reading) are made
with `start` and ended by their owner; they never become the current span, so an async
generator closed from another task cannot detach the wrong context.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from config import TracingSettings

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"

_tracer: Any = None       # the span maker once configured (None: tracing is off in this process)
_provider: Any = None
_exporter: Any = None
_propagator: Any = None
_kinds: dict[str, Any] = {}  # "server" -> SpanKind.SERVER, ... (looked up once, not per span)
_current_span: Any = None    # opentelemetry.trace.get_current_span
_context_api: Any = None     # opentelemetry.context
_in_context: Any = None      # opentelemetry.trace.set_span_in_context


class NoSpan:
    """What `span` and `start` give when tracing is off: every method does nothing."""

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def record_exception(self, exception: BaseException) -> None:
        pass

    def set_status(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update_name(self, name: str) -> None:
        pass

    def end(self) -> None:
        pass

    def is_recording(self) -> bool:
        return False


NO_SPAN = NoSpan()


def enabled() -> bool:
    return _tracer is not None


def configure(settings: TracingSettings, component: str) -> bool:
    """Install the SDK tracer for this process when `settings.enabled` (the first call wins; later
    calls, from other replicas in the same worker, keep it). Returns whether tracing is on."""
    global _tracer, _provider, _exporter, _propagator, _current_span, _context_api, _in_context
    if _tracer is not None or not settings.enabled:
        return _tracer is not None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
    from opentelemetry import context as context_api
    from opentelemetry.trace import SpanKind, get_current_span, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    resource = Resource.create({"service.name": f"{settings.service_name}-{component}",
                                "service.namespace": settings.service_name})
    # At 1.0 every new trace is kept: ALWAYS_ON says so without the ratio sampler's work per span.
    root = ALWAYS_ON if settings.sample_ratio >= 1 else TraceIdRatioBased(settings.sample_ratio)
    provider = TracerProvider(resource=resource, sampler=ParentBased(root))
    from observability.recorded_span import Recorder, ValidatingExporter

    if settings.export_sidecar:  # the processor still batches here; a child process encodes and POSTs
        from observability.export_sidecar import SidecarSpanExporter

        exporter = SidecarSpanExporter(settings.endpoint, settings.export_timeout_s, resource, "orfeas")
        exporter.start_soon()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.endpoint, timeout=settings.export_timeout_s)
    # The attributes' checks run in the export thread (ValidatingExporter), not at each set.
    processor = BatchSpanProcessor(ValidatingExporter(exporter), max_queue_size=settings.export_queue_size,
                                   schedule_delay_millis=settings.export_delay_ms,
                                   max_export_batch_size=settings.export_batch_size)
    provider.add_span_processor(processor)  # the provider's flush and its shutdown at exit reach it
    _provider, _exporter, _propagator = provider, exporter, TraceContextTextMapPropagator()
    _kinds.update({k.name.lower(): k for k in SpanKind})
    _current_span, _context_api, _in_context = get_current_span, context_api, set_span_in_context
    # Spans are made by a Recorder (observability.recorded_span), not the SDK tracer's start_span:
    # the same spans and sampling, about a fifth of the request path's CPU (tracing_span_cost.py).
    _tracer = Recorder(provider, root, processor, "orfeas")
    log.info("tracing on: %s-%s exports to %s, sampling %g", settings.service_name, component, settings.endpoint,
             settings.sample_ratio)
    return True


def flush(timeout_s: float = 5.0, *, sent: bool = True) -> None:
    """Export what is batched now (a job about to exit, a test about to look). `sent=False`: only
    hand the batch to the exporter (with the sidecar: into its pipe, which outlives this process)
    without waiting for the sidecar's POST."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))
        if sent:
            _exporter.force_flush(int(timeout_s * 1000))  # the sidecar's POSTs too (OTLP's own: a no-op)


def _context(parent: Mapping[str, str] | None):
    return _propagator.extract(parent) if parent else None


def span(name: str, attributes: Mapping[str, Any] | None = None, *, parent: Mapping[str, str] | None = None,
         kind: str = "internal"):
    """A context manager: a span that is current inside the block, the child of `parent` (a
    carrier from another process) or else of the current span. Errors raised in the block are
    recorded on it."""
    if _tracer is None:
        return NO_SPAN
    return _Active(_tracer.start_span(name, context=_context(parent), kind=_kinds[kind], attributes=attributes))


def start(name: str, attributes: Mapping[str, Any] | None = None, *, parent: Mapping[str, str] | None = None,
          kind: str = "internal"):
    """A span its owner ends (`.end()`), not made current: for streams."""
    if _tracer is None:
        return NO_SPAN
    return _tracer.start_span(name, context=_context(parent), kind=_kinds[kind], attributes=attributes)


def current(s: Any):
    """A context manager making a span from `start` current inside the block (not ended on exit)."""
    if _tracer is None or s is NO_SPAN:
        return NO_SPAN
    return _Current(s)


class _Current:
    """`current`'s context manager: an attach and a detach, no more (the API's `use_span` is a
    generator with exception handling `start` spans do not want: their owner records errors)."""

    __slots__ = ("span", "token")

    def __init__(self, s: Any):
        self.span = s

    def __enter__(self) -> Any:
        self.token = _context_api.attach(_in_context(self.span))
        return self.span

    def __exit__(self, *exc: Any) -> bool:
        _context_api.detach(self.token)
        return False


class _Active(_Current):
    """`span`'s context manager: the span is current inside the block, an error raised in it is
    recorded on it, and it ends on exit, as the SDK's `start_as_current_span` does, without that
    one's two generator-based context managers per span (~6% of a chat's span CPU, in process)."""

    __slots__ = ()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        _context_api.detach(self.token)
        if isinstance(exc, Exception):  # not GeneratorExit or a cancellation: those are no errors
            fail(self.span, exc)
        self.span.end()
        return False


def fail(s: Any, e: BaseException) -> None:
    """Mark a span failed by `e` (for spans from `start`)."""
    if s is NO_SPAN or not s.is_recording():
        return
    from opentelemetry.trace import Status, StatusCode

    s.record_exception(e)
    s.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"[:200]))


def attached(parent: Mapping[str, str] | None):
    """A context manager making a carrier's context current inside the block, without a span of
    its own (the receiving end of a handle call whose own work makes the spans)."""
    if _tracer is None or not parent:
        return NO_SPAN
    return _attached(parent)


@contextmanager
def _attached(parent: Mapping[str, str]) -> Iterator[None]:
    from opentelemetry import context

    token = context.attach(_propagator.extract(parent))
    try:
        yield
    finally:
        context.detach(token)


def inject(s: Any = None) -> dict[str, str] | None:
    """The W3C carrier of span `s` (or of the current span) for the next hop; None when off or
    when there is no span."""
    header = traceparent(s)
    return {TRACEPARENT: header} if header else None


def traceparent(s: Any = None) -> str | None:
    """The `traceparent` header value of span `s` (or of the current span); None when off or when
    there is no span. Formatted here from the span's context, as W3C Trace Context writes it (the
    propagator's inject would build a context and a carrier per call to the same end)."""
    if _tracer is None:
        return None
    ctx = (_current_span() if s is None or s is NO_SPAN else s).get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
