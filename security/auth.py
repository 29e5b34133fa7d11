"""Who is calling: bearer API keys checked against the cluster's key store, cached briefly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

from security.keys import hash_key, keystore
from config import Settings
from models.errors import AuthenticationFailed, PermissionDenied


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: str
    models: tuple[str, ...] | None  # None: every model
    team: str = ""
    budget_usd: float | None = None
    budget_period: str = "month"

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
