"""The spans observability.tracing makes when tracing is on: OpenTelemetry spans (the API's
`Span`, the SDK's `ReadableSpan`, so the SDK's BatchSpanProcessor and exporters take them as
they are) that record plain fields on the request path and leave the SDK's per-attribute
checks to the export thread. Imported only when tracing is configured.

Why not the SDK's `Tracer.start_span`: on the request path it validates and copies every
attribute at every set (`BoundedAttributes`, about a third of a chat's span CPU in a profile),
builds the sampler's result objects for every span, takes a lock per span and per set, loops
over a multi-processor and copies the span into a new `ReadableSpan` at its end. Here:

- attributes go into a plain dict; `ValidatingExporter` runs the SDK's own `BoundedAttributes`
  over them (types, homogeneous sequences, count and length limits; a bad value is dropped with
  the SDK's warning) in the export thread, once, just before the batch is encoded;
- sampling is `ParentBased(root)`'s rule, read inline: a valid parent's sampled flag decides
  (and its trace state is kept); only a root span asks the root sampler (ALWAYS_ON or
  TraceIdRatioBased, the SDK's own objects);
- ids come from the provider's id generator; a span is its own readable copy and is handed to
  the one BatchSpanProcessor when it ends. No lock: a span is written by the one task that owns
  it (ORFEAS never shares one between threads).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

log = logging.getLogger(__name__)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)


class RecordedSpan(trace_api.Span, ReadableSpan):
    """One span: written on the request path as plain fields, read by the SDK's processor and
    exporter through `ReadableSpan`'s properties after it ends."""

    # The process's, set once by `Recorder` (ReadableSpan reads them as instance fields).
    _resource: Any = None
    _instrumentation_scope: Any = None
    _instrumentation_info: Any = None
    _processor: Any = None
    _limits: Any = None
    # Until the span has one (rare: an error's event, a status).
    _events: Sequence[Event] = ()
    _links: Sequence[trace_api.Link] = ()
    _status: Status = _UNSET

    def __init__(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
                 attributes: dict[str, Any]):
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._start_time = time_ns()
        self._end_time: int | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: Any) -> None:
        if self._end_time is None:
            self._attributes[key] = value
        else:
            log.warning("Setting attribute on ended span.")

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self._end_time is None:
            self._attributes.update(attributes)
        else:
            log.warning("Setting attribute on ended span.")

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None,
                  timestamp: int | None = None) -> None:
        if self._end_time is not None:
            return
        limits = self._limits
        if len(self._events) >= limits.max_events:
            return
        attributes = BoundedAttributes(limits.max_event_attributes, attributes,
                                       max_value_len=limits.max_attribute_length, immutable=True)
        self._events = [*self._events, Event(name, attributes, timestamp)]

    def record_exception(self, exception: BaseException, attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        """As the SDK's span records one: an `exception` event with OpenTelemetry's exception
        attributes."""
        module, qualname = type(exception).__module__, type(exception).__qualname__
        event = {"exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
                 "exception.message": str(exception),
                 "exception.stacktrace": "".join(traceback.format_exception(exception)),
                 "exception.escaped": str(escaped)}
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """The SDK's rule: OK is final, UNSET is never set."""
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            log.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time or time_ns()
        self._processor.on_end(self)


class Recorder:
    """What `Tracer.start_span` is for observability.tracing: a recorded span, or a
    non-recording one carrying the same ids when the sampler drops the trace."""

    def __init__(self, provider: Any, root_sampler: Any, processor: Any, scope_name: str):
        self._new_trace_id = provider.id_generator.generate_trace_id
        self._new_span_id = provider.id_generator.generate_span_id
        self._root = root_sampler
        RecordedSpan._resource = provider.resource
        RecordedSpan._instrumentation_scope = InstrumentationScope(scope_name)
        RecordedSpan._processor = processor
        RecordedSpan._limits = SpanLimits()

    def start_span(self, name: str, context: Any = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Mapping[str, Any] | None = None) -> trace_api.Span:
        parent: SpanContext | None = trace_api.get_current_span(context).get_span_context()
        if parent.is_valid:  # ParentBased: the parent decided (remote or local alike)
            trace_id, trace_state, sampled = parent.trace_id, parent.trace_state, parent.trace_flags.sampled
        else:
            parent, trace_id, trace_state = None, self._new_trace_id(), None
            sampled = self._root.should_sample(None, trace_id, name, kind, attributes).decision.is_sampled()
        ctx = SpanContext(trace_id, self._new_span_id(), False, _SAMPLED if sampled else _NOT_SAMPLED, trace_state)
        if not sampled:
            return NonRecordingSpan(ctx)
        return RecordedSpan(name, ctx, parent, kind, dict(attributes) if attributes else {})


class ValidatingExporter(SpanExporter):
    """The SDK's attribute checks (`BoundedAttributes`: allowed types, homogeneous sequences made
    tuples, the span limits' count and value length; what fails is dropped with the SDK's
    warning), run over each span in the export thread before `exporter` encodes it."""

    def __init__(self, exporter: SpanExporter):
        self.exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        limits = RecordedSpan._limits
        for s in spans:
            if type(s._attributes) is dict:
                s._attributes = BoundedAttributes(limits.max_span_attributes, s._attributes, immutable=True,
                                                  max_value_len=limits.max_span_attribute_length)
        return self.exporter.export(spans)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)
