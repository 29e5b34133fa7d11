"""JWT/OIDC bearer tokens: verified with PyJWT against each trusted issuer's JWKS.

What a token must pass, in order (each failure is an `AuthenticationFailed` naming the reason):
size, shape (three non-empty base64url segments), a JSON header whose `alg` is one the issuer
allows (never `none`, never HS*: the key decides the algorithm family, so a public key can never
be used as an HMAC secret), no key-carrying headers (`jku`, `x5u`, `jwk`, `x5c` are refused, never
followed), no `crit`, a well-formed `kid`, a known issuer, a key of that issuer whose type fits
`alg`, the signature, then `iss`/`aud`/`exp` required and `nbf`/`iat` within the leeway.

Keys come from `JwksCache`: fetched on first use (discovery document or JWKS URL), trusted for
`auth.jwks_cache_s`; a token with an unknown `kid` triggers one refetch (single-flight: concurrent
callers share it; at most one per `auth.jwks_min_refetch_s`), and a failed fetch keeps serving the
keys already cached.

Verified tokens are cached (`VerifiedTokenCache`, by the SHA-256 of the raw token, LRU-bounded
by `auth.jwt_cache_entries`) until min(`exp`, `auth.key_cache_s`): a client that sends the same
token on every request pays one signature check per key-cache period. An entry serves only while
its issuer's keys are the ones it was verified with: any JWKS refetch, or the JWKS going stale,
sends the token through full verification again, so a key rotated out refuses it as it would
uncached. The issuers are fixed per verifier (a settings change builds a new one, empty).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import jwt
from jwt import PyJWK

from config import Settings
from config.settings import OidcIssuerSettings
from models.errors import AuthenticationFailed

log = logging.getLogger(__name__)

# Which algorithms a key type may sign with: the key, not the token, decides.
ALGORITHMS_BY_KEY = {
    "RSA": {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"},
    "EC": {"ES256", "ES384", "ES512"},
    "OKP": {"EdDSA"},
}
EC_CURVE_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
KEY_CARRYING_HEADERS = ("jku", "x5u", "jwk", "x5c")
KID_PATTERN = re.compile(r"^[A-Za-z0-9._~+=:-]{1,128}$")
SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")


class TokenRejected(AuthenticationFailed):
    code = "invalid_token"


def looks_like_jwt(credential: str) -> bool:
    """A JWS compact token has two dots; API keys have none, so any dotted credential that is not
    a session (`orfs.`) goes to the verifier, which names what is wrong with its shape."""
    return "." in credential and not credential.startswith("orfs.")


def _b64json(segment: str, what: str) -> dict:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise TokenRejected(f"token {what} is not base64url") from None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise TokenRejected(f"token {what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenRejected(f"token {what} is not a JSON object")
    return value


def claim(claims: dict, path: str) -> Any:
    """A claim by dotted path (`realm_access.roles`); None when absent."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def string_list(claims: dict, path: str) -> list[str]:
    """A claim holding strings: a list of them, or one string of space-separated values."""
    if not path:
        return []
    value = claim(claims, path)
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise TokenRejected(f"claim {path!r} must be a string or a list of strings")


@dataclass(frozen=True)
class SigningKey:
    jwk: PyJWK
    data: dict[str, Any]  # the JWK's members as published


def _fits(key: SigningKey, alg: str) -> bool:
    """Whether this key may verify a token signed with `alg` (key type, curve and the key's own alg)."""
    data = key.data
    if data.get("use") not in (None, "sig"):
        return False
    if data.get("alg") not in (None, alg):
        return False
    kty = data.get("kty")
    if alg not in ALGORITHMS_BY_KEY.get(kty, ()):
        return False
    if kty == "EC":
        return EC_CURVE_ALG.get(data.get("crv")) == alg
    if kty == "OKP":
        return data.get("crv") in ("Ed25519", "Ed448")
    return True


