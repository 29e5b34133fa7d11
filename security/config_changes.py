"""Configuration changes at deploy, audited: what changed since the last deploy, by setting
name, never by value (settings hold webhook URLs and the like).

Each deploy keeps a digest of the settings it deployed beside the audit chain
(`<audit dir>/deployed-settings.json`): every leaf setting's dotted path with an HMAC-SHA-256 of
its value under a random salt kept in the same file (so a digest cannot be checked against
guessed values elsewhere). The next deploy compares digests and records `config.change` with the
paths changed, added and removed; the first one records `config.deploy`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

DIGEST_FILE = "deployed-settings.json"


def _leaves(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _leaves(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) and ("id" in v or "name" in v) for v in value):
        for v in value:  # catalog entries, issuers, agents: by their id or name, not their position
            _leaves(v, f"{path}[{v.get('id', v.get('name'))}]", out)
    else:
        out[path] = value


def settings_digest(settings: Any, salt: bytes) -> dict[str, str]:
    leaves: dict[str, Any] = {}
    _leaves(settings.to_dict(), "", leaves)
    return {p: hmac.new(salt, json.dumps(v, sort_keys=True, default=str).encode(), hashlib.sha256).hexdigest()[:32]
            for p, v in sorted(leaves.items())}


def diff(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    return {"changed": sorted(p for p in after.keys() & before.keys() if after[p] != before[p]),
            "added": sorted(after.keys() - before.keys()), "removed": sorted(before.keys() - after.keys())}


def record_deploy(settings: Any, *, actor: str = "", source: str = "") -> dict[str, Any]:
    """Audit this deploy's settings against the last one's; returns {first} or the diff."""
    from security.audit import audit_dir, audit_event

    path = audit_dir(settings) / DIGEST_FILE
    old = None
    try:
        old = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        old = None  # an unreadable digest: this deploy is recorded as a first one, saying so
    salt = bytes.fromhex(old["salt"]) if old and "salt" in old else secrets.token_bytes(16)
    now = settings_digest(settings, salt)
    if old is None or "digest" not in old:
        out: dict[str, Any] = {"first": True, "settings": len(now), "unreadable_digest": path.exists()}
        audit_event(settings, "config.deploy", out, actor=actor, target="settings", source=source)
    else:
        out = diff(old["digest"], now)
        if any(out.values()):
            audit_event(settings, "config.change", out, actor=actor, target="settings", source=source)
    _write(path, {"salt": salt.hex(), "digest": now})
    return out


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".deployed.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
