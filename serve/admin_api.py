"""The admin API over HTTP: keys, teams, users' budgets, roles and limits (no postponed
annotations: FastAPI reads the route signatures).

    GET    /v1/admin/keys                 keys:read      every key (never a secret)
    POST   /v1/admin/keys                 keys:manage    a new key, shown once (201)
    GET    /v1/admin/keys/{id}            keys:read
    PATCH  /v1/admin/keys/{id}            keys:manage    role, scopes, expiry, user, team, name;
                                                         budgets:manage for its budget, limits:manage for its limits
    DELETE /v1/admin/keys/{id}            keys:manage    revoke
    GET    /v1/admin/teams                teams:read
    PUT    /v1/admin/teams/{name}         teams:manage   budget and limit overrides
    DELETE /v1/admin/teams/{name}         teams:manage
    GET    /v1/admin/users                budgets:manage
    PUT    /v1/admin/users/{id}/budget    budgets:manage
    GET    /v1/admin/roles                roles:read     built-in and configured roles and what they grant
    POST   /v1/admin/privacy/erase        privacy:erase  erase a data subject everywhere (agents/privacy.py)

Every write is audited (`admin.<what>.<verb>`: who, the target, the outcome, the request id and
what changed, never a key's secret); a refused one with outcome `denied`, a failed one `error`.

The routes are an `APIRouter` the gateway includes: they reach the key store through the
Authenticator the HTTP layer configured. Nobody hands out more than they hold: a key's role may
grant only what the caller's role grants.
"""

import time
from contextlib import contextmanager
from typing import Any, Iterator, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from models.errors import InvalidRequest, NotFound, PermissionDenied
from rag.threads import ThreadsErased
from security.auth import Principal
from security.rbac import PERMISSIONS
from serve.http import http_state, permitted, unwrap
from serve.http.auth import audit_request

# Every admin route takes a bearer key (named here: the layer's OpenAPI pass sees only the app's
# own routes, not an included router's).
SECURED = {"security": [{"bearer": []}]}
admin_router = APIRouter(prefix="/v1/admin", tags=["admin"])


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    concurrent: int | None = Field(None, ge=1)


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = "user"
    name: str = Field("", max_length=200)
    models: list[str] | None = Field(None, description="Catalog ids (or globs) it may use; null: all.")
    collections: list[str] | None = Field(None, description="Collections (or globs); null: all.")
    endpoints: list[str] | None = Field(None, description="Request paths (or globs, /v1/chat/*); null: all.")
    expires_in_s: float | None = Field(None, gt=0, description="Seconds until the key stops working.")
    team: str = Field("", max_length=64)
    user: str = Field("", max_length=256)
    budget_usd: float | None = Field(None, ge=0)
    budget_period: Literal["day", "month"] = "month"
    limits: Limits | None = None


class KeyPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str | None = None
    name: str | None = Field(None, max_length=200)
    models: list[str] | None = None
    collections: list[str] | None = None
    endpoints: list[str] | None = None
    expires_at: float | None = None
    team: str | None = Field(None, max_length=64)
    user: str | None = Field(None, max_length=256)
    budget_usd: float | None = Field(None, ge=0)
    budget_period: Literal["day", "month"] | None = None
    limits: Limits | None = None


class KeyInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    role: str
    name: str = ""
    models: list[str] | None = None
    collections: list[str] | None = None
    endpoints: list[str] | None = None
    expires_at: float | None = None
    team: str = ""
    user: str = ""
    budget_usd: float | None = None
    budget_period: str = "month"
    limits: dict[str, int | None] | None = None
    created_at: float
    revoked_at: float | None = None


class CreatedKey(KeyInfo):
    key: str = Field(description="The key itself: shown this once, only its hash is kept.")


