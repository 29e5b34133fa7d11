"""The auditor's read-only API over the audit chain (mounted on the gateway app):

    GET /v1/audit/entries?action=&actor=&outcome=&target=&request_id=&since=&until=&limit=&offset=
    GET /v1/audit/verify
    GET /v1/audit/lineage/{answer_id}   a RAG answer's lineage (rag/lineage.py)

Only callers whose role grants `audit:read` may call it (security/rbac.py: admin, auditor, and
custom roles granted it). Every query of the log is itself audited (`audit.query`)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from models.errors import AdminRequired
from security.auth import Principal
from serve.http import authenticated
from serve.http.app import http_state

router = APIRouter()


class AuditEntry(BaseModel):
    seq: int
    ts: float
    action: str
    actor: str
    target: str
    outcome: str
    source: str
    request_id: str
    details: Any = Field(description="Decrypted details (PII redacted when pii.audit is on).")


class AuditEntries(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEntry]


class AuditVerification(BaseModel):
    ok: bool
    entries: int
    checkpoints: int
    unsigned_tail: int
    first_bad: int | None
    problem: str
    head: str
    notes: list[str]


async def auditor(request: Request, principal: Principal = Depends(authenticated)) -> Principal:
    if not principal.allows("audit:read"):  # RBAC: admin and auditor, and custom roles granted it
        raise AdminRequired(f"only admin or auditor keys may call {request.method} {request.url.path}")
    return principal


def _settings(request: Request):
    return http_state(request.app).settings


@router.get("/v1/audit/entries", response_model=AuditEntries)
async def audit_entries(request: Request, action: str | None = Query(None, description="An action or a prefix*"),
                        actor: str | None = None, outcome: Literal["ok", "denied", "error"] | None = None,
                        target: str | None = None, request_id: str | None = None, since: float | None = None,
                        until: float | None = None, limit: int = Query(100, ge=1, le=1000),
                        offset: int = Query(0, ge=0), principal: Principal = Depends(auditor)) -> dict:
    from security.audit import audit_actor, audit_event

    settings = _settings(request)
    filters = {k: v for k, v in {"action": action, "actor": actor, "outcome": outcome, "target": target,
                                 "request_id": request_id, "since": since, "until": until}.items() if v is not None}
    rows = await audit_actor(settings).query.remote(filters, limit, offset)
    audit_event(settings, "audit.query", {"filters": filters, "returned": len(rows)}, actor=principal.key_id,
                source=request.client.host if request.client else "",
                request_id=getattr(request.state, "request_id", "") or "")
    return {"object": "list", "data": rows}


@router.get("/v1/audit/verify", response_model=AuditVerification)
async def audit_verify(request: Request, principal: Principal = Depends(auditor)) -> dict:
    import asyncio

    from security.audit import audit_dir, verify_log

    return (await asyncio.to_thread(verify_log, audit_dir(_settings(request)))).to_dict()


class LineageDocument(BaseModel):
    doc_id: str
    source: str
    version: str | None = Field(None, description="Its current doc_hash in that collection version; null: "
                                "removed since (re-ingest, retention, erasure).")


class LineageIngest(BaseModel):
    run_id: str | None = Field(None, description="An ingest asked for over HTTP: its run id.")
    ts: float
    actor: str
    source: str | None = None
    job_id: str | None = Field(None, description="An ingest run: the Ray job that ran it.")
    version_collection: str | None = Field(None, description="An ingest run: the collection version it wrote.")


class Lineage(BaseModel):
    answer_id: str
    ts: float
    actor: str
    request_id: str
    collection: str
    collection_version: str = Field(description="The physical collection (NAME__vN) the answer was retrieved from.")
    points: list[str] = Field(description="The point (chunk) ids the answer cited.")
    documents: list[LineageDocument]
    ingest_runs: list[LineageIngest] = Field(description="Ingest runs audited for the collection before the answer.")


@router.get("/v1/audit/lineage/{answer_id}", response_model=Lineage)
async def audit_lineage(answer_id: str, request: Request, principal: Principal = Depends(auditor)) -> dict:
    """A RAG answer -> the collection version and points it cited -> documents -> ingest runs."""
    import asyncio

    from models.errors import NotFound
    from rag.lineage import LineageNotFound, answer_lineage

    try:
        return await asyncio.to_thread(answer_lineage, _settings(request), answer_id)
    except LineageNotFound as e:
        raise NotFound(str(e)) from None
