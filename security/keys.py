"""API keys: generated once, shown once, stored only as hashes.

A named, detached Ray actor owns the key file under the data directory, so the CLI and every
gateway replica see one set of keys. A key looks like `orf_<id>_<secret>`; the id is public
(listing, revoking), the secret is 256 random bits, so a plain SHA-256 is a safe hash for it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from config.actors import detached_actor

ROLE_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
KEY_PREFIX = "orf"


class KeyRecord(BaseModel):
    id: str
    hash: str
    role: str = Field(pattern=ROLE_PATTERN, description="A built-in role or a custom one from auth.roles.")
    models: list[str] | None = Field(None, description="Models this key may use; None = all.")
    collections: list[str] | None = Field(None, description="Collections (names or globs) it may reach; None = all.")
    endpoints: list[str] | None = Field(None, description="Request paths (or globs) it may call; None = all.")
    expires_at: float | None = Field(None, description="Epoch seconds after which the key stops working.")
    user: str = Field("", description="The person the key belongs to (user budgets).")
    limits: dict[str, int | None] | None = Field(None, description="Overrides of rate_limits.key: "
                                                 "requests_per_minute, tokens_per_minute, concurrent.")
    name: str = ""
    team: str = Field("", description="Team the key's usage is aggregated under in the ledger.")
    budget_usd: float | None = Field(None, ge=0, description="Spend allowed per budget period; None = no budget.")
    budget_period: Literal["day", "month"] = "month"
    created_at: float = Field(default_factory=time.time)
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def public(self) -> dict:
        """Everything but the hash."""
        return self.model_dump(exclude={"hash"})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(key_id: str | None = None) -> str:
    """A fresh API key, `orf_<id>_<secret>` (the secret: 32 random bytes, URL-safe, no `_`)."""
    return f"{KEY_PREFIX}_{key_id or secrets.token_hex(4)}_{secrets.token_urlsafe(32).replace('_', '-')}"


def key_id_of(key: str) -> str | None:
    parts = key.split("_")
    return parts[1] if len(parts) == 3 and parts[0] == KEY_PREFIX else None


class KeyFile:
    """The key records on disk, written atomically so a crash never leaves half a file."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, KeyRecord]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        return {r["id"]: KeyRecord.model_validate(r) for r in data["keys"]}

    def save(self, records: dict[str, KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"keys": [r.model_dump() for r in records.values()]}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys.")
        with os.fdopen(fd, "w") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)


LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent")


class TeamRecord(BaseModel):
    """A team's budget and rate-limit overrides (keys name their team; the ledger sums by it)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    budget_usd: float | None = Field(None, ge=0)
    budget_period: Literal["day", "month"] = "month"
    limits: dict[str, int | None] | None = None


class UserRecord(BaseModel):
    """A person's budget across all their keys and tokens."""

    id: str = Field(min_length=1, max_length=256)
    budget_usd: float | None = Field(None, ge=0)
    budget_period: Literal["day", "month"] = "month"


