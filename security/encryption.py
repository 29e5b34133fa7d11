"""The configured field cipher for a process, and the key scopes every room uses.

`field_cipher(settings)` is None when `encryption.enabled` is off; otherwise a `FieldCipher`
whose data keys come from the cluster's key service (when Ray is connected) or from a key ring
opened in this process (the CLI or a test without Ray). One per data directory per process.
"""

from __future__ import annotations

import threading
from typing import Any

from security.crypto import FieldCipher

_CIPHERS: dict[str, FieldCipher] = {}
_LOCK = threading.Lock()


def collection_scope(collection: str) -> str:
    return f"collection:{collection}"


def subject_scope(subject: str) -> str:
    return f"subject:{subject}"


WORKFLOWS_SCOPE = "store:workflows"
LEDGER_SCOPE = "store:ledger"
AUDIT_SCOPE = "store:audit"


def subject_of(tags: list[str] | None, prefix: str) -> str | None:
    """The data subject a record belongs to, from a `subject:<id>` tag (encryption.subject_tag_prefix)."""
    for t in tags or []:
        if isinstance(t, str) and t.startswith(prefix) and len(t) > len(prefix):
            return t[len(prefix):]
    return None


def field_cipher(settings: Any) -> FieldCipher | None:
    if not settings.encryption.enabled:
        return None
    where = str(settings.resolved_data_dir())
    with _LOCK:
        cipher = _CIPHERS.get(where)
        if cipher is None:
            cipher = FieldCipher(_LazyKeys(settings), allow_plaintext=settings.encryption.allow_plaintext_reads)
            _CIPHERS[where] = cipher
        return cipher


class _LazyKeys:
    """DataKeys made on first use, so a process that never encrypts creates no key file."""

    def __init__(self, settings: Any):
        self.settings, self._keys = settings, None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._keys is None:
                self._keys = _data_keys(self.settings)
            return self._keys

    def current(self, scope: str):
        return self._get().current(scope)

    def key(self, key_id: str):
        return self._get().key(key_id)

    def forget(self) -> None:
        forget = getattr(self._keys, "forget", None)
        if forget:
            forget()


def _data_keys(settings: Any):
    import ray

    from security.keyring import KeyRing, RemoteKeys, key_service, ring_path

    if ray.is_initialized():
        return RemoteKeys(key_service(settings), settings.encryption.key_cache_s)
    from security.audit import audit_event
    from security.keyproviders import provider_from_settings

    return KeyRing(ring_path(settings), provider_from_settings(settings),
                   lambda action, details: audit_event(settings, action, details, actor="key-ring"))


def forget_ciphers() -> None:
    """Drop this process's ciphers and their cached keys (after a shred, and between tests)."""
    with _LOCK:
        for c in _CIPHERS.values():
            forget = getattr(c.keys, "forget", None)
            if forget:
                forget()
        _CIPHERS.clear()