class JwksCache:
    """One issuer's signing keys, cached; see the module docstring for the refetch rules."""

    def __init__(self, issuer: OidcIssuerSettings, ttl_s: float, min_refetch_s: float, timeout_s: float = 5.0):
        self.issuer = issuer
        self.ttl_s, self.min_refetch_s, self.timeout_s = ttl_s, min_refetch_s, timeout_s
        self.keys: dict[str, SigningKey] = {}
        self.unnamed: list[SigningKey] = []  # keys without a kid
        self.fetched_at: float | None = None
        self.last_attempt = float("-inf")
        self.fetches = 0  # successful and failed, for the tests and metrics
        self.generation = 0  # bumped by every successful fetch: verified-token cache entries hold it
        self._inflight: asyncio.Future | None = None
        self._jwks_url = issuer.jwks_url

    def discovery_url(self) -> str:
        return self.issuer.discovery_url or self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"

    async def _fetch(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
            if not self._jwks_url:
                resp = await client.get(self.discovery_url())
                resp.raise_for_status()
                doc = resp.json()
                if doc.get("issuer") != self.issuer.issuer:
                    raise ValueError(f"discovery document names issuer {doc.get('issuer')!r}, "
                                     f"not {self.issuer.issuer!r}")
                if not isinstance(doc.get("jwks_uri"), str):
                    raise ValueError("discovery document has no jwks_uri")
                self._jwks_url = doc["jwks_uri"]
            resp = await client.get(self._jwks_url)
            resp.raise_for_status()
            body = resp.json()
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise ValueError("JWKS is not an object with a 'keys' list")
        keys: dict[str, SigningKey] = {}
        unnamed: list[SigningKey] = []
        for entry in body["keys"]:
            # Only asymmetric keys: an `oct` key in a JWKS is never used (no HS* ever).
            if not isinstance(entry, dict) or entry.get("kty") not in ALGORITHMS_BY_KEY:
                continue
            try:
                key = SigningKey(PyJWK(entry), entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
                log.warning("issuer %s: skipping an unreadable JWK: %s", self.issuer.issuer, e)
                continue
            kid = entry.get("kid")
            if isinstance(kid, str) and kid:
                keys[kid] = key
            else:
                unnamed.append(key)
        self.keys, self.unnamed, self.fetched_at = keys, unnamed, time.monotonic()
        self.generation += 1

    async def refresh(self) -> bool:
        """Fetch the keys (callers arriving meanwhile share this fetch); False when it failed."""
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        loop = asyncio.get_running_loop()
        self._inflight = fut = loop.create_future()
        self.last_attempt = time.monotonic()
        self.fetches += 1
        ok = True
        try:
            await self._fetch()
        except Exception as e:  # keep serving the cached keys
            ok = False
            log.warning("issuer %s: JWKS fetch failed (keeping %d cached keys): %s", self.issuer.issuer,
                        len(self.keys) + len(self.unnamed), e)
        finally:
            self._inflight = None
            fut.set_result(ok)
        return ok

    def stale(self) -> bool:
        return self.fetched_at is None or time.monotonic() - self.fetched_at >= self.ttl_s

    def _may_refetch(self) -> bool:
        return time.monotonic() - self.last_attempt >= self.min_refetch_s

    async def key_for(self, kid: str | None, alg: str) -> SigningKey:
        if self.stale() and (self.fetched_at is None or self._may_refetch()):
            await self.refresh()
        if self.fetched_at is None:
            raise TokenRejected(f"the signing keys of issuer {self.issuer.issuer!r} could not be fetched")
        key = self._find(kid, alg)
        if key is None and kid is not None and kid not in self.keys and self._may_refetch():
            await self.refresh()  # a rotation: look once more
            key = self._find(kid, alg)
        if key is None:
            if kid is not None and kid not in self.keys:
                raise TokenRejected(f"unknown signing key id (kid) for issuer {self.issuer.issuer!r}")
            raise TokenRejected(f"no key of issuer {self.issuer.issuer!r} may verify alg {alg!r}")
        return key

    def _find(self, kid: str | None, alg: str) -> SigningKey | None:
        if kid is not None:
            key = self.keys.get(kid)
            return key if key is not None and _fits(key, alg) else None
        candidates = [k for k in [*self.unnamed, *self.keys.values()] if _fits(k, alg)]
        return candidates[0] if len(candidates) == 1 else None


@dataclass(frozen=True)
class VerifiedToken:
    issuer: OidcIssuerSettings
    claims: dict[str, Any]


@dataclass(frozen=True)
class CachedToken:
    verified: VerifiedToken
    deadline: float  # epoch seconds: min(exp, when verified + ttl)
    generation: int  # the issuer's JWKS generation it was verified under


class VerifiedTokenCache:
    """Verified tokens by the SHA-256 of the raw token (the cache never holds a token), at most
    `max_entries` (least recently used go first); an entry lapses at its deadline. Whether the
    issuer's keys still back an entry is the verifier's check (`TokenVerifier._cached`)."""

    def __init__(self, max_entries: int, ttl_s: float):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._entries: OrderedDict[bytes, CachedToken] = OrderedDict()
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.ttl_s > 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, digest: bytes, now: float) -> CachedToken | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now >= entry.deadline:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry

    def put(self, digest: bytes, verified: VerifiedToken, generation: int, now: float) -> None:
        exp = verified.claims.get("exp")
        deadline = min(now + self.ttl_s, float(exp)) if isinstance(exp, (int, float)) else now + self.ttl_s
        if not self.enabled or deadline <= now:  # e.g. accepted within the leeway after exp: never cached
            return
        self._entries[digest] = CachedToken(verified, deadline, generation)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, digest: bytes) -> None:
        self._entries.pop(digest, None)


