"""ORFEAS's log records never carry raw PII: the record factory (and the handler filter) redact
the message, its arguments and the exception text with the Presidio detector; other libraries'
loggers are left alone; candidates are masked while the detector is still being built."""

from __future__ import annotations

import io
import logging
import threading

import pytest

from config import Settings
from security import log_redaction
from security.log_redaction import CANDIDATE, PiiLogFilter, Redactor, install_log_redaction, redactor_for


@pytest.fixture(scope="module")
def redactor():
    r = redactor_for(Settings())
    assert r.wait(300), "the PII detector did not build"
    return r


def _capture(name: str, redactor: Redactor) -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    handler.addFilter(PiiLogFilter(redactor))
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, out, handler


def test_messages_arguments_and_tracebacks_are_redacted(redactor):
    log, out, handler = _capture("rag.ingest.redaction_test", redactor)
    try:
        log.info("user %s paid with %s from %s", "bob@example.org", "4111 1111 1111 1111", "10.1.2.3")
        log.info("embedded 12 chunks in 35 ms")
        try:
            raise ValueError("cannot reach alice@example.com at +1 415 555 0134")
        except ValueError:
            log.exception("step failed")
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    for raw in ("bob@example.org", "4111 1111 1111 1111", "10.1.2.3", "alice@example.com", "555 0134"):
        assert raw not in text
    assert "<EMAIL_ADDRESS_1>" in text and "<CREDIT_CARD_1>" in text and "<IP_ADDRESS>" in text
    assert "embedded 12 chunks in 35 ms" in text  # nothing to redact: left as it was
    assert "ValueError: cannot reach <EMAIL_ADDRESS_1>" in text and "Traceback" in text


def test_other_libraries_loggers_are_left_alone(redactor):
    log, out, handler = _capture("urllib3.redaction_test", redactor)
    try:
        log.info("connected to %s", "10.1.2.3")
    finally:
        log.removeHandler(handler)
    assert "10.1.2.3" in out.getvalue()


def test_candidates_are_masked_until_the_detector_is_built():
    release = threading.Event()
    slow = Redactor(lambda: release.wait(60) and None)
    assert slow.redact("mail bob@example.org now") == "mail <PII> now"
    assert slow.redact("took 35 ms") == "took 35 ms"  # no candidate: no detector needed
    release.set()
    assert CANDIDATE.search("call +47 22 33 44 55") and not CANDIDATE.search("v1.2 in 35 ms, 200 OK")
    # Addresses are masked without the detector; a time of day is not an IPv6 address.
    assert slow.redact("from 10.1.2.3 and fe80::1 at 12:30:45") == "from <IP_ADDRESS> and <IP_ADDRESS> at 12:30:45"
    assert slow.redact("2001:db8:0:0:0:0:2:1 up") == "<IP_ADDRESS> up"


def test_install_wraps_the_record_factory_once(redactor, monkeypatch):
    previous = logging.getLogRecordFactory()
    monkeypatch.setattr(log_redaction, "redactor_for", lambda settings: redactor)
    monkeypatch.setattr(log_redaction, "_INSTALLED", None)
    try:
        assert install_log_redaction(Settings(pii={"logs": "off"})) is None
        assert install_log_redaction(Settings()) is redactor and install_log_redaction(Settings()) is redactor
        record = logging.getLogger("serve.gateway.test").makeRecord(
            "serve.gateway.test", logging.INFO, __file__, 1, "key owner %s", ("carol@example.net",), None)
        assert record.getMessage() == "key owner <EMAIL_ADDRESS_1>"
    finally:
        logging.setLogRecordFactory(previous)
