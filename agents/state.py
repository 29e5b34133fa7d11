"""Shared state for runs: versioned JSON documents with compare-and-set.

Every write names the version it read (`expected_version`; 0 for "must not exist yet"). A write
against a stale version raises `VersionConflict` with the current version and value, so two
agents cannot silently overwrite each other. A write with an idempotency key that was already
applied returns the earlier result and changes nothing (a redelivered message has no second
effect). Documents persist to the data directory in one file, `agents/state.json`; their values
(user content: plans, notes, tool results) are encrypted there with the field cipher (scope
`store:agents-state`, bound to the document's scope and key), the scope and key names and the
versions stay plain.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


from config.actors import detached_actor


class VersionConflict(Exception):
    def __init__(self, key: str, expected: int, current: int, value: Any = None):
        super().__init__(f"version conflict on {key!r}: expected version {expected}, current is {current}")
        self.key, self.expected, self.current, self.value = key, expected, current, value

    def __reduce__(self):
        return (self.__class__, (self.key, self.expected, self.current, self.value))


class VersionedStore:
    """The plain-Python core: {scope: {key: {"version", "value"}}} plus applied idempotency keys."""

    def __init__(self, docs: dict | None = None, applied: dict | None = None):
        self.docs: dict[str, dict[str, dict]] = docs or {}
        self.applied: dict[str, dict[str, dict]] = applied or {}

    def get(self, scope: str, key: str) -> dict:
        doc = self.docs.get(scope, {}).get(key)
        return dict(doc) if doc else {"version": 0, "value": None}

    def put(self, scope: str, key: str, value: Any, expected_version: int | None,
            idempotency_key: str | None = None) -> dict:
        """Write `value` if the document is at `expected_version` (None: unconditional)."""
        done = self.applied.get(scope, {}).get(idempotency_key) if idempotency_key else None
        if done is not None:
            return {**done, "duplicate": True}
        current = self.get(scope, key)
        if expected_version is not None and expected_version != current["version"]:
            raise VersionConflict(key, expected_version, current["version"], current["value"])
        doc = {"version": current["version"] + 1, "value": value}
        self.docs.setdefault(scope, {})[key] = doc
        if idempotency_key:
            self.applied.setdefault(scope, {})[idempotency_key] = dict(doc)
        return {**doc, "duplicate": False}

    def keys(self, scope: str) -> list[str]:
        return sorted(self.docs.get(scope, {}))

    def drop(self, scope: str) -> None:
        self.docs.pop(scope, None)
        self.applied.pop(scope, None)


STATE_SCOPE = "store:agents-state"


def _seal(cipher, table: dict[str, dict[str, dict]], kind: str, decrypt: bool = False) -> dict[str, dict[str, dict]]:
    """Each document's value encrypted (or decrypted), bound to `<kind>/<scope>/<key>`."""
    if cipher is None:
        return table
    call = cipher.decrypt_json if decrypt else cipher.encrypt_json
    return {scope: {key: {**doc, "value": call(doc["value"], scope=STATE_SCOPE, record_id=f"{kind}/{scope}/{key}",
                                             field="value")}
                    for key, doc in docs.items()}
            for scope, docs in table.items()}


class SharedState:
    """The store as an actor, written through to `<data_dir>/agents/state.json` (values encrypted
    when encryption is on: `settings`, else the defaults for the data directory the file is in)."""

    def __init__(self, path: str, settings: dict | None = None):
        from config import Settings, settings_from_dict
        from security.encryption import field_cipher

        self.path = Path(path)
        conf = settings_from_dict(settings) if settings else Settings(data_dir=self.path.parent.parent)
        self.cipher = field_cipher(conf)
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.store = VersionedStore(_seal(self.cipher, data.get("docs") or {}, "doc", decrypt=True),
                                    _seal(self.cipher, data.get("applied") or {}, "applied", decrypt=True))

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sealed = {"docs": _seal(self.cipher, self.store.docs, "doc"),
                  "applied": _seal(self.cipher, self.store.applied, "applied")}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state.")
        with os.fdopen(fd, "w") as f:
            json.dump(sealed, f)
        os.replace(tmp, self.path)

    def get(self, scope: str, key: str) -> dict:
        return self.store.get(scope, key)

    def put(self, scope: str, key: str, value: Any, expected_version: int | None = None,
            idempotency_key: str | None = None) -> dict:
        result = self.store.put(scope, key, value, expected_version, idempotency_key)
        if not result["duplicate"]:
            self._save()
        return result

    def keys(self, scope: str) -> list[str]:
        return self.store.keys(scope)

    def drop(self, scope: str) -> None:
        self.store.drop(scope)
        self._save()


def shared_state(data_dir: str | Path, settings=None):
    """The data directory's shared-state actor; `settings` (whose encryption section it uses) where
    the caller has them."""
    path = Path(data_dir).expanduser().resolve() / "agents" / "state.json"
    return detached_actor(SharedState, "orfeas-state-" + hashlib.sha1(str(path).encode()).hexdigest()[:10], str(path),
                          settings.to_dict() if settings is not None else None, durable=True)
