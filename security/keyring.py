"""The data-key ring: one data key per scope (a collection, a tenant, a data subject, the
workflow store, the ledger, the audit log), each wrapped by the key provider's KEK and kept in
`data_dir/keys/datakeys.json` (written atomically, mode 0600).

- `current(scope)` creates a scope's key on first use; `key(key_id)` returns any live key.
- `rotate_kek()` makes a new KEK version current and rewraps every data key online (the data
  stays as it is: only the small wrapped keys change).
- `rotate_data_key(scope)` makes a new data key current; the old one stays readable ("retired")
  until the re-encryption job (jobs/reencrypt.py) has moved every record and calls `destroy`.
- `shred(scope)` deletes a scope's wrapped keys: whatever they encrypted can never be read
  again (crypto-shredding, for erasure).

In a cluster one named detached actor owns the ring (`key_service`), so every process agrees on
one key per scope; `RemoteKeys` is the client, caching unwrapped keys per process. Each change
(and a summary of key use) goes to the audit log through an `on_event` callback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from config.actors import detached_actor
from security.crypto import KEY_BYTES, KeyUnavailable
from security.keyproviders import KeyProvider

SCOPE = re.compile(r"^[a-z]+:[A-Za-z0-9_.:@-]{1,200}$")


def check_scope(scope: str) -> str:
    if not isinstance(scope, str) or not SCOPE.match(scope):
        raise ValueError(f"invalid key scope {scope!r}: expected kind:name (e.g. collection:docs, subject:42)")
    return scope


class KeyRing:
    def __init__(self, path: str | Path, provider: KeyProvider,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None):
        self.path = Path(path)
        self.provider = provider
        self.on_event = on_event or (lambda action, details: None)
        self._lock = threading.RLock()
        self._plain: dict[str, bytes] = {}
        self.uses: dict[str, int] = {}
        self.data = self._load()

    # --- file
    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"scopes": {}, "keys": {}}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data.get("scopes"), dict) or not isinstance(data.get("keys"), dict):
                raise ValueError("missing scopes or keys")
            return data
        except ValueError as e:
            raise KeyUnavailable(f"key ring {self.path} is unreadable: {e}") from e

    def _save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".datakeys.")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @staticmethod
    def _context(key_id: str, scope: str) -> dict[str, str]:
        return {"orfeas_key_id": key_id, "orfeas_scope": scope}

    def _new_key(self, data: dict[str, Any], scope: str) -> str:
        key_id = "dk-" + secrets.token_hex(8)
        dk = os.urandom(KEY_BYTES)
        data["keys"][key_id] = {"scope": scope, "state": "active", "created_at": time.time(),
                                "wrapped": self.provider.wrap(dk, self._context(key_id, scope))}
        s = data["scopes"].setdefault(scope, {"current": None, "keys": []})
        s["current"] = key_id
        s["keys"].append(key_id)
        self._plain[key_id] = dk
        return key_id

    # --- use
    def current(self, scope: str) -> tuple[str, bytes]:
        check_scope(scope)
        with self._lock:
            s = self.data["scopes"].get(scope)
            if s is None or s.get("current") is None:
                if s is not None and s.get("shredded_at"):
                    raise KeyUnavailable(f"the data key of {scope!r} was crypto-shredded; nothing more is "
                                         "written under it")
                data = json.loads(json.dumps(self.data))
                key_id = self._new_key(data, scope)
                self._save(data)  # on disk first
                self.data = data
                self.on_event("key.create", {"scope": scope, "key_id": key_id,
                                             "kek": data["keys"][key_id]["wrapped"]["kek"]})
                return key_id, self._plain[key_id]
            return s["current"], self.key(s["current"])

    def key(self, key_id: str) -> bytes:
        with self._lock:
            self.uses[key_id] = self.uses.get(key_id, 0) + 1
            dk = self._plain.get(key_id)
            if dk is not None:
                return dk
            rec = self.data["keys"].get(key_id)
            if rec is None:
                raise KeyUnavailable(f"data key {key_id!r} is not in the key ring {self.path}")
            if rec["state"] == "shredded":
                raise KeyUnavailable(f"data key {key_id!r} of {rec['scope']!r} was crypto-shredded: "
                                     "what it encrypted is gone")
            dk = self.provider.unwrap(rec["wrapped"], self._context(key_id, rec["scope"]))
            self._plain[key_id] = dk
            return dk

    def key_record(self, key_id: str) -> dict[str, Any]:
        rec = self.data["keys"].get(key_id)
        if rec is None:
            raise KeyUnavailable(f"data key {key_id!r} is not in the key ring {self.path}")
        return {"key_id": key_id, **{k: v for k, v in rec.items() if k != "wrapped"}, "kek": rec["wrapped"]["kek"]}

    def list(self) -> list[dict[str, Any]]:
        return [self.key_record(k) for k in sorted(self.data["keys"], key=lambda k: self.data["keys"][k]["created_at"])]

    def scopes(self) -> dict[str, dict[str, Any]]:
        return json.loads(json.dumps(self.data["scopes"]))

    def use_summary(self, reset: bool = True) -> dict[str, int]:
        """Key uses since the last summary, per key id (audited periodically, never per use)."""
        with self._lock:
            out = dict(self.uses)
            if reset:
                self.uses.clear()
            return out

    # --- rotation and shredding
    def rotate_kek(self) -> dict[str, Any]:
        """A new KEK version, and every live data key rewrapped under it (data untouched)."""
        with self._lock:
            old = self.provider.current_version()
            new = self.provider.rotate()
            data = json.loads(json.dumps(self.data))
            n = 0
            for key_id, rec in data["keys"].items():
                if rec["state"] != "shredded":
                    rec["wrapped"] = self.provider.rewrap(rec["wrapped"], self._context(key_id, rec["scope"]))
                    n += 1
            self._save(data)
            self.data = data
            out = {"from": old, "to": new, "rewrapped": n}
            self.on_event("key.rotate_kek", out)
            return out

    def rotate_data_key(self, scope: str) -> dict[str, Any]:
        """A new current data key for `scope`; the previous one is retired (still decrypts)."""
        check_scope(scope)
        with self._lock:
            data = json.loads(json.dumps(self.data))
            prev = (data["scopes"].get(scope) or {}).get("current")
            if prev:
                data["keys"][prev]["state"] = "retired"
            key_id = self._new_key(data, scope)
            self._save(data)
            self.data = data
            out = {"scope": scope, "key_id": key_id, "retired": prev}
            self.on_event("key.rotate_data_key", out)
            return out

    def destroy(self, key_id: str) -> dict[str, Any]:
        """Delete a retired key once nothing is encrypted under it any more."""
        with self._lock:
            rec = self.data["keys"].get(key_id)
            if rec is None:
                raise KeyUnavailable(f"data key {key_id!r} is not in the key ring")
            if rec["state"] == "active":
                raise ValueError(f"data key {key_id!r} is its scope's current key: rotate it first")
            return self._shred_keys([key_id], "key.destroy")

    def shred(self, scope: str) -> dict[str, Any]:
        """Crypto-shred every key of `scope`: what they encrypted can never be decrypted again."""
        check_scope(scope)
        with self._lock:
            s = self.data["scopes"].get(scope)
            ids = list(s["keys"]) if s else []
            out = self._shred_keys(ids, "key.shred", scope=scope)
            return out

    def _shred_keys(self, ids: list[str], action: str, scope: str | None = None) -> dict[str, Any]:
        data = json.loads(json.dumps(self.data))
        for key_id in ids:
            rec = data["keys"][key_id]
            rec["state"] = "shredded"
            rec["wrapped"] = {"provider": rec["wrapped"]["provider"], "kek": rec["wrapped"]["kek"], "blob": ""}
            rec["shredded_at"] = time.time()
            s = data["scopes"].get(rec["scope"])
            if s and s.get("current") == key_id:
                s["current"] = None
        if scope is not None:
            data["scopes"].setdefault(scope, {"current": None, "keys": []})["shredded_at"] = time.time()
        self._save(data)
        self.data = data
        for key_id in ids:
            self._plain.pop(key_id, None)
        out = {"scope": scope, "keys": ids}
        self.on_event(action, out)
        return out


# --- the cluster's key service ----------------------------------------------------------------------

class KeyService:
    """The KeyRing as a detached actor (the only writer of the data-key file)."""

    def __init__(self, settings: dict):
        from config import settings_from_dict
        from security.keyproviders import provider_from_settings

        self.settings = settings_from_dict(settings)
        self.ring = KeyRing(ring_path(self.settings), provider_from_settings(self.settings), self._audit)
        self._last_summary = time.monotonic()

    def _audit(self, action: str, details: dict[str, Any]) -> None:
        from security.audit import audit_event

        audit_event(self.settings, action, details, actor="key-service")

    def _maybe_summarise(self) -> None:
        if time.monotonic() - self._last_summary > self.settings.encryption.use_summary_s:
            self._last_summary = time.monotonic()
            uses = self.ring.use_summary()
            if uses:
                self._audit("key.use_summary", {"uses": uses})

    def current(self, scope: str) -> tuple[str, bytes]:
        self._maybe_summarise()
        return self.ring.current(scope)

    def key(self, key_id: str) -> bytes:
        self._maybe_summarise()
        return self.ring.key(key_id)

    def call(self, method: str, *args):
        if method not in ("list", "scopes", "rotate_kek", "rotate_data_key", "destroy", "shred", "key_record",
                          "use_summary"):
            raise AttributeError(f"KeyRing has no public method {method!r}")
        return getattr(self.ring, method)(*args)


def ring_path(settings) -> Path:
    return settings.resolved_data_dir() / "keys" / "datakeys.json"


def key_service(settings):
    name = "orfeas-keys-ring-" + hashlib.sha1(str(ring_path(settings)).encode()).hexdigest()[:10]
    return detached_actor(KeyService, name, settings.to_dict(), durable=True, max_task_retries=-1)


class RemoteKeys:
    """DataKeys through the key service, unwrapped keys cached in this process for `ttl_s`: a
    rotation reaches every writer, and a shredded key leaves every cache, within that time."""

    def __init__(self, handle, ttl_s: float = 30.0):
        self.handle, self.ttl_s = handle, ttl_s
        self._keys: dict[str, tuple[float, bytes]] = {}
        self._current: dict[str, tuple[float, str]] = {}

    def current(self, scope: str) -> tuple[str, bytes]:
        hit = self._current.get(scope)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s and hit[1] in self._keys:
            return hit[1], self._keys[hit[1]][1]
        import ray

        key_id, dk = ray.get(self.handle.current.remote(scope))
        self._keys[key_id] = (time.monotonic(), dk)
        self._current[scope] = (time.monotonic(), key_id)
        return key_id, dk

    def key(self, key_id: str) -> bytes:
        hit = self._keys.get(key_id)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        import ray

        dk = ray.get(self.handle.key.remote(key_id))
        self._keys[key_id] = (time.monotonic(), dk)
        return dk

    def forget(self) -> None:
        """Drop cached keys (after a shred, so this process stops decrypting at once)."""
        self._keys.clear()
        self._current.clear()
