"""The auditor's read-only API over the audit chain (mounted on the gateway app):

    GET /v1/audit/entries?action=&actor=&outcome=&target=&request_id=&since=&until=&limit=&offset=
    GET /v1/audit/verify

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