class KeyStore:
    """Key operations over a KeyFile; run as a Ray actor (see `keystore`). The same file holds the
    teams and users whose budgets and limits apply to the keys (admin API)."""

    def __init__(self, path: str):
        self.file = KeyFile(Path(path))
        self.records = self.file.load()
        self.teams_path = Path(path).with_name("teams.json")
        self.teams, self.users = self._load_accounts()

    def create(self, role: str, models: list[str] | None = None, name: str = "", team: str = "",
               budget_usd: float | None = None, budget_period: str = "month", *,
               collections: list[str] | None = None, endpoints: list[str] | None = None,
               expires_at: float | None = None, user: str = "", limits: dict[str, int | None] | None = None,
               roles: list[str] | None = None) -> tuple[dict, str]:
        """A new key and its record. `roles`: the role names this platform knows (default: admin and
        user, what a caller without the settings may give)."""
        known = roles or ["admin", "user"]
        if role not in known:
            raise ValueError(f"role must be one of {', '.join(repr(r) for r in known)}, not {role!r}")
        _check_budget(budget_usd, budget_period)
        _check_limits(limits)
        if expires_at is not None and expires_at <= time.time():
            raise ValueError(f"expires_at {expires_at!r} is in the past")
        key_id = secrets.token_hex(4)
        while key_id in self.records:
            key_id = secrets.token_hex(4)
        key = new_key(key_id)
        record = KeyRecord(id=key_id, hash=hash_key(key), role=role, models=models or None, name=name,
                           team=team, budget_usd=budget_usd, budget_period=budget_period,
                           collections=collections, endpoints=endpoints, expires_at=expires_at, user=user,
                           limits=limits or None)
        return self._put(record), key

    def install(self, key: str, role: str = "admin", name: str = "bootstrap") -> dict:
        """Install a key made elsewhere (the Kubernetes bootstrap Secret) once; its id is its own."""
        key_id = key_id_of(key)
        if key_id is None or len(key) < 40:
            raise ValueError("a bootstrap key looks like orf_<id>_<secret> with a secret of at least 32 characters")
        existing = self.records.get(key_id)
        if existing is not None:
            return {**existing.public(), "installed": False}
        return {**self._put(KeyRecord(id=key_id, hash=hash_key(key), role=role, name=name)), "installed": True}

    def _put(self, record: KeyRecord) -> dict:
        records = {**self.records, record.id: record}
        self.file.save(records)  # on disk first: a failed write changes nothing
        self.records = records
        return record.public()

    def update(self, key_id: str, **fields) -> dict:
        """Change a key's scopes, expiry, role, user or limits (only the fields given)."""
        record = self.records.get(key_id)
        if record is None:
            raise KeyError(f"no key with id {key_id!r}")
        roles = fields.pop("roles", None)
        allowed = {"models", "collections", "endpoints", "expires_at", "role", "user", "limits", "name", "team"}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"unknown key field {unknown[0]!r}")
        if "role" in fields and roles is not None and fields["role"] not in roles:
            raise ValueError(f"unknown role {fields['role']!r}")
        _check_limits(fields.get("limits"))
        updated = KeyRecord.model_validate({**record.model_dump(), **fields})
        return self._put(updated)

    def get(self, key_id: str) -> dict:
        record = self.records.get(key_id)
        if record is None:
            raise KeyError(f"no key with id {key_id!r}")
        return record.public()

    def scrub_subject(self, subject: str) -> list[str]:
        """Erasure of a data subject: their keys (`user == subject`) lose the user and the name they
        were given and are revoked; their user record (budget) goes. The ids stay (the ledger's
        figures refer to them). Returns the ids scrubbed."""
        now = time.time()
        theirs = [r for r in self.records.values() if r.user == subject]
        if theirs:
            records = {**self.records}
            for r in theirs:
                records[r.id] = r.model_copy(update={"user": "", "name": "", "revoked_at": r.revoked_at or now})
            self.file.save(records)
            self.records = records
        if subject in self.users:
            self._save_accounts(self.teams, {k: v for k, v in self.users.items() if k != subject})
        return [r.id for r in theirs]

    # ---------------------------------------------------------------- teams and users

    def _load_accounts(self) -> tuple[dict[str, TeamRecord], dict[str, UserRecord]]:
        if not self.teams_path.exists():
            return {}, {}
        data = json.loads(self.teams_path.read_text())
        return ({t["name"]: TeamRecord.model_validate(t) for t in data.get("teams", [])},
                {u["id"]: UserRecord.model_validate(u) for u in data.get("users", [])})

    def _save_accounts(self, teams: dict[str, TeamRecord], users: dict[str, UserRecord]) -> None:
        payload = json.dumps({"teams": [t.model_dump() for t in teams.values()],
                              "users": [u.model_dump() for u in users.values()]}, indent=1)
        self.teams_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.teams_path.parent, prefix=".teams.")
        with os.fdopen(fd, "w") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.teams_path)
        self.teams, self.users = teams, users

    def set_team(self, name: str, budget_usd: float | None = None, budget_period: str = "month",
                 limits: dict[str, int | None] | None = None) -> dict:
        _check_budget(budget_usd, budget_period)
        _check_limits(limits)
        team = TeamRecord(name=name, budget_usd=budget_usd, budget_period=budget_period, limits=limits or None)
        self._save_accounts({**self.teams, name: team}, self.users)
        return team.model_dump()

    def delete_team(self, name: str) -> dict:
        if name not in self.teams:
            raise KeyError(f"no team {name!r}")
        team = self.teams[name]
        self._save_accounts({k: v for k, v in self.teams.items() if k != name}, self.users)
        return team.model_dump()

    def list_teams(self) -> list[dict]:
        return [t.model_dump() for t in self.teams.values()]

    def set_user(self, user_id: str, budget_usd: float | None = None, budget_period: str = "month") -> dict:
        _check_budget(budget_usd, budget_period)
        user = UserRecord(id=user_id, budget_usd=budget_usd, budget_period=budget_period)
        self._save_accounts(self.teams, {**self.users, user_id: user})
        return user.model_dump()

    def list_users(self) -> list[dict]:
        return [u.model_dump() for u in self.users.values()]

    def account(self, team: str, user: str) -> dict:
        """The team's and the user's records (None where there is none), for building a principal."""
        t, u = self.teams.get(team), self.users.get(user)
        return {"team": t.model_dump() if t else None, "user": u.model_dump() if u else None}

    def verify(self, key: str) -> dict | None:
        """The key's record with its team's and user's (`account`), or None for an unknown or
        revoked key (an expired one is returned: the caller says why it is refused)."""
        record = self.records.get(key_id_of(key) or "")
        if record is None or not record.active or not hmac.compare_digest(record.hash, hash_key(key)):
            return None
        return {**record.public(), "account": self.account(record.team, record.user)}

    def lookup(self, key_id: str) -> dict | None:
        """Like verify, by id (a principal refreshed during a long-running workflow)."""
        record = self.records.get(key_id)
        if record is None or not record.active:
            return None
        return {**record.public(), "account": self.account(record.team, record.user)}

    def list(self) -> list[dict]:
        return [r.public() for r in sorted(self.records.values(), key=lambda r: r.created_at)]

    def revoke(self, key_id: str) -> dict:
        record = self.records.get(key_id)
        if record is None:
            raise KeyError(f"no key with id {key_id!r}")
        if record.active:
            revoked = record.model_copy(update={"revoked_at": time.time()})
            records = {**self.records, key_id: revoked}
            self.file.save(records)
            self.records = records
            record = revoked
        return record.public()

    def set_budget(self, key_id: str, budget_usd: float | None, budget_period: str = "month",
                   team: str | None = None) -> dict:
        """Set (or with None clear) a key's budget, and optionally its team."""
        record = self.records.get(key_id)
        if record is None:
            raise KeyError(f"no key with id {key_id!r}")
        _check_budget(budget_usd, budget_period)
        update = {"budget_usd": budget_usd, "budget_period": budget_period}
        if team is not None:
            update["team"] = team
        records = {**self.records, key_id: record.model_copy(update=update)}
        self.file.save(records)
        self.records = records
        return records[key_id].public()

    def has_admin(self) -> bool:
        return any(r.role == "admin" and r.active and not r.expired(time.time()) for r in self.records.values())


