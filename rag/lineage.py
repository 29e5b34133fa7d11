"""Lineage of a RAG answer: answer -> the collection version and points it cited -> their
documents -> the ingest runs that wrote that collection.

The RAG app writes what an answer cited into its `data.query` audit entry (answer id, physical
collection version, point ids, document ids and sources), so the record is tamper-evident
with the rest of the chain and costs no store of its own. `answer_lineage` finds that entry,
reads the cited documents' current version (`doc_hash`) from the store, and lists the ingest
runs audited for the collection up to the answer (`data.ingest`). Reading needs the audit
details' key (the CLI on the cluster, or the auditor API).
"""

from __future__ import annotations

from typing import Any

from config import Settings


class LineageNotFound(LookupError):
    """No audited answer with this id."""


def cited(out: dict[str, Any]) -> dict[str, Any]:
    """What a RAG response (`RagQueryResponse` as a dict) cited, for its audit entry."""
    cites = out.get("citations") or []
    return {"answer_id": out.get("id", ""),
            "collection_version": out.get("diagnostics", {}).get("retrieval", {}).get("resolved_collection", ""),
            "points": sorted({cid for c in cites for cid in (c.get("position") or {}).get("chunk_ids", [])}),
            "documents": sorted({(c["doc_id"], c.get("source", "")) for c in cites})}


def answer_lineage(settings: Settings, answer_id: str, *, store=None) -> dict[str, Any]:
    from rag.store import open_store
    from security.audit import audit_dir, read_entries
    from security.encryption import field_cipher

    query, ingests = None, []
    for e in read_entries(audit_dir(settings), field_cipher(settings)):
        d = e.get("details") or {}
        if e["action"] in ("data.ingest", "data.ingest.run"):  # asked for over HTTP; a job's run
            ingests.append(e)
        elif e["action"] == "data.query" and isinstance(d, dict) and d.get("answer_id") == answer_id:
            query = e
            break
    if query is None:
        raise LineageNotFound(f"no audited RAG answer {answer_id!r} (answers are recorded in the audit chain "
                              "since lineage was added)")
    d = query["details"]
    version = d.get("collection_version", "")
    docs = [{"doc_id": doc, "source": src} for doc, src in d.get("documents", [])]
    store = store or open_store(settings)
    if version and store.collection_exists(version):
        hashes = {p["doc_id"]: p.get("doc_hash", "") for p in store.scroll_payloads(version, ["doc_id", "doc_hash"])}
        for doc in docs:
            doc["version"] = hashes.get(doc["doc_id"])  # None: removed since (re-ingest, retention, erasure)
    target = query["target"]
    return {"answer_id": answer_id, "ts": query["ts"], "actor": query["actor"], "request_id": query["request_id"],
            "collection": target.removeprefix("collection:"), "collection_version": version,
            "points": d.get("points", []), "documents": docs,
            "ingest_runs": [{"run_id": (i.get("details") or {}).get("run_id"), "ts": i["ts"], "actor": i["actor"],
                             "source": (i.get("details") or {}).get("source"),
                             "job_id": (i.get("details") or {}).get("job_id"),
                             "version_collection": (i.get("details") or {}).get("version_collection")}
                            for i in ingests if i["target"] == target]}
