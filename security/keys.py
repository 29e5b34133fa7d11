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

Role = Literal["admin", "user"]
KEY_PREFIX = "orf"


class KeyRecord(BaseModel):
    id: str
    hash: str
    role: Role
    models: list[str] | None = Field(None, description="Models this key may use; None = all.")
    name: str = ""
    team: str = Field("", description="Team the key's usage is aggregated under in the ledger.")
    budget_usd: float | None = Field(None, ge=0, description="Spend allowed per budget period; None = no budget.")
    budget_period: Literal["day", "month"] = "month"
    created_at: float = Field(default_factory=time.time)
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict:
        """Everything but the hash."""
        return self.model_dump(exclude={"hash"})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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


class KeyStore:
    """Key operations over a KeyFile; run as a Ray actor (see `keystore`)."""

    def __init__(self, path: str):
        self.file = KeyFile(Path(path))
        self.records = self.file.load()

    def create(self, role: Role, models: list[str] | None = None, name: str = "", team: str = "",
               budget_usd: float | None = None, budget_period: str = "month") -> tuple[dict, str]:
        if role not in ("admin", "user"):
            raise ValueError(f"role must be 'admin' or 'user', not {role!r}")
        _check_budget(budget_usd, budget_period)
        key_id = secrets.token_hex(4)
        while key_id in self.records:
            key_id = secrets.token_hex(4)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32).replace('_', '-')}"
        record = KeyRecord(id=key_id, hash=hash_key(key), role=role, models=models or None, name=name,
                           team=team, budget_usd=budget_usd, budget_period=budget_period)
        records = {**self.records, key_id: record}
        self.file.save(records)  # on disk first: a failed write changes nothing
        self.records = records
        return record.public(), key

    def verify(self, key: str) -> dict | None:
        record = self.records.get(key_id_of(key) or "")
        if record is None or not record.active or not hmac.compare_digest(record.hash, hash_key(key)):
            return None
        return record.public()

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
        return any(r.role == "admin" and r.active for r in self.records.values())


def _check_budget(budget_usd: float | None, period: str) -> None:
    if budget_usd is not None and not budget_usd >= 0:
        raise ValueError(f"budget must be a non-negative amount in USD, not {budget_usd!r}")
    if period not in ("day", "month"):
        raise ValueError(f"budget period must be 'day' or 'month', not {period!r}")


def keystore(data_dir: str | Path):
    """The cluster's key store actor for this data directory (created on first use)."""
    path = Path(data_dir).expanduser().resolve() / "auth" / "keys.json"
    name = "orfeas-keys-" + hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return detached_actor(KeyStore, name, str(path), durable=True)
