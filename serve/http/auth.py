"""Authentication as FastAPI dependencies:

    async def route(self, principal: Principal = Depends(authenticated)): ...
    @app.get("/admin-only", dependencies=[Depends(admin)])

The dependency uses the `Authenticator` the replica configured on `app.state` (see
`HttpState.configure`), so it works in class-based `@serve.ingress` views. A 401 carries
`WWW-Authenticate: Bearer`. `http_app`'s OpenAPI names the bearer scheme on every route that
depends on these (added to the schema, not resolved per request: FastAPI's HTTPBearer
dependency would cost each request more than the rest of authentication).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from models.errors import AdminRequired, AuthenticationFailed, PermissionDenied
from security.auth import Principal
from security.mfa import OTP_HEADER
from serve.http.app import AUTH_DEPENDENCIES, http_state


async def authenticated(request: Request) -> Principal:
    """The caller's principal (a 401 when the key is missing, malformed, unknown or revoked)."""
    auth = http_state(request.app).authenticator
    if auth is None:
        raise RuntimeError("app.state.configure(settings) was not called at replica init: no Authenticator")
    try:
        # No Authorization header: the browser session cookie, if any (security/sessions.py).
        principal = await auth.authenticate(request.headers.get("authorization") or auth.session_bearer(request.cookies))
    except AuthenticationFailed as e:
        audit_request(request, "auth.failure", "denied", {"reason": str(e)})
        raise
    if principal.endpoints is not None:  # a key scoped to endpoints: this path must be one of them
        principal.require("endpoints:call", request.url.path)
    request.state.principal = principal
    return principal


def permitted(permission: str):
    """A dependency: the caller's principal, whose role must grant `permission` (else a 403
    naming it). Resource scopes (a model, a collection) are checked where the resource is known:
    `principal.require(permission, resource)`."""

    async def dependency(request, principal=Depends(authenticated)):
        try:
            principal.require(permission)
        except PermissionDenied as e:  # a refused permission is an authorisation failure: audited
            audit_request(request, "auth.denied", "denied", {"required": permission, "reason": str(e)},
                   actor=principal.key_id)
            raise
        return principal

    # Real objects, not this module's postponed strings: Serve pickles the app by value, and a
    # closure's pickled globals hold only the names its code uses.
    dependency.__annotations__ = {"request": Request, "principal": Principal, "return": Principal}
    dependency.__name__ = f"permitted_{permission.replace(':', '_')}"
    AUTH_DEPENDENCIES.add(dependency)
    return dependency


def audit_request(request: Request, action: str, outcome: str, details: dict, actor: str = "",
                  target: str = "") -> None:
    """An audit entry for this request (who, from where, which request), sent without waiting;
    the target is what it acted on (default: the method and path)."""
    from security.audit import audit_event

    settings = http_state(request.app).settings
    if settings is not None:
        audit_event(settings, action, details, actor=actor, target=target or f"{request.method} {request.url.path}",
                    outcome=outcome, source=request.client.host if request.client else "",
                    request_id=getattr(request.state, "request_id", "") or "")


async def admin(request: Request, principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """The caller's principal, which must be an admin's (else a 403 `admin_required`)."""
    if not principal.allows("admin:settings"):
        audit_request(request, "auth.denied", "denied", {"required": "admin"}, actor=principal.key_id)
        raise AdminRequired(f"only admin keys may call {request.method} {request.url.path}")
    # Admin permissions need MFA evidence (auth.mfa): amr/acr of a token, or a key's TOTP code.
    principal = await http_state(request.app).authenticator.check_mfa(principal, request.headers.get(OTP_HEADER))
    request.state.principal = principal
    return principal


Authenticated = Annotated[Principal, Depends(authenticated)]
Admin = Annotated[Principal, Depends(admin)]


AUTH_DEPENDENCIES.update({authenticated, admin})
