"""Single sign-on: the OIDC authorization-code flow with PKCE (S256), for browsers (the gateway's
/v1/auth/login and /v1/auth/callback) and the CLI (`orfeas login`, a loopback redirect, RFC 8252).

`begin` makes the state, nonce and PKCE verifier and the authorization URL; `finish` checks the
state, trades the code (with the verifier) at the token endpoint, verifies the ID token with the
same `TokenVerifier` as bearer tokens (its `aud` is the client id, so `audience` must list it) and
checks the nonce. What the browser flow keeps between the two travels sealed in a cookie
(security/sessions.py), so any replica can finish what another began.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from config.settings import OidcIssuerSettings
from models.errors import AuthenticationFailed, InvalidRequest
from security.oidc import TokenVerifier, VerifiedToken


class SignInFailed(AuthenticationFailed):
    code = "sign_in_failed"


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def pick_issuer(issuers: list[OidcIssuerSettings], name: str | None) -> OidcIssuerSettings:
    usable = [i for i in issuers if i.client_id]
    if not usable:
        raise InvalidRequest("no OIDC issuer with a client_id is configured for sign-in (auth.oidc[].client_id)")
    if not name:
        return usable[0]
    for i in usable:
        if name in (i.name, i.issuer):
            return i
    raise InvalidRequest(f"no sign-in issuer named {name!r}", "issuer")


async def discover(issuer: OidcIssuerSettings, timeout_s: float = 5.0) -> dict[str, Any]:
    url = issuer.discovery_url or issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            resp = await client.get(url)
            resp.raise_for_status()
            doc = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise SignInFailed(f"could not read the identity provider's discovery document: {e}") from None
    if doc.get("issuer") != issuer.issuer or not doc.get("authorization_endpoint") or not doc.get("token_endpoint"):
        raise SignInFailed("the identity provider's discovery document does not match the configured issuer")
    return doc


@dataclass
class Pending:
    """What a sign-in keeps between the redirect out and the callback."""

    issuer: str
    state: str
    nonce: str
    verifier: str
    redirect_uri: str
    next: str = ""

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


async def begin(issuer: OidcIssuerSettings, redirect_uri: str, next_path: str = "") -> tuple[str, Pending]:
    """The authorization URL to send the user to, and what to keep for the callback."""
    doc = await discover(issuer)
    verifier, challenge = pkce_pair()
    pending = Pending(issuer.issuer, secrets.token_urlsafe(24), secrets.token_urlsafe(24), verifier, redirect_uri,
                      next_path)
    query = {"response_type": "code", "client_id": issuer.client_id, "redirect_uri": redirect_uri,
             "scope": " ".join(issuer.scopes), "state": pending.state, "nonce": pending.nonce,
             "code_challenge": challenge, "code_challenge_method": "S256"}
    sep = "&" if "?" in doc["authorization_endpoint"] else "?"
    return f"{doc['authorization_endpoint']}{sep}{urlencode(query)}", pending


async def exchange(issuer: OidcIssuerSettings, pending: Pending, code: str) -> dict[str, Any]:
    """The token endpoint's answer for `code` (raises SignInFailed with the provider's reason)."""
    doc = await discover(issuer)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": pending.redirect_uri,
            "client_id": issuer.client_id, "code_verifier": pending.verifier}
    secret = os.environ.get(issuer.client_secret_env, "") if issuer.client_secret_env else ""
    auth = (issuer.client_id, secret) if secret else None
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            resp = await client.post(doc["token_endpoint"], data=form, auth=auth)
    except httpx.HTTPError as e:
        raise SignInFailed(f"the identity provider's token endpoint did not answer: {e}") from None
    if resp.status_code != 200:
        raise SignInFailed(f"the identity provider refused the code ({resp.status_code}): {resp.text[:200]}")
    body = resp.json()
    if not isinstance(body.get("id_token"), str):
        raise SignInFailed("the identity provider's answer has no id_token")
    return body


async def finish(verifier: TokenVerifier, issuer: OidcIssuerSettings, pending: Pending, code: str,
                 state: str) -> tuple[VerifiedToken, dict[str, Any]]:
    """The verified ID token of a completed sign-in (and the token endpoint's whole answer)."""
    if not state or not secrets.compare_digest(state, pending.state):
        raise SignInFailed("sign-in state does not match: start again from /v1/auth/login")
    if not code:
        raise SignInFailed("the identity provider sent no code")
    body = await exchange(issuer, pending, code)
    verified = await verifier.verify(body["id_token"])
    if verified.claims.get("nonce") != pending.nonce:
        raise SignInFailed("the ID token's nonce does not match this sign-in")
    return verified, body


def safe_next(path: str | None) -> str:
    """A same-site relative path to return to after sign-in (no open redirects)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return ""
    return path
