"""Who is calling: bearer API keys checked against the cluster's key store, cached briefly; JWTs
from the trusted OIDC issuers (security/oidc.py) and browser sessions (security/sessions.py),
told apart by shape, map onto the same `Principal`."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cached_property

from security.keys import hash_key, keystore
from config import Settings
from models.errors import AuthenticationFailed, PermissionDenied
from security.mfa import OTP_HEADER, MfaRequired, mfa_store
from security.oidc import TokenRejected, TokenVerifier, identity_of, looks_like_jwt
from security.sessions import SessionCodec, looks_like_session


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: str
    models: tuple[str, ...] | None  # None: every model
    team: str = ""
    budget_usd: float | None = None
    budget_period: str = "month"
    user: str = ""  # the person behind a token or session ("" for API keys)
    mfa: bool = False  # multi-factor evidence came with this credential (amr/acr, a TOTP code)
    via: str = "key"  # "key", "jwt" or "session"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def check_model(self, model_id: str) -> None:
        if not self.may_use(model_id):
            raise PermissionDenied(f"this API key may not use model {model_id!r}", "model")


ANONYMOUS_ADMIN = Principal("anonymous", "admin", None)


class Authenticator:
    def __init__(self, settings: Settings):
        self.enabled = settings.auth.enabled
        self.ttl = settings.auth.key_cache_s
        self.data_dir = settings.resolved_data_dir()
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self.settings = settings
        self.tokens = TokenVerifier(settings)
        self.session_cookie = settings.auth.session.cookie
        self._directory: tuple[float, dict[str, dict]] | None = None

    @cached_property
    def sessions(self) -> SessionCodec:
        return SessionCodec(self.settings)

    @cached_property
    def directory(self):
        from security.directory import directory_store

        return directory_store(self.settings)

    @cached_property
    def mfa_store(self):
        return mfa_store(self.settings)

    def session_bearer(self, cookies) -> str | None:
        """`Bearer <session>` from the session cookie, for requests without an Authorization header."""
        value = cookies.get(self.session_cookie)
        return f"Bearer {value}" if value else None

    @cached_property
    def store(self):
        """The key store actor, got on first use (not at replica start)."""
        return keystore(self.data_dir)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if not authorization:
            raise AuthenticationFailed("missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed("malformed Authorization header: expected 'Bearer <key>'")
        if looks_like_session(key):
            return await self.from_session(key)
        if looks_like_jwt(key):
            return await self.from_token(key)
        digest = hash_key(key)  # the cache holds hashes, never keys
        hit = self._cache.get(digest)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            principal = hit[1]
        else:
            record = await self.store.verify.remote(key)
            principal = None if record is None else Principal(
                record["id"], record["role"], tuple(record["models"]) if record["models"] else None,
                record.get("team") or "", record.get("budget_usd"), record.get("budget_period") or "month",
            )
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (time.monotonic(), principal)
        if principal is None:
            raise AuthenticationFailed("invalid or revoked API key")
        return principal

    # ------------------------------------------------------------ tokens, sessions, MFA

    async def from_token(self, token: str) -> Principal:
        """The principal of a bearer JWT from a trusted issuer (401 with the reason otherwise)."""
        if not self.tokens.configured:
            raise TokenRejected("this looks like a JWT, but no OIDC issuer is configured (auth.oidc)")
        ident = identity_of(await self.tokens.verify(token))
        role, team = await self.directory_role(ident.user, ident.role, ident.team)
        return Principal(ident.key_id, role, ident.models, team, user=ident.user, mfa=ident.mfa, via="jwt")

    async def from_session(self, value: str) -> Principal:
        """The principal of a session: what the IdP said at sign-in, with the directory's role and
        team applied on every request (so a sync reaches open sessions too)."""
        data = self.sessions.open(value)
        models = data.get("models")
        user = data.get("user") or ""
        role, team = await self.directory_role(user, data["role"], data.get("team") or "")
        return Principal(data["key_id"], role, tuple(models) if models is not None else None, team, user=user,
                         mfa=bool(data.get("mfa")), via="session")

    def new_session(self, principal: Principal) -> str:
        """A sealed session value for `principal` as the IdP described it (the directory's view is
        applied per request, see from_session): what the sign-in routes set as the cookie."""
        exp = time.time() + self.sessions.ttl_s
        return self.sessions.seal({"key_id": principal.key_id, "role": principal.role, "team": principal.team,
                                   "models": list(principal.models) if principal.models is not None else None,
                                   "user": principal.user, "mfa": principal.mfa, "exp": exp})

    async def directory_role(self, user: str, role: str, team: str) -> tuple[str, str]:
        """Role and team from the last directory sync where it knows the user (auth.directory)."""
        if not self.settings.auth.directory.enabled:
            return role, team
        if self._directory is None or time.monotonic() - self._directory[0] >= max(self.ttl, 1.0):
            try:
                users = await self.directory.get_users.remote()
            except Exception:  # keep the last view when the actor is briefly away
                users = self._directory[1] if self._directory else {}
            self._directory = (time.monotonic(), users)
        entry = self._directory[1].get(user)
        if not entry:
            return role, team
        return entry.get("role") or role, entry.get("team") or team

    async def check_mfa(self, principal: Principal, otp: str | None) -> Principal:
        """For admin permissions: the principal with MFA evidence, or MfaRequired (auth.mfa)."""
        mode = self.settings.auth.mfa
        if not self.enabled or mode.admin == "off" or principal.mfa:
            return principal
        if principal.via != "key":
            raise MfaRequired("admin permissions need a multi-factor sign-in: the identity provider's "
                              "token shows none (amr/acr, see auth.oidc[].mfa_amr)")
        store = self.mfa_store
        if not await store.enrolled.remote(principal.key_id):
            if mode.admin_keys == "required" and mode.admin == "required":
                raise MfaRequired("admin keys need a TOTP second factor: enrol one with `orfeas mfa enrol`")
            return principal
        if not otp:
            raise MfaRequired(f"this admin key has a TOTP second factor: send the code in the {OTP_HEADER} header")
        if not await store.verify.remote(principal.key_id, otp.strip()):
            raise MfaRequired(f"the {OTP_HEADER} code is wrong, expired or already used")
        return replace(principal, mfa=True)