class Team(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget_usd: float | None = Field(None, ge=0)
    budget_period: Literal["day", "month"] = "month"
    limits: Limits | None = None


class TeamInfo(Team):
    name: str


class UserBudget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget_usd: float | None = Field(None, ge=0)
    budget_period: Literal["day", "month"] = "month"


class UserInfo(UserBudget):
    id: str


class RoleInfo(BaseModel):
    name: str
    builtin: bool
    permissions: list[str]


class Listing(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]


def _auth(request: Request):
    return http_state(request.app).authenticator


async def _store_call(request: Request, method: str, *args, **kwargs) -> Any:
    """A key-store call; its KeyError is a 404 and its ValueError a 400 naming the problem."""
    try:
        return await getattr(_auth(request).store, method).remote(*args, **kwargs)
    except Exception as e:
        cause = unwrap(e)
        cause = getattr(e, "cause", cause)
        if isinstance(cause, KeyError):
            raise NotFound(str(cause.args[0]) if cause.args else "not found") from None
        if isinstance(cause, ValueError):
            raise InvalidRequest(str(cause)) from None
        raise


@contextmanager
def _audited(request: Request, caller: Principal, action: str, target: str,
             details: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Audit the admin write inside the block: `ok` with the details (the block may add to
    them), `denied` when a permission refused it, `error` with the reason otherwise."""
    note: dict[str, Any] = {"target": target, "details": dict(details or {})}
    try:
        yield note
    except PermissionDenied as e:
        audit_request(request, action, "denied", {**note["details"], "reason": str(e)[:300]}, caller.key_id,
                      note["target"])
        raise
    except Exception as e:
        audit_request(request, action, "error", {**note["details"], "reason": str(e)[:300] or type(e).__name__},
                      caller.key_id, note["target"])
        raise
    audit_request(request, action, "ok", note["details"], caller.key_id, note["target"])


def _check_role(request: Request, caller: Principal, role: str) -> None:
    table = _auth(request).roles
    if role not in table:
        raise InvalidRequest(f"unknown role {role!r}; roles are {', '.join(sorted(table))}", "role")
    beyond = sorted(table[role] - caller.grants)
    if beyond:
        raise PermissionDenied(f"role {role!r} grants {beyond[0]}, which your own role does not: you may not "
                               "hand it out", "role", "permission_denied")


def _check_models(request: Request, models: list[str] | None) -> None:
    settings = http_state(request.app).settings
    unknown = [m for m in models or [] if "*" not in m and settings.model(m) is None]
    if unknown:
        raise InvalidRequest(f"unknown model {unknown[0]!r}; GET /v1/models lists the models", "models")


def _limits(limits: Limits | None) -> dict[str, int | None] | None:
    return limits.model_dump() if limits is not None else None


def _require_spend_grants(caller: Principal, budget: bool, limits: bool) -> None:
    """Setting a budget needs budgets:manage and setting limits limits:manage, beside the route's own."""
    if budget:
        caller.require("budgets:manage", None, "budget_usd")
    if limits:
        caller.require("limits:manage", None, "limits")


async def _listing(request: Request, method: str) -> dict:
    return {"object": "list", "data": await _store_call(request, method)}


@admin_router.get("/keys", response_model=Listing, openapi_extra=SECURED)
async def list_keys(request: Request, _: Principal = Depends(permitted("keys:read"))) -> dict:
    return await _listing(request, "list")


@admin_router.post("/keys", response_model=CreatedKey, status_code=201, openapi_extra=SECURED)
async def create_key(body: NewKey, request: Request, caller: Principal = Depends(permitted("keys:manage"))) -> dict:
    with _audited(request, caller, "admin.key.create", "key:", body.model_dump(exclude_none=True)) as note:
        _check_role(request, caller, body.role)
        _check_models(request, body.models)
        _require_spend_grants(caller, body.budget_usd is not None, body.limits is not None)
        expires_at = time.time() + body.expires_in_s if body.expires_in_s else None
        record, key = await _store_call(
            request, "create", body.role, body.models, body.name, body.team, body.budget_usd, body.budget_period,
            collections=body.collections, endpoints=body.endpoints, expires_at=expires_at, user=body.user,
            limits=_limits(body.limits), roles=sorted(_auth(request).roles))
        note["target"] = f"key:{record['id']}"
    return {**record, "key": key}


@admin_router.get("/keys/{key_id}", response_model=KeyInfo, openapi_extra=SECURED)
async def get_key(key_id: str, request: Request, _: Principal = Depends(permitted("keys:read"))) -> dict:
    return await _store_call(request, "get", key_id)


@admin_router.patch("/keys/{key_id}", response_model=KeyInfo, openapi_extra=SECURED)
async def update_key(key_id: str, body: KeyPatch, request: Request,
                     caller: Principal = Depends(permitted("keys:manage"))) -> dict:
    with _audited(request, caller, "admin.key.update", f"key:{key_id}", body.model_dump(exclude_unset=True)):
        return await _update_key(key_id, body, request, caller)


async def _update_key(key_id: str, body: KeyPatch, request: Request, caller: Principal) -> dict:
    fields = body.model_dump(exclude_unset=True)
    if "role" in fields:
        _check_role(request, caller, fields["role"])
    if "models" in fields:
        _check_models(request, fields["models"])
    budget = {k: fields.pop(k) for k in ("budget_usd", "budget_period") if k in fields}
    _require_spend_grants(caller, bool(budget), "limits" in fields)
    record = None
    if fields:
        record = await _store_call(request, "update", key_id, roles=sorted(_auth(request).roles), **fields)
    if budget:
        current = record or await _store_call(request, "get", key_id)
        record = await _store_call(request, "set_budget", key_id, budget.get("budget_usd", current["budget_usd"]),
                                   budget.get("budget_period", current["budget_period"]))
    return record or await _store_call(request, "get", key_id)


@admin_router.delete("/keys/{key_id}", response_model=KeyInfo, openapi_extra=SECURED)
async def revoke_key(key_id: str, request: Request, caller: Principal = Depends(permitted("keys:manage"))) -> dict:
    with _audited(request, caller, "admin.key.revoke", f"key:{key_id}"):
        return await _store_call(request, "revoke", key_id)


@admin_router.get("/teams", response_model=Listing, openapi_extra=SECURED)
async def list_teams(request: Request, _: Principal = Depends(permitted("teams:read"))) -> dict:
    return await _listing(request, "list_teams")


@admin_router.put("/teams/{name}", response_model=TeamInfo, openapi_extra=SECURED)
async def put_team(name: str, body: Team, request: Request, caller: Principal = Depends(permitted("teams:manage"))
                   ) -> dict:
    with _audited(request, caller, "admin.team.set", f"team:{name}", body.model_dump(exclude_none=True)):
        _require_spend_grants(caller, body.budget_usd is not None, body.limits is not None)
        return await _store_call(request, "set_team", name, body.budget_usd, body.budget_period,
                                 _limits(body.limits))


@admin_router.delete("/teams/{name}", response_model=TeamInfo, openapi_extra=SECURED)
async def delete_team(name: str, request: Request, caller: Principal = Depends(permitted("teams:manage"))) -> dict:
    with _audited(request, caller, "admin.team.delete", f"team:{name}"):
        return await _store_call(request, "delete_team", name)


@admin_router.get("/users", response_model=Listing, openapi_extra=SECURED)
async def list_users(request: Request, _: Principal = Depends(permitted("budgets:manage"))) -> dict:
    return await _listing(request, "list_users")


@admin_router.put("/users/{user_id}/budget", response_model=UserInfo, openapi_extra=SECURED)
async def put_user_budget(user_id: str, body: UserBudget, request: Request,
                          caller: Principal = Depends(permitted("budgets:manage"))) -> dict:
    with _audited(request, caller, "admin.user.budget", f"user:{user_id}", body.model_dump()):
        return await _store_call(request, "set_user", user_id, body.budget_usd, body.budget_period)


@admin_router.get("/roles", response_model=Listing, openapi_extra=SECURED)
async def list_roles(request: Request, _: Principal = Depends(permitted("roles:read"))) -> dict:
    from security.rbac import BUILTIN_ROLES

    table = _auth(request).roles
    return {"object": "list", "data": [
        {"name": n, "builtin": n in BUILTIN_ROLES, "permissions": [p for p in PERMISSIONS if p in perms]}
        for n, perms in sorted(table.items())]}


class Erasure(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=128, description="The data subject's id: chunks tagged "
                         "subject:<id>, and the user id of keys and principals.")


class ErasureResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    subject: str
    keys: list[str] = Field(description="The subject's API keys (their ledger records were scrubbed).")
    documents: dict[str, int] = Field(description="Documents removed, per physical collection.")
    shredded_keys: list[str] = Field(description="The subject's data keys, destroyed.")
    ledger: dict[str, int] = Field(description="Ledger records scrubbed of the subject's details.")
    workflow_runs: list[str] = Field(description="Workflow runs removed.")
    threads: ThreadsErased | None = Field(None, description="Conversation threads (/v1/threads): theirs deleted, "
                                          "and the turns of others' threads that cited their documents.")
    keys_scrubbed: list[str] = Field(default_factory=list, description="The subject's API keys, revoked and "
                                     "stripped of the user and name they were given.")


@admin_router.post("/privacy/erase", response_model=ErasureResult, openapi_extra=SECURED)
async def erase_subject(body: Erasure, request: Request,
                        caller: Principal = Depends(permitted("privacy:erase"))) -> dict:
    """Erase a data subject (audited as `privacy.erase` by the erasure itself): actor calls to the
    key store, the vector store's owner, the key ring, the ledger and the coordinator, made from a
    thread so the replica's event loop keeps serving."""
    import asyncio

    from agents.privacy import erase_subject as erase
    from security.encryption import subject_scope
    from security.keyring import check_scope

    try:
        check_scope(subject_scope(body.subject))
    except ValueError as e:
        raise InvalidRequest(str(e), "subject") from None
    settings = http_state(request.app).settings
    return await asyncio.to_thread(erase, settings, body.subject, actor=caller.key_id,
                                   request_id=getattr(request.state, "request_id", "") or "",
                                   source=request.client.host if request.client else "")
