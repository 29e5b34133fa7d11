"""Sign-in routes of the gateway: OIDC authorization code + PKCE for browsers, the session they
end in, who-am-I, sign-out, and TOTP enrolment for admin keys. The logic is in security/sso.py,
security/sessions.py and security/mfa.py; these routes move cookies and redirects.

    GET  /v1/auth/login?issuer=&next=   302 to the identity provider (sign-in state in a sealed cookie)
    GET  /v1/auth/callback?code=&state= the session cookie; 303 to `next`, or the principal as JSON
    GET  /v1/auth/whoami                the caller's principal (key, token or session)
    POST /v1/auth/logout                clears the session cookie
    POST /v1/auth/mfa/enrol             a TOTP secret and recovery codes for the calling admin key
    GET  /v1/auth/saml/login?next=      302 to the SAML IdP (HTTP-Redirect binding)
    POST /v1/auth/saml/acs              the IdP's signed response (HTTP-POST binding) -> the session
    GET  /v1/auth/saml/metadata         our SP metadata, for the IdP
"""

from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from fastapi.responses import JSONResponse, RedirectResponse, Response

from models.errors import AdminRequired, InvalidRequest
from security.auth import Principal
from security.mfa import OTP_HEADER, mfa_store
from security import saml
from security.oidc import identity_of
from security.sessions import LOGIN_STATE_COOKIE, LOGIN_STATE_TTL_S, SessionRejected, cookie_flags
from security.sso import Pending, SignInFailed, begin, finish, pick_issuer, safe_next
from serve.http import authenticated, http_state

router = APIRouter(prefix="/v1/auth", tags=["auth"])


