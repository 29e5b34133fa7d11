"""The audit chain: appends, signed checkpoints, and `verify` naming the first bad position for
each way of tampering (edit, delete, insert, reorder), a re-hashed chain and a cut tail."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from security.audit import AuditError, AuditLog, chain_hash, read_entries, to_syslog, verify_log
from security.crypto import FieldCipher
from security.keyproviders import LocalKeyProvider
from security.keyring import KeyRing


def write_log(d: Path, n: int = 10, every: int = 1000, cipher=None) -> AuditLog:
    log = AuditLog(d, checkpoint_every=every, cipher=cipher)
    for i in range(n):
        log.record([{"action": "data.query", "actor": f"key{i % 3}", "target": "collection:docs",
                     "source": "127.0.0.1", "request_id": f"req-{i}", "details": {"i": i}}])
    return log


def lines(d: Path) -> list[str]:
    return (d / "audit.jsonl").read_text().splitlines(keepends=True)


def put(d: Path, ls: list[str]) -> None:
    (d / "audit.jsonl").write_text("".join(ls))


def test_intact_log_verifies(tmp_path):
    log = write_log(tmp_path, 10, every=4)
    log.checkpoint()
    r = verify_log(tmp_path)
    assert r.ok and r.entries == 10 and r.checkpoints == 3 and r.unsigned_tail == 0, r
    assert r.head == log.head
    # A log reopened continues the chain.
    again = AuditLog(tmp_path)
    again.record([{"action": "admin.key.create", "actor": "admin"}])
    assert verify_log(tmp_path).ok and verify_log(tmp_path).entries == 11


@pytest.mark.parametrize("how", ["edit", "delete", "insert", "reorder"])
def test_tampering_names_the_first_bad_position(tmp_path, how):
    write_log(tmp_path, 10)
    ls = lines(tmp_path)
    if how == "edit":
        ls[4] = ls[4].replace('"outcome":"ok"', '"outcome":"denied"')
    elif how == "delete":
        del ls[4]
    elif how == "insert":
        ls.insert(4, ls[7])
    else:
        ls[4], ls[5] = ls[5], ls[4]
    put(tmp_path, ls)
    r = verify_log(tmp_path)
    assert not r.ok and r.first_bad == 5, r
    assert "position 5" in r.problem


def test_rehashed_chain_contradicts_the_signed_checkpoint(tmp_path):
    write_log(tmp_path, 10, every=5)
    ls = lines(tmp_path)
    # Edit entry 7 and recompute every hash from there: the chain is consistent again...
    entries = [json.loads(x)["entry"] for x in ls]
    entries[6]["actor"] = "someone-else"
    prev = json.loads(ls[5])["hash"]
    for i in range(6, 10):
        body = json.dumps(entries[i], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        prev = chain_hash(prev, body)
        ls[i] = f'{{"hash":"{prev}","entry":{body}}}\n'
    put(tmp_path, ls)
    r = verify_log(tmp_path)
    # ...but the checkpoint signed at 10 says otherwise.
    assert not r.ok and r.first_bad == 6 and "differ from signed checkpoint 2" in r.problem, r


def test_cut_tail_and_forged_checkpoint(tmp_path):
    write_log(tmp_path, 10, every=5)
    put(tmp_path, lines(tmp_path)[:8])
    r = verify_log(tmp_path)
    assert not r.ok and r.first_bad == 9 and "were deleted" in r.problem, r
    write_log(tmp_path / "b", 10, every=5)
    cps = (tmp_path / "b" / "checkpoints.jsonl").read_text().splitlines()
    cp = json.loads(cps[0])
    cp["hash"] = "0" * 64
    (tmp_path / "b" / "checkpoints.jsonl").write_text(json.dumps(cp) + "\n" + cps[1] + "\n")
    r = verify_log(tmp_path / "b")
    assert not r.ok and "checkpoint 1 is not validly signed" in r.problem


def test_torn_last_line_is_cut_on_open_and_missing_log_is_an_error(tmp_path):
    write_log(tmp_path, 3)
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write('{"hash":"abc')  # a crash mid-write: never acknowledged
    log = AuditLog(tmp_path)
    assert log.seq == 3
    log.record([{"action": "x"}])
    assert verify_log(tmp_path).ok
    with pytest.raises(AuditError, match="no audit log"):
        verify_log(tmp_path / "nowhere")


def test_details_are_encrypted_and_chain_verifies_without_keys(tmp_path):
    cipher = FieldCipher(KeyRing(tmp_path / "keys" / "dk.json", LocalKeyProvider(tmp_path / "keys" / "kek.json")))
    log = AuditLog(tmp_path / "audit", cipher=cipher)
    log.record([{"action": "data.ingest", "actor": "k1", "details": {"source": "/srv/marker-Zebra42.md"}}])
    raw = (tmp_path / "audit" / "audit.jsonl").read_text()
    assert "Zebra42" not in raw and "orfenc1:" in raw
    assert verify_log(tmp_path / "audit").ok
    [e] = list(read_entries(tmp_path / "audit", cipher))
    assert e["details"] == {"source": "/srv/marker-Zebra42.md"}
    line = to_syslog(e, "host1")
    assert line.startswith("<110>1 ") and 'action="data.ingest"' in line and "host1 orfeas - AUDIT" in line


def settled(settings) -> None:
    """Wait for entries sent to the audit actor: with Ray connected in this process (an earlier
    test file in the same worker), `audit_event` sends them without waiting."""
    import ray

    from security.audit import audit_actor

    if ray.is_initialized():
        ray.get(audit_actor(settings).head.remote())  # after every record this process sent it


def test_a_deploy_records_which_settings_changed_never_their_values(tmp_path):
    """security/config_changes.py (`orfeas up` calls it after each deploy)."""
    from config import Settings
    from security.audit import audit_dir
    from security.config_changes import DIGEST_FILE, record_deploy
    from security.encryption import field_cipher

    hook = "https://hooks.slack.example/services/T0/B0/Secret-Tern-731"
    first = Settings(data_dir=tmp_path / "data", pii={"audit": "off"})
    assert record_deploy(first, actor="cli:ops")["first"] is True
    assert record_deploy(first, actor="cli:ops") == {"changed": [], "added": [], "removed": []}  # nothing new
    changed = Settings(data_dir=tmp_path / "data", pii={"audit": "off"}, serve={"port": 8123},
                       alerts={"slack_webhooks": {"default": hook}})
    out = record_deploy(changed, actor="cli:ops")
    assert out["changed"] == ["serve.port"] and out["added"] == ["alerts.slack_webhooks.default"]
    settled(first)
    entries = [e for e in read_entries(audit_dir(first), field_cipher(first)) if e["action"].startswith("config.")]
    assert [e["action"] for e in entries] == ["config.deploy", "config.change"]
    assert entries[1]["details"]["changed"] == ["serve.port"] and entries[1]["actor"] == "cli:ops"
    on_disk = b"".join(p.read_bytes() for p in audit_dir(first).iterdir() if p.is_file())
    assert b"Secret-Tern-731" not in on_disk
    # The digest file holds salted digests, never a value. Not a substring check for "8123": four
    # hex digits in a row turn up among ~100 random digests about one run in twenty (CI saw it).
    digests = json.loads((audit_dir(first) / DIGEST_FILE).read_text())["digest"]
    assert digests and all(re.fullmatch(r"[0-9a-f]{32}", d) for d in digests.values())


def test_a_declarative_deploy_audits_its_config_change_in_the_gateway_builder(tmp_path):
    """A RayService's serveConfigV2 (what `orfeas k8s render` writes) has the gateway's builder
    record the change; the local deploy path's args do not (`orfeas up` records it itself)."""
    from config import Settings
    from security.audit import audit_dir
    from security.encryption import field_cipher
    from serve.applications import applications, serve_config
    from serve.gateway.app import build_app

    def gateway_args(settings):
        [app] = [a for a in serve_config(settings)["applications"] if a["name"] == "gateway"]
        return app["args"]

    base = {"data_dir": tmp_path / "data", "pii": {"audit": "off"}}
    build_app(gateway_args(Settings(**base)))
    build_app(gateway_args(Settings(**base, gateway={"request_timeout_s": 30})))
    build_app(gateway_args(Settings(**base, gateway={"request_timeout_s": 30})))  # a redeploy, no change
    settled(Settings(**base))
    entries = [e for e in read_entries(audit_dir(Settings(**base)), field_cipher(Settings(**base)))
               if e["action"].startswith("config.")]
    assert [e["action"] for e in entries] == ["config.deploy", "config.change"]
    assert entries[1]["details"]["changed"] == ["gateway.request_timeout_s"]
    assert entries[1]["actor"] == "serve:declarative-deploy" and entries[1]["source"] == "serveConfigV2"
    [local] = [a for a in applications(Settings(**base)) if a.name == "gateway"]
    assert "audit_deploy" not in local.args
