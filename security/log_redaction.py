"""Logs never carry raw PII: every record an ORFEAS logger makes (the rooms' module loggers:
`serve.*`, `rag.*`, `agents.*`, ...) has its message and its exception text redacted before any
handler sees it, with the same Presidio detector as audit details (security/pii.py).

Presidio costs tens of milliseconds a call, so a cheap regular expression first looks for
anything a pattern recognizer could match (an @, a run of seven or more digits allowing
separators, an IBAN-like token); IP addresses it masks itself; only a message holding a candidate
goes to Presidio, which then keeps its validations (Luhn, IBAN checksum, ...). The detector is built in a
background thread on the first candidate (seconds: a process that never logs one never pays);
until it is ready the candidates themselves are masked as `<PII>`: over-redacting briefly,
never leaking. With PERSON detection on (a spaCy model) every
message goes to Presidio, since a name has no cheap shape.

`install_log_redaction(settings)` wraps the process's log-record factory once (so it covers
every handler, Ray's and Serve's included); `PiiLogFilter` is the same as a `logging.Filter`
for a handler of one's own.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Callable

ROOMS = ("agents", "analytics", "cluster", "config", "edge", "jobs", "models", "observability", "rag",
         "scaling", "security", "serve")

# What Presidio's pattern recognizers could match, besides addresses.
CANDIDATE = re.compile(
    r"[^\s@]+@[^\s@]+\.[^\s@]+"                        # e-mail
    r"|\+?\(?\d(?:[\s().\-/]*\d){6,}"                    # phone, card, SSN: 7+ digits with separators
    r"|\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]){10,}"              # IBAN
)
# IP addresses are masked by this expression alone (Presidio's IP recognizer is a regular
# expression too): log lines name hosts all the time, and sending each to Presidio would build a
# detector (seconds of CPU, ~0.3 GB) in nearly every replica. IPv6 needs a hex letter or `::`, so
# that a time of day (12:30:45) is not one.
ADDRESS = re.compile(
    r"\b\d{1,3}(?:\.\d{1,3}){3}\b"
    r"|(?<![\w:])(?=[0-9A-Fa-f:]*(?:[A-Fa-f]|::))[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"
)
ADDRESS_MASK = "<IP_ADDRESS>"
MASK = "<PII>"


def is_orfeas_logger(name: str) -> bool:
    return name.split(".", 1)[0] in ROOMS


class Redactor:
    """Redacts log text: the cheap screen, then Presidio (built in the background on first use)."""

    def __init__(self, build: Callable[[], Any], every_message: bool = False):
        self._build = build
        self.every_message = every_message
        self.detector = None
        self._started = False
        self._lock = threading.Lock()
        self._ready = threading.Event()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._load, name="orfeas-pii-log-redactor", daemon=True).start()

    def _load(self) -> None:
        try:
            self.detector = self._build()
        except Exception:  # the screen keeps masking; say why once, on a logger this never touches
            logging.getLogger("orfeas_log_redaction").exception("PII detector for logs failed to build; "
                                                                "candidates stay masked")
        finally:
            self._ready.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        self.start()
        return self._ready.wait(timeout_s) and self.detector is not None

    def redact(self, text: str) -> str:
        if not text:
            return text
        text = ADDRESS.sub(ADDRESS_MASK, text)
        if not self.every_message and not CANDIDATE.search(text):
            return text
        self.start()
        if self.detector is None:
            return CANDIDATE.sub(MASK, text)
        return self.detector.redact(text)[0]

    def redact_record(self, record: logging.LogRecord) -> None:
        """Redact the record's message (args merged in) and exception text, in place."""
        if not is_orfeas_logger(record.name):
            return
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it for the handler to report
            return
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)


class PiiLogFilter(logging.Filter):
    """A handler filter doing the same (for handlers outside the record factory's reach)."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        self.redactor.redact_record(record)
        return True


def redactor_for(settings: Any) -> Redactor:
    from security.pii import detector

    return Redactor(lambda: detector(settings), every_message="PERSON" in settings.pii.entities)


_INSTALLED: Redactor | None = None


def install_log_redaction(settings: Any) -> Redactor | None:
    """Redact every ORFEAS log record made in this process from now on (once per process; a
    no-op when `pii.enabled` or `pii.logs` is off). Returns the process's redactor."""
    global _INSTALLED
    if _INSTALLED is not None or not settings.pii.enabled or settings.pii.logs == "off":
        return _INSTALLED
    redactor = _INSTALLED = redactor_for(settings)  # its detector is built on the first candidate
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redactor.redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    return redactor
