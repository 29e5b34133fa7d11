"""observability.tracing without a cluster: off is the shared no-op; on (in a child process, since
the tracer is per process) spans nest, carriers cross "processes" and spans reach a real OTLP/HTTP
receiver."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import free_port
from observability import tracing
from otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parents[1]


def test_off_is_free_and_inert():
    if tracing.enabled():  # another test configured this process; nothing to check here
        return
    assert tracing.span("x") is tracing.NO_SPAN and tracing.start("x") is tracing.NO_SPAN
    assert tracing.current(tracing.NO_SPAN) is tracing.NO_SPAN and tracing.attached({"traceparent": "x"}) is tracing.NO_SPAN
    assert tracing.inject() is None and tracing.traceparent(tracing.NO_SPAN) is None
    with tracing.span("x") as s:
        s.set_attribute("k", 1)


@pytest.mark.parametrize("sidecar", [False, True], ids=["in-process", "sidecar"])
def test_spans_nest_and_carriers_join_one_trace(tmp_path, sidecar):
    receiver = OtlpReceiver(free_port()).start()
    try:
        script = textwrap.dedent(f"""
            import sys
            from config import TracingSettings
            from observability import tracing
            assert "opentelemetry.sdk.trace" not in sys.modules
            tracing.configure(TracingSettings(enabled=True, endpoint="{receiver.endpoint}", export_delay_ms=50,
                                                export_sidecar={sidecar}), "unit")
            parent = {{"traceparent": "00-{'a' * 32}-{'b' * 16}-01"}}
            with tracing.span("outer", {{"k": "v"}}, parent=parent, kind="server"):
                carrier = tracing.inject()
                s = tracing.start("stream")
                with tracing.current(s):
                    with tracing.span("inner"):
                        pass
                s.end()
            with tracing.attached(carrier):
                with tracing.span("remote"):
                    pass
            try:
                with tracing.span("fails"):
                    raise ValueError("boom")
            except ValueError:
                pass
            # Attributes are checked as the SDK checks them (in the export thread): here the span
            # limits' value length (OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT=4) cuts a long string.
            with tracing.span("checked", {{"n": 1, "tags": ["a", "b"], "long": "abcdefgh"}}, parent=parent) as c:
                c.set_attribute("late", 2.5)
            c.set_attribute("after_end", 1)  # ignored, as the SDK ignores it
            unsampled = {{"traceparent": "00-{'e' * 32}-{'f' * 16}-00"}}  # the client's sampler said no
            with tracing.span("unsampled", parent=unsampled) as u:
                assert not u.is_recording() and tracing.inject()["traceparent"].endswith("-00")
                with tracing.span("unsampled child") as uc:
                    assert not uc.is_recording()
            tracing.flush()
        """)
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "4"})
        assert r.returncode == 0, r.stderr
        spans = {s.name: s for s in receiver.wait_for("a" * 32, {"outer", "stream", "inner", "remote"}, 60)}
        assert spans["outer"].parent_id == "b" * 16 and spans["outer"].service == "orfeas-unit"
        assert spans["outer"].attributes == {"k": "v"} and spans["outer"].kind == 2
        assert spans["stream"].parent_id == spans["outer"].span_id
        assert spans["inner"].parent_id == spans["stream"].span_id
        assert spans["remote"].parent_id == spans["outer"].span_id  # through the carrier
        fails = [s for s in receiver.spans if s.name == "fails"]
        assert fails and fails[0].status_code == 2  # STATUS_CODE_ERROR
        assert fails[0].events == ["exception"]
        checked = receiver.wait_for("a" * 32, {"checked"}, 30)
        checked = next(s for s in checked if s.name == "checked")
        assert checked.attributes == {"n": 1, "tags": ["a", "b"], "long": "abcd", "late": 2.5}
        assert not receiver.trace("e" * 32)  # an unsampled trace is not recorded
    finally:
        receiver.stop()


def test_an_export_batch_larger_than_the_queue_is_refused():
    from pydantic import ValidationError

    from config import TracingSettings

    with pytest.raises(ValidationError, match=r"export_batch_size \(4096\) must not exceed tracing.export_queue_size"):
        TracingSettings(export_batch_size=4096)
    assert TracingSettings(export_batch_size=4096, export_queue_size=4096).export_batch_size == 4096


def test_sidecar_exports_what_it_was_handed_after_its_process_is_killed():
    """A workflow run's agent actors are killed (`ray.kill`) as soon as the run finishes, and Ray
    kills a dying worker's direct children: the spans already handed to the export sidecar must
    still arrive (the sidecar is a grandchild, so it outlives both)."""
    receiver = OtlpReceiver(free_port()).start()
    try:
        script = textwrap.dedent(f"""
            import os, signal
            from pathlib import Path
            from config import TracingSettings
            from observability import tracing
            tracing.configure(TracingSettings(enabled=True, endpoint="{receiver.endpoint}", export_sidecar=True), "unit")
            parent = {{"traceparent": "00-{'c' * 32}-{'d' * 16}-01"}}
            with tracing.span("last", parent=parent):
                pass
            tracing._provider.force_flush()  # the batch is in the sidecar's pipe, not yet sent
            me = str(os.getpid())
            for proc in Path("/proc").iterdir():  # as a Ray worker does on exit: its direct children
                try:
                    if proc.name.isdigit() and (proc / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                        os.kill(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert r.returncode == -9, r.stderr
        assert [s.name for s in receiver.wait_for("c" * 32, {"last"}, 20)] == ["last"]
    finally:
        receiver.stop()
