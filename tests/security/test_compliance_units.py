"""The compliance check without a cluster: controls per profile over real settings and a real data
directory (an audit chain, a key file), the privacy impact assessment from a real Qdrant Edge
collection behind the field cipher, the JSON and PDF report (read back with poppler's pdftotext),
the scheduled audit on a tampered audit file, and bad input."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import pytest

from config import ModelSpec, Settings
from security.audit import AuditLog, audit_dir, read_entries
from security.compliance import (ComplianceError, check_profile, evaluate, gather_facts, load_manifests,
                                 required_controls)


# The ingress's certificate as a deployment would set it (files are checked only at deploy).
TLS = {"tls": {"certfile": "/etc/orfeas/tls.crt", "keyfile": "/etc/orfeas/tls.key"}}


def settings_for(tmp_path, **over):
    base = {"data_dir": tmp_path / "data", "pii": {"ingest": "tag"}, "retention": {"collection_days": 30}}
    return Settings(**{**base, **over})


def audited(settings, n: int = 3) -> None:
    """A few entries, details unencrypted (no key service: these tests may share a process with
    a connected Ray session, and a settings subclass is not what its actors accept)."""
    log = AuditLog(audit_dir(settings))
    for i in range(n):
        log.record([{"action": "data.query", "actor": "k1", "target": "collection:docs", "details": {"i": i}}])


def control(report, cid):
    return next(c for c in report["controls"] if c["id"] == cid)


def test_profiles_require_different_controls_and_judge_the_same_facts_differently(tmp_path):
    settings = settings_for(tmp_path, serve=TLS)
    audited(settings)
    facts = gather_facts(settings)
    assert set(required_controls("hipaa")) - set(required_controls("gdpr")) == \
        {"encryption.in_transit.ray", "access.mfa_admins", "backups.durable_state"}
    assert "pii.policy" in required_controls("gdpr") and "pii.policy" not in required_controls("soc2")

    gdpr = evaluate(settings, "gdpr", None, facts)
    assert gdpr["result"] == "pass", [c for c in gdpr["controls"] if c["required"] and c["status"] != "pass"]
    assert control(gdpr, "encryption.in_transit.ingress")["evidence"][0]["text"] == "serve.tls: HTTPS with /etc/orfeas/tls.crt"
    soc2 = evaluate(settings, "soc2", None, facts)
    backups = control(soc2, "backups.durable_state")
    assert soc2["result"] == "fail" and backups["required"] and backups["status"] == "fail"
    assert "compliance.backup_dir is not set" in backups["evidence"][0]["text"]
    assert not control(gdpr, "backups.durable_state")["required"]  # advisory there, still reported
    assert control(soc2, "encryption.in_transit.ray")["status"] == "skipped"  # no manifests given

    # A fresh backup under compliance.backup_dir passes the control.
    (tmp_path / "backups").mkdir()
    (tmp_path / "backups" / "data-2026-12-01.tar").write_bytes(b"x")
    with_backup = settings_for(tmp_path, serve=TLS, compliance={"backup_dir": str(tmp_path / "backups")})
    assert control(evaluate(with_backup, "soc2", None, gather_facts(with_backup)),
                   "backups.durable_state")["status"] == "pass"


def test_missing_settings_fail_with_evidence(tmp_path):
    """No TLS certificate, pii ingest off, a remote provider without prompt redaction,
    too many admin keys without MFA, a custom role with admin permissions: each fails, saying so."""
    from security.keys import KeyStore

    settings = settings_for(
        tmp_path, pii={"ingest": "off"},
        models=[ModelSpec(id="hosted", task="chat", engine="openai", source="gpt-x", base_url="https://api.example.org/v1")],
        auth={"roles": {"ops": {"permissions": ["keys:manage", "models:use"]}}, "mfa": {"admin": "enrolled"}},
        compliance={"max_admin_keys": 1})
    audited(settings)
    keys = KeyStore(str(settings.resolved_data_dir() / "auth" / "keys.json"))
    for name in ("a", "b"):
        keys.create("admin", name=name)
    report = evaluate(settings, "hipaa", None, gather_facts(settings))
    texts = {c["id"]: " | ".join(e["text"] for e in c["evidence"] if e["ok"] is False) for c in report["controls"]}
    assert "serve.tls: not configured" in texts["encryption.in_transit.ingress"]
    assert "pii.ingest is 'off'" in texts["pii.policy"] and "hosted" in texts["pii.policy"]
    assert "0 of 2 active admin keys have a TOTP" in texts["access.mfa_admins"]
    assert "auth.mfa.admin is 'enrolled'" in texts["access.mfa_admins"]
    assert "ops: keys:manage" in texts["access.least_privilege"]
    assert "2 active admin API keys (compliance.max_admin_keys 1)" in texts["access.least_privilege"]
    assert report["result"] == "fail" and report["summary"]["fail"] >= 4


def test_privacy_impact_names_the_pii_each_collection_holds_and_its_readers(tmp_path):
    from rag.encrypted_store import EncryptedStore
    from rag.inventory import collection_inventory
    from rag.store import EdgeStore
    from security.encryption import field_cipher
    from security.keys import KeyStore
    from security.pii import detector

    settings = settings_for(tmp_path)
    store = EncryptedStore(EdgeStore(tmp_path / "edge"), field_cipher(settings))
    texts = {"people": ["Write to ada.lovelace@example.org about the engine.", "Call +1 415 555 0134 today."],
             "weather": ["It rains in Bergen most days of the year."]}
    try:
        for name, chunks in texts.items():
            store.create_collection(f"{name}__v1", 4)
            store.set_alias(name, f"{name}__v1")
            store.upsert(f"{name}__v1", [
                {"id": f"00000000-0000-0000-0000-00000000000{i}", "dense": [1.0, 0.0, 0.0, 0.0],
                 "sparse_indices": [1], "sparse_values": [1.0],
                 "payload": {"doc_id": f"{name}-{i}", "chunk_index": 0, "text": t, "tags": ["subject:s-1"] if i else []}}
                for i, t in enumerate(chunks)])
        inv = collection_inventory(store, detector(settings), sample=10)
    finally:
        store.inner.close()
    assert b"ada.lovelace" not in b"".join(p.read_bytes() for p in (tmp_path / "edge").rglob("*") if p.is_file())
    people = next(c for c in inv if c["collection"] == "people")
    assert people["pii"] == {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1} and people["live"] and people["subjects"] == 1
    assert next(c for c in inv if c["collection"] == "weather")["pii"] == {}

    keys = KeyStore(str(settings.resolved_data_dir() / "auth" / "keys.json"))
    everywhere, _ = keys.create("user", name="u")
    elsewhere, _ = keys.create("user", name="w", collections=["weather"])
    viewer, _ = keys.create("viewer", name="v", roles=["viewer"])
    audited(settings)
    pia = evaluate(settings, "gdpr", None, gather_facts(settings), inv)["privacy_impact"]
    row = next(s for s in pia["stores"] if s["store"].startswith("collection people"))
    assert row["pii_types"] == ["EMAIL_ADDRESS", "PHONE_NUMBER"] and row["encrypted_at_rest"]
    assert {"admin", "developer", "user"} <= set(row["readers"]["roles"]) and "viewer" not in row["readers"]["roles"]
    assert row["readers"]["keys"] == [everywhere["id"]]  # the weather-only key and the viewer cannot read it
    assert any(r.startswith("collection people holds EMAIL_ADDRESS, PHONE_NUMBER") for r in pia["risks"])
    audit_row = next(s for s in pia["stores"] if s["store"] == "audit log")
    assert audit_row["readers"]["roles"] == ["admin", "auditor"]


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="poppler-utils is not installed (make installs it)")
def test_report_is_written_as_json_and_a_pdf_that_names_every_control_and_result(tmp_path):
    from security.compliance_report import write_report

    settings = settings_for(tmp_path)
    audited(settings)
    report = evaluate(settings, "hipaa", None, gather_facts(settings))
    paths = write_report(report, tmp_path / "out")
    assert json.loads(open(paths["json"]).read())["controls"] == report["controls"]
    text = subprocess.run(["pdftotext", "-layout", paths["pdf"], "-"], capture_output=True, text=True,
                          check=True).stdout
    assert "ORFEAS compliance report: HIPAA" in text and "Result: FAIL" in text
    for c in report["controls"]:
        line = next(x for x in text.splitlines() if c["id"] in x)
        assert c["status"].upper() in line, (c["id"], line)
    assert "serve.tls: not configured" in text and "Privacy impact assessment" in text
    assert "audit log" in text and "usage ledger" in text


def test_a_tampered_audit_file_fails_the_scheduled_audit_with_a_log_line_and_an_audit_entry(tmp_path, caplog):
    from agents.compliance import scheduled_audit
    from security.encryption import AUDIT_SCOPE, field_cipher

    settings = settings_for(tmp_path, pii={"ingest": "tag", "audit": "off"})  # no PII analyzer for this log
    audited(settings, 5)
    path = audit_dir(settings) / "audit.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"actor":"k1"', '"actor":"k2"')
    path.write_text("".join(lines))
    with caplog.at_level(logging.ERROR, logger="agents.compliance"):
        out = scheduled_audit(settings, "gdpr", scan=False, out_dir=str(tmp_path / "reports"))
    assert out["result"] == "fail" and "audit.verify" in out["failed"]
    assert "fails at position 3" in out["audit_verify"]["evidence"]
    assert out["alert"] == {"sent": False, "url": None, "error": "alerts are off (alerts.enabled, compliance.alert_url)"}
    assert any("compliance check (gdpr) failed" in r.getMessage() and "position 3" in r.getMessage()
               for r in caplog.records)
    failed = [e for e in read_entries(audit_dir(settings)) if e["action"] == "compliance.audit_failed"]
    assert len(failed) == 1 and failed[0]["outcome"] == "error"
    details = field_cipher(settings).decrypt_json(failed[0]["details"], scope=AUDIT_SCOPE, record_id=str(failed[0]["seq"]),
                                                  field="details")
    assert details["failed"] == out["failed"] and "position 3" in details["audit_verify"]
    assert (tmp_path / "reports").is_dir() and len(list((tmp_path / "reports").glob("*.pdf"))) == 1


def test_bad_input_gets_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    with pytest.raises(ComplianceError, match="unknown compliance profile 'pci'; choose one of gdpr, hipaa, soc2"):
        check_profile("pci")
    with pytest.raises(ComplianceError, match="cannot read the manifests .*missing.yaml"):
        load_manifests(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(ComplianceError, match="are not YAML"):
        load_manifests(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ComplianceError, match="document 0 is not a Kubernetes object"):
        load_manifests(tmp_path / "list.yaml")
    config = tmp_path / "orfeas.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    r = CliRunner().invoke(app, ["compliance", "check", "--profile", "pci", "--config", str(config)])
    assert r.exit_code == 2 and "unknown compliance profile 'pci'" in r.output
    r = CliRunner().invoke(app, ["compliance", "check", "--profile", "soc2", "--config", str(config),
                                 "--manifests", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "cannot read the manifests" in r.output
    assert not (tmp_path / "data").exists()  # refused before anything was written
