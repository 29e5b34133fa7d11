"""Shared state for runs: versioned JSON documents with compare-and-set.

Every write names the version it read (`expected_version`; 0 for "must not exist yet"). A write
against a stale version raises `VersionConflict` with the current version and value, so two
agents cannot silently overwrite each other. A write with an idempotency key that was already
applied returns the earlier result and changes nothing (a redelivered message has no second
effect). Documents persist to the data directory, one JSON file per scope.
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


class SharedState:
    """The store as an actor, written through to `<data_dir>/agents/state.json`."""

    def __init__(self, path: str):
        self.path = Path(path)
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.store = VersionedStore(data.get("docs"), data.get("applied"))

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state.")
        with os.fdopen(fd, "w") as f:
            json.dump({"docs": self.store.docs, "applied": self.store.applied}, f)
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


def shared_state(data_dir: str | Path):
    path = Path(data_dir).expanduser().resolve() / "agents" / "state.json"
    return detached_actor(SharedState, "orfeas-state-" + hashlib.sha1(str(path).encode()).hexdigest()[:10], str(path),
                          durable=True)
