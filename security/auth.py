"""Who is calling: bearer API keys checked against the cluster's key store, cached briefly; JWTs
from the trusted OIDC issuers (security/oidc.py) and browser sessions (security/sessions.py),
told apart by shape, map onto the same `Principal`."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cached_property

from security import rbac
from security.keys import hash_key, keystore
from security.ratelimit import RateLimit
from config import Settings
from models.errors import AuthenticationFailed, PermissionDenied
from security.mfa import OTP_HEADER, MfaRequired, mfa_store
from security.oidc import TokenRejected, TokenVerifier, identity_of, looks_like_jwt
from security.sessions import SessionCodec, looks_like_session


@dataclass(frozen=True)
class Budget:
    """A spending limit beyond the key's own: a team's or a user's (`scope` is "team" or "user")."""

    scope: str
    id: str
    usd: float
    period: str = "month"


@dataclass(frozen=True)
class Principal:
    """Who is calling, whatever the credential (an API key here; a verified token maps its claims
    onto the same fields): the role and what it grants, the team, the scopes (None: every one),
    the expiry, and the budgets and rate-limit overrides that apply."""

    key_id: str
    role: str
    models: tuple[str, ...] | None  # None: every model
    team: str = ""
    budget_usd: float | None = None
    budget_period: str = "month"
    collections: tuple[str, ...] | None = None  # names or globs; None: every collection
    endpoints: tuple[str, ...] | None = None  # request paths or globs (/v1/rag/*); None: every endpoint
    expires_at: float | None = None  # epoch seconds; None: never
    user: str = ""  # the person behind the credential (user budgets); "" when unknown
    permissions: frozenset[str] | None = None  # what the role resolved to; None: the built-in role's
    budgets: tuple[Budget, ...] = ()  # team and user budgets (the key's own is budget_usd)
    rate_limit: RateLimit | None = None  # the key's override of rate_limits.key
    team_rate_limit: RateLimit | None = None  # the team's override of rate_limits.team
    credential: str = "key"  # "key" (an API key, refreshed from the key store), or what else made it ("token")
    mfa: bool = False  # multi-factor evidence came with this credential (amr/acr, a TOTP code)
    via: str = "key"  # how it was presented: "key", "jwt" or "session"

    @property
    def grants(self) -> frozenset[str]:
        return self.permissions if self.permissions is not None else rbac.grants(self.role)

    @property
    def is_admin(self) -> bool:
        return "admin:settings" in self.grants

    def allows(self, permission: str, resource: str | None = None) -> rbac.Decision:
        return rbac.decide(self, permission, resource, time.time())

    def require(self, permission: str, resource: str | None = None, param: str | None = None) -> None:
        """PermissionDenied (403) naming what was asked for, unless allowed."""
        decision = self.allows(permission, resource)
        if not decision:
            code = "model_not_allowed" if permission == "models:use" else "permission_denied"
            raise PermissionDenied(decision.reason, param, code)

    def may_use(self, model_id: str) -> bool:
        return bool(self.allows("models:use", model_id))

    def check_model(self, model_id: str) -> None:
        if not self.may_use(model_id):
            raise PermissionDenied(f"this API key may not use model {model_id!r}", "model")

    def all_budgets(self) -> tuple[Budget, ...]:
        own = (Budget("key", self.key_id, self.budget_usd, self.budget_period),) if self.budget_usd is not None else ()
        return own + self.budgets


ANONYMOUS_ADMIN = Principal("anonymous", "admin", None)


def _limit(limits: dict | None) -> RateLimit | None:
    return RateLimit(**{k: v for k, v in limits.items() if k in RATE_FIELDS}) if limits else None


RATE_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent")


def principal_of(record: dict, table: dict[str, frozenset[str]] | None = None) -> Principal:
    """The principal of a key record (with its `account`: team and user records), its role
    resolved through the role table."""
    account = record.get("account") or {}
    team, user = account.get("team") or {}, account.get("user") or {}
    budgets = []
    if team.get("budget_usd") is not None:
        budgets.append(Budget("team", team["name"], team["budget_usd"], team.get("budget_period") or "month"))
    if user.get("budget_usd") is not None:
        budgets.append(Budget("user", user["id"], user["budget_usd"], user.get("budget_period") or "month"))

    def scope(name: str) -> tuple[str, ...] | None:
        return tuple(record[name]) if record.get(name) else None

    return Principal(
        record["id"], record["role"], scope("models"), record.get("team") or "", record.get("budget_usd"),
        record.get("budget_period") or "month", collections=scope("collections"), endpoints=scope("endpoints"),
        expires_at=record.get("expires_at"), user=record.get("user") or "",
        permissions=rbac.grants(record["role"], table), budgets=tuple(budgets),
        rate_limit=_limit(record.get("limits")), team_rate_limit=_limit(team.get("limits")))


def role_table_of(settings: Settings) -> dict[str, frozenset[str]]:
    """Built-in and configured roles (RoleError names a bad one)."""
    return rbac.role_table({n: (r.permissions, r.inherits) for n, r in settings.auth.roles.items()})