def _over_tls(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


class PrincipalView(BaseModel):
    object: str = "principal"
    id: str
    user: str
    role: str
    team: str
    models: list[str] | None
    mfa: bool
    via: str


class SignedOut(BaseModel):
    object: str = "logout"
    signed_out: bool = True


class MfaEnrolment(BaseModel):
    object: str = "mfa_enrolment"
    key_id: str
    secret: str
    otpauth_uri: str
    recovery_codes: list[str]


def principal_view(p: Principal) -> dict[str, Any]:
    return {"object": "principal", "id": p.key_id, "user": p.user, "role": p.role, "team": p.team,
            "models": list(p.models) if p.models is not None else None, "mfa": p.mfa, "via": p.via}


# The browser-only steps (redirects, a form post) stay out of the OpenAPI schema.
@router.get("/login", include_in_schema=False)
async def login(request: Request, issuer: str | None = None, next: str | None = None) -> RedirectResponse:
    """Start a browser sign-in with the (first, or named) OIDC issuer that has a client_id."""
    state = http_state(request.app)
    chosen = pick_issuer(state.settings.auth.oidc, issuer)
    redirect_uri = str(request.url_for("auth_callback"))
    url, pending = await begin(chosen, redirect_uri, safe_next(next))
    resp = RedirectResponse(url, status_code=302)
    sealed = state.authenticator.sessions.seal(pending.to_dict())
    resp.set_cookie(LOGIN_STATE_COOKIE, sealed, max_age=LOGIN_STATE_TTL_S,
                    **{**cookie_flags(state.settings, _over_tls(request)), "path": "/v1/auth"})
    return resp


@router.get("/callback", name="auth_callback", include_in_schema=False)
async def callback(request: Request, code: str = "", state: str = "", error: str = "",
                   error_description: str = ""):
    """The identity provider's redirect back: verify, then open the session."""
    http = http_state(request.app)
    auth = http.authenticator
    if error:
        raise SignInFailed(f"the identity provider refused the sign-in: {error} {error_description}".strip())
    sealed = request.cookies.get(LOGIN_STATE_COOKIE)
    if not sealed:
        raise SignInFailed("no sign-in in progress (the sign-in cookie is missing): start at /v1/auth/login")
    try:
        pending = Pending(**auth.sessions.open(sealed, ttl_s=LOGIN_STATE_TTL_S))
    except (SessionRejected, TypeError):
        raise SignInFailed("the sign-in expired or was tampered with: start again at /v1/auth/login") from None
    issuer = pick_issuer(http.settings.auth.oidc, pending.issuer)
    verified, _ = await finish(auth.tokens, issuer, pending, code, state)
    ident = identity_of(verified)
    principal = Principal(ident.key_id, ident.role, ident.models, ident.team, user=ident.user, mfa=ident.mfa,
                          via="session")
    return await session_response(request, principal, pending.next)


async def session_response(request: Request, principal: Principal, next_path: str = ""):
    """The answer that opens a session for `principal` (as the IdP described it): the cookie, then
    a redirect or the principal as requests will see it (the directory's role and team applied)."""
    http = http_state(request.app)
    value = http.authenticator.new_session(principal)
    if next_path:
        resp = RedirectResponse(next_path, status_code=303)
    else:
        resp = JSONResponse(principal_view(await http.authenticator.from_session(value)))
    resp.set_cookie(http.settings.auth.session.cookie, value, max_age=int(http.settings.auth.session.ttl_s),
                    **cookie_flags(http.settings, _over_tls(request)))
    resp.delete_cookie(LOGIN_STATE_COOKIE, path="/v1/auth")
    return resp


@router.get("/whoami", response_model=PrincipalView)
async def whoami(principal: Principal = Depends(authenticated)) -> dict:
    return principal_view(principal)


@router.post("/logout", response_model=SignedOut)
async def logout(request: Request) -> JSONResponse:
    http = http_state(request.app)
    resp = JSONResponse({"object": "logout", "signed_out": True})
    resp.delete_cookie(http.settings.auth.session.cookie, path="/",
                       **{k: v for k, v in cookie_flags(http.settings, _over_tls(request)).items() if k != "path"})
    return resp


@router.post("/mfa/enrol", response_model=MfaEnrolment)
async def mfa_enrol(request: Request, principal: Principal = Depends(authenticated)) -> dict:
    """Enrol a TOTP second factor for the calling admin API key (shown once). Re-enrolling needs
    the current factor (a code or a recovery code in the x-orfeas-otp header)."""
    if not principal.is_admin or principal.via != "key":
        raise AdminRequired("TOTP enrolment is for admin API keys (token and session users use their IdP's MFA)")
    store = mfa_store(http_state(request.app).settings)
    if await store.enrolled.remote(principal.key_id):
        await http_state(request.app).authenticator.check_mfa(principal, request.headers.get(OTP_HEADER))
    label = request.query_params.get("label", "")
    if len(label) > 64:
        raise InvalidRequest("label is at most 64 characters", "label")
    return {"object": "mfa_enrolment", **await store.enrol.remote(principal.key_id, label)}


SAML_STATE_COOKIE = "orfeas_saml"


def _saml_cookie_flags(request: Request) -> dict[str, Any]:
    # The IdP posts the response cross-site: over TLS the sign-in cookie must be SameSite=None
    # (with Secure) to come along; on plain-HTTP loopback the IdP is same-site anyway.
    if _over_tls(request):
        return {"httponly": True, "secure": True, "samesite": "none", "path": "/v1/auth/saml"}
    return {"httponly": True, "secure": False, "samesite": "lax", "path": "/v1/auth/saml"}


@router.get("/saml/login", include_in_schema=False)
async def saml_login(request: Request, next: str | None = None) -> RedirectResponse:
    """Start a SAML sign-in (auth.saml)."""
    http = http_state(request.app)
    url, request_id = saml.begin(http.settings)
    resp = RedirectResponse(url, status_code=302)
    sealed = http.authenticator.sessions.seal({"request_id": request_id, "next": safe_next(next)})
    resp.set_cookie(SAML_STATE_COOKIE, sealed, max_age=LOGIN_STATE_TTL_S, **_saml_cookie_flags(request))
    return resp


@router.post("/saml/acs", include_in_schema=False)
async def saml_acs(request: Request):
    """The assertion consumer service: verify the IdP's response, then open the session."""
    http = http_state(request.app)
    auth = http.authenticator
    sealed = request.cookies.get(SAML_STATE_COOKIE)
    if not sealed:
        raise SignInFailed("no SAML sign-in in progress (the sign-in cookie is missing): start at /v1/auth/saml/login")
    try:
        pending = auth.sessions.open(sealed, ttl_s=LOGIN_STATE_TTL_S)
    except SessionRejected:
        raise SignInFailed("the SAML sign-in expired or was tampered with: start again") from None
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
    ident = saml.finish(http.settings, form.get("SAMLResponse", ""), pending.get("request_id", ""))
    principal = Principal(ident.key_id, ident.role, ident.models, ident.team, user=ident.user, mfa=ident.mfa,
                          via="session")
    resp = await session_response(request, principal, pending.get("next", ""))
    resp.delete_cookie(SAML_STATE_COOKIE, path="/v1/auth/saml")
    return resp


@router.get("/saml/metadata", include_in_schema=False)
async def saml_metadata(request: Request) -> Response:
    return Response(saml.sp_metadata(http_state(request.app).settings), media_type="application/samlmetadata+xml")