class TokenVerifier:
    """Verifies bearer JWTs against the configured issuers (`auth.oidc`)."""

    def __init__(self, settings: Settings):
        auth = settings.auth
        self.leeway = auth.jwt_leeway_s
        self.max_bytes = auth.max_token_bytes
        self.issuers = {i.issuer: i for i in auth.oidc}
        self.caches = {i.issuer: JwksCache(i, auth.jwks_cache_s, auth.jwks_min_refetch_s) for i in auth.oidc}
        self.verified = VerifiedTokenCache(auth.jwt_cache_entries, auth.key_cache_s)

    @property
    def configured(self) -> bool:
        return bool(self.issuers)

    def _cached(self, digest: bytes) -> VerifiedToken | None:
        """A cached verification that still holds: in time, its issuer still trusted, and the
        issuer's keys unchanged and fresh (else it is dropped and the token verified again)."""
        entry = self.verified.get(digest, time.time())
        if entry is None:
            return None
        issuer = entry.verified.issuer
        jwks = self.caches.get(issuer.issuer)
        if self.issuers.get(issuer.issuer) is not issuer or jwks is None or jwks.generation != entry.generation \
                or jwks.stale():
            self.verified.drop(digest)
            return None
        self.verified.hits += 1
        return entry.verified

    async def verify(self, token: str) -> VerifiedToken:
        if len(token) > self.max_bytes:
            raise TokenRejected(f"token of {len(token)} bytes is over the limit of {self.max_bytes}")
        if not self.verified.enabled:
            return await self._verify(token)
        digest = self.verified.digest(token)
        hit = self._cached(digest)
        if hit is not None:
            return hit
        verified = await self._verify(token)
        # No await since _verify found its key: this generation is the one that key came from.
        self.verified.put(digest, verified, self.caches[verified.issuer.issuer].generation, time.time())
        return verified

    async def _verify(self, token: str) -> VerifiedToken:
        """Full verification, every check in the module docstring's order."""
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenRejected(f"a JWT has 3 dot-separated segments, this one has {len(parts)}")
        if not all(SEGMENT.match(p) for p in parts):
            raise TokenRejected("token segments must be non-empty base64url (unsigned tokens are refused)")
        header = _b64json(parts[0], "header")
        unverified = _b64json(parts[1], "payload")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise TokenRejected("token header has no 'alg'")
        if alg.lower() == "none":
            raise TokenRejected("unsigned tokens (alg 'none') are refused")
        for name in KEY_CARRYING_HEADERS:
            if name in header:
                raise TokenRejected(f"token header {name!r} is refused: keys come only from the issuer's JWKS")
        if "crit" in header:
            raise TokenRejected(f"token header 'crit' names extensions this server does not support: "
                                f"{str(header['crit'])[:64]}")
        if "typ" in header and (not isinstance(header["typ"], str)
                                or header["typ"].lower() not in ("jwt", "at+jwt", "application/jwt")):
            raise TokenRejected("token header 'typ' is not a JWT type")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not KID_PATTERN.match(kid)):
            raise TokenRejected("token header 'kid' is malformed (at most 128 of A-Z a-z 0-9 . _ ~ + = : -)")
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise TokenRejected("token has no 'iss' claim (a string)")
        issuer = self.issuers.get(iss)
        if issuer is None:
            raise TokenRejected("token issuer is not trusted (not in auth.oidc)")
        if alg not in issuer.algorithms:
            raise TokenRejected(f"alg {alg!r} is not accepted for issuer {iss!r} (accepted: "
                                f"{', '.join(issuer.algorithms)})")
        key = await self.caches[iss].key_for(kid, alg)
        try:
            claims = jwt.decode(
                token, key.jwk.key, algorithms=[alg], audience=issuer.audience, issuer=iss, leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"], "verify_signature": True, "verify_exp": True,
                         "verify_nbf": True, "verify_iat": True, "verify_aud": True, "verify_iss": True,
                         "strict_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("token has expired (exp)") from None
        except jwt.ImmatureSignatureError as e:
            raise TokenRejected(f"token is not valid yet ({'iat' if 'iat' in str(e) else 'nbf'} is in the future)") \
                from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("token audience (aud) is not one this server accepts") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("token issuer (iss) is not trusted") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenRejected(f"token lacks the required claim {e.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("token signature does not verify") from None
        except jwt.InvalidTokenError as e:
            raise TokenRejected(f"token is invalid: {e}") from None
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise TokenRejected("claim 'sub' must be a string")
        for name in ("nbf", "iat"):
            if name in claims and (isinstance(claims[name], bool) or not isinstance(claims[name], (int, float))):
                raise TokenRejected(f"claim {name!r} must be a number")
        if isinstance(claims.get("exp"), bool):
            raise TokenRejected("claim 'exp' must be a number")
        return VerifiedToken(issuer, claims)


def issuer_label(issuer: OidcIssuerSettings) -> str:
    return issuer.name or (urlparse(issuer.issuer).netloc or issuer.issuer)[:48]


@dataclass(frozen=True)
class Identity:
    """Who a verified token (or SAML assertion) says the caller is, mapped onto ORFEAS terms."""

    key_id: str  # the principal id: `<issuer label>:<user>`
    user: str
    role: str
    team: str
    models: tuple[str, ...] | None
    mfa: bool
    expires_at: float | None


def pick_role(values: list[str], role_map: dict[str, str], priority: list[str], default: str) -> str:
    mapped = [role_map[v] for v in values if v in role_map] if role_map else list(values)
    for role in priority:
        if role in mapped:
            return role
    return mapped[0] if mapped else default


def identity_of(verified: VerifiedToken) -> Identity:
    """Map a verified token's claims: user (user_claim), role (role_claim through role_map), team,
    model scopes, and MFA evidence (amr/acr)."""
    issuer, claims = verified.issuer, verified.claims
    user = claim(claims, issuer.user_claim)
    if not isinstance(user, str) or not user:
        raise TokenRejected(f"token has no user claim {issuer.user_claim!r} (a non-empty string)")
    role = pick_role(string_list(claims, issuer.role_claim), issuer.role_map, issuer.role_priority,
                     issuer.default_role)
    if not role:
        raise TokenRejected("token's claims map to no ORFEAS role")
    team = claim(claims, issuer.team_claim) if issuer.team_claim else ""
    if isinstance(team, list):
        team = team[0] if team and isinstance(team[0], str) else None
    if team is not None and not isinstance(team, str):
        raise TokenRejected(f"claim {issuer.team_claim!r} must be a string")
    models = tuple(string_list(claims, issuer.models_claim)) if issuer.models_claim else None
    amr = string_list(claims, "amr")
    acr = claims.get("acr")
    mfa = bool(set(amr) & set(issuer.mfa_amr)) or (isinstance(acr, str) and acr in issuer.mfa_acr)
    return Identity(f"{issuer_label(issuer)}:{user}", user, role, team or "", models, mfa,
                    float(claims["exp"]) if "exp" in claims else None)