class Authenticator:
    def __init__(self, settings: Settings):
        self.enabled = settings.auth.enabled
        self.ttl = settings.auth.key_cache_s
        self.data_dir = settings.resolved_data_dir()
        self.roles = role_table_of(settings)
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self.settings = settings
        self.tokens = TokenVerifier(settings)
        self.session_cookie = settings.auth.session.cookie
        self._directory: tuple[float, dict[str, dict]] | None = None
        self._fresh: dict[str, tuple[float, dict | None]] = {}  # key id -> record, for refresh()

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
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.ttl:
            principal = hit[1]
        else:
            record = await self.store.verify.remote(key)
            principal = None if record is None else principal_of(record, self.roles)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, principal)
        if principal is None:
            raise AuthenticationFailed("invalid or revoked API key")
        if principal.expires_at is not None and time.time() >= principal.expires_at:
            raise AuthenticationFailed(f"API key {principal.key_id} expired at "
                                       f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(principal.expires_at))}")
        return principal

    def cached(self, authorization: str | None, max_age_s: float | None = None) -> Principal | None:
        """The principal of a bearer API key this authenticator verified within `max_age_s` (by
        default its cache TTL), or None (no key, a token or session, unknown, revoked, expired,
        or not verified lately): no await, no Ray call, for checks that must cost nothing and
        grant nothing (serve.http.admission refuses with it, never admits)."""
        if not self.enabled:
            return ANONYMOUS_ADMIN
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or looks_like_session(key) or looks_like_jwt(key):
            return None
        hit = self._cache.get(hash_key(key))
        if hit is None or time.monotonic() - hit[0] >= (self.ttl if max_age_s is None else max_age_s) or hit[1] is None:
            return None
        principal = hit[1]
        if principal.expires_at is not None and time.time() >= principal.expires_at:
            return None
        return principal

    # ------------------------------------------------------------ tokens, sessions, MFA

    async def from_token(self, token: str) -> Principal:
        """The principal of a bearer JWT from a trusted issuer (401 with the reason otherwise)."""
        if not self.tokens.configured:
            raise TokenRejected("this looks like a JWT, but no OIDC issuer is configured (auth.oidc)")
        ident = identity_of(await self.tokens.verify(token))
        role, team = await self.directory_role(ident.user, ident.role, ident.team)
        return Principal(ident.key_id, role, ident.models, team, user=ident.user, mfa=ident.mfa, via="jwt",
                         credential="token", permissions=rbac.grants(role, self.roles))

    async def from_session(self, value: str) -> Principal:
        """The principal of a session: what the IdP said at sign-in, with the directory's role and
        team applied on every request (so a sync reaches open sessions too)."""
        data = self.sessions.open(value)
        models = data.get("models")
        user = data.get("user") or ""
        role, team = await self.directory_role(user, data["role"], data.get("team") or "")
        return Principal(data["key_id"], role, tuple(models) if models is not None else None, team, user=user,
                         mfa=bool(data.get("mfa")), via="session", credential="token",
                         permissions=rbac.grants(role, self.roles))

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

    async def refresh(self, principal: Principal) -> Principal:
        """The principal as the key store has it now (a workflow that runs for hours must not
        outlive its key's revocation or a lowered budget); AuthenticationFailed when revoked or
        expired. Principals that are not API keys (tokens: no record) are returned as they are."""
        if not self.enabled or principal.credential != "key" or principal is ANONYMOUS_ADMIN:
            return principal
        hit = self._fresh.get(principal.key_id)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            record = hit[1]
        else:
            record = await self.store.lookup.remote(principal.key_id)
            if len(self._fresh) > 10_000:
                self._fresh.clear()
            self._fresh[principal.key_id] = (time.monotonic(), record)
        if record is None:
            raise AuthenticationFailed(f"API key {principal.key_id} was revoked; the work it started stops")
        fresh = principal_of(record, self.roles)
        if fresh.expires_at is not None and time.time() >= fresh.expires_at:
            raise AuthenticationFailed(f"API key {principal.key_id} has expired; the work it started stops")
        return fresh


# The person at the cluster's own CLI (`orfeas ask`, `orfeas run`): they hold the cluster itself,
# so they act as an admin, but under their own name in the ledger ("cli"), never as the platform.
OPERATOR = Principal("cli", "admin", None, credential="operator")
API_KEY_ENV = "ORFEAS_API_KEY"


def operator_principal(settings: Settings) -> Principal:
    """Whom the CLI's in-cluster calls are made for: the key in $ORFEAS_API_KEY when set (its
    scopes, limits and budget apply; AuthenticationFailed when it is not valid), else OPERATOR."""
    import os

    import ray

    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        return OPERATOR
    record = ray.get(keystore(settings.resolved_data_dir()).verify.remote(key))
    if record is None:
        raise AuthenticationFailed(f"${API_KEY_ENV} holds an invalid or revoked API key")
    return principal_of(record, role_table_of(settings))