def _check_budget(budget_usd: float | None, period: str) -> None:
    if budget_usd is not None and not budget_usd >= 0:
        raise ValueError(f"budget must be a non-negative amount in USD, not {budget_usd!r}")
    if period not in ("day", "month"):
        raise ValueError(f"budget period must be 'day' or 'month', not {period!r}")


def _check_limits(limits: dict[str, int | None] | None) -> None:
    for k, v in (limits or {}).items():
        if k not in LIMIT_FIELDS:
            raise ValueError(f"unknown limit {k!r}; limits are {', '.join(LIMIT_FIELDS)}")
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"limit {k} must be a positive integer or null, not {v!r}")


def keystore(data_dir: str | Path):
    """The cluster's key store actor for this data directory (created on first use)."""
    path = Path(data_dir).expanduser().resolve() / "auth" / "keys.json"
    name = "orfeas-keys-" + hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return detached_actor(KeyStore, name, str(path), durable=True)


def bootstrap_admin(data_dir: str | Path, env: str, settings=None) -> None:
    """Install the admin key in `$env` (on Kubernetes: the orfeas-admin-bootstrap Secret, made by
    `orfeas keys bootstrap-secret`) once, so that a cluster has an admin credential without `orfeas
    up` printing one. Fire and forget; with `settings` the install is audited from a background
    thread (`admin.key.bootstrap`: the key id and the variable, never the key; outcome error with
    the reason for a malformed key). Every gateway replica calls this: only the one whose call
    installed the key records it."""
    key = os.environ.get(env, "").strip()
    if not key:
        return
    ref = keystore(data_dir).install.remote(key, "admin", "bootstrap")
    if settings is not None:
        import threading

        threading.Thread(target=_audit_bootstrap, args=(ref, settings, env, key_id_of(key) or "?"),
                         name="orfeas-bootstrap-audit", daemon=True).start()


def _audit_bootstrap(ref, settings, env: str, key_id: str) -> None:
    import ray

    from security.audit import audit_event

    where = {"actor": "k8s:bootstrap-secret", "target": f"key:{key_id}"}
    try:
        record = ray.get(ref)
    except Exception as e:
        audit_event(settings, "admin.key.bootstrap", {"env": env, "reason": str(getattr(e, "cause", e))[:300]},
                    outcome="error", **where)
        return
    if record.get("installed"):
        audit_event(settings, "admin.key.bootstrap", {"env": env, "role": record["role"], "name": record["name"]},
                    **where)
