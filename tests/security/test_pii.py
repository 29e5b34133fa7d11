"""PII detection with Presidio's pattern recognizers, offline: validation (Luhn, IBAN checksum,
SSN and IP rules), redaction with placeholders and their restoration, audit details, and the
labelled sample's precision and recall (benchmarks/pii_quality.py prints the full table)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from security.pii import PiiConfigError, PiiDetector

SAMPLE = Path(__file__).parent / "data" / "pii_sample.json"


@pytest.fixture(scope="module")
def detector(request):
    # Nothing may be fetched at run time: any connection attempt while the analyzer is built and
    # used fails the test (tldextract, which Presidio's email check uses, fetches by default).
    import security.pii as pii

    mp = pytest.MonkeyPatch()
    pii._TLD = None

    def no_network(*a, **k):
        raise AssertionError(f"network access during PII detection: {a!r}")

    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "create_connection", no_network)
    d = PiiDetector()
    d.analyze("warm-up jane@example.com")
    yield d
    mp.undo()


def test_validation_separates_real_values_from_lookalikes(detector):
    found = {(f.entity, f.text) for f in detector.analyze(
        "card 4111 1111 1111 1111 and 4111 1111 1111 1112; IBAN DE89370400440532013000 and DE89370400440532013001; "
        "ip 10.0.0.254 and 999.1.1.1; mail ops@example.org")}
    assert found == {("CREDIT_CARD", "4111 1111 1111 1111"), ("IBAN_CODE", "DE89370400440532013000"),
                     ("IP_ADDRESS", "10.0.0.254"), ("EMAIL_ADDRESS", "ops@example.org")}


def test_redact_and_restore(detector):
    text = "Mail jane@example.com, then jane@example.com again, or call +1 415-692-5513."
    red, mapping = detector.redact(text)
    assert red == "Mail <EMAIL_ADDRESS_1>, then <EMAIL_ADDRESS_1> again, or call <PHONE_NUMBER_1>."
    assert detector.restore("I wrote to <EMAIL_ADDRESS_1>.", mapping) == "I wrote to jane@example.com."
    assert detector.restore("<CREDIT_CARD_9> stays", mapping) == "<CREDIT_CARD_9> stays"  # unknown: untouched
    assert detector.redact_value({"a": ["x 10.1.2.3"], "n": 5}) == {"a": ["x <IP_ADDRESS_1>"], "n": 5}
    assert detector.tags(text) == ["pii:EMAIL_ADDRESS", "pii:PHONE_NUMBER"]


def test_configuration_errors_are_named():
    with pytest.raises(PiiConfigError, match="PERSON, which needs pii.spacy_model"):
        PiiDetector(["EMAIL_ADDRESS", "PERSON"])
    with pytest.raises(PiiConfigError, match="unknown entity"):
        PiiDetector(["PASSPORT_OF_MARS"])
    with pytest.raises(PiiConfigError, match="not installed"):
        PiiDetector(["EMAIL_ADDRESS"], spacy_model="en_core_web_nonexistent")


def test_audit_details_never_carry_raw_pii(detector, tmp_path):
    from security.audit import AuditLog, read_entries

    log = AuditLog(tmp_path, redactor=detector.redact_value)
    log.record([{"action": "data.export", "details": {"to": "jane@example.com", "rows": 3}}])
    assert "jane@example.com" not in (tmp_path / "audit.jsonl").read_text()
    [e] = list(read_entries(tmp_path))
    assert e["details"] == {"to": "<EMAIL_ADDRESS_1>", "rows": 3}


def test_precision_and_recall_on_the_labelled_sample(detector):
    from benchmarks.pii_quality import score

    q = score(detector, json.loads(SAMPLE.read_text()))
    assert q["ALL"]["recall"] >= 0.95 and q["ALL"]["precision"] >= 0.9, q
    for e in ("EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "PHONE_NUMBER"):
        assert q[e]["precision"] == 1.0 and q[e]["recall"] == 1.0, (e, q[e])


def test_ingest_policy_tags_or_redacts_a_chunk(detector):
    from rag.ingest import apply_pii_policy, indexing_params
    from config import Settings

    row = {"text": "Write to jane@example.com or pay DE89370400440532013000.", "tags": ["faq"]}
    tagged = apply_pii_policy(dict(row), "tag", detector)
    assert tagged["tags"] == ["faq", "pii:EMAIL_ADDRESS", "pii:IBAN_CODE"] and tagged["text"] == row["text"]
    red = apply_pii_policy(dict(row), "redact", detector)
    assert red["text"] == "Write to <EMAIL_ADDRESS_1> or pay <IBAN_CODE_1>." and red["tags"] == ["faq"]
    # The policy is part of the index hash: switching it re-indexes; off leaves existing hashes alone.
    assert indexing_params(Settings()) == indexing_params(Settings(pii={"ingest": "off"}))
    assert indexing_params(Settings(pii={"ingest": "redact"})).endswith(";pii=redact")
