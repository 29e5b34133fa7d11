"""Field encryption: AES-256-GCM under per-scope data keys (envelope encryption).

A stored field holding user content becomes one token string:

    orfenc1:<key id>:<base64url(12-byte nonce | ciphertext | 16-byte tag)>

Each record gets a fresh random nonce; the associated data binds the token to its scope (the
collection, tenant or data subject whose data key encrypted it), the record's id and the field's
name, so a token copied onto another record, field or collection fails to decrypt. The data keys
come from a `DataKeys` source (security/keyring.py: a key ring whose keys are wrapped by a key
provider's KEK). Every failure is a typed error naming what failed; nothing is ever returned
as plaintext in place of a token that did not decrypt.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "orfenc1:"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32


class EncryptionError(Exception):
    """Something about encrypted data failed; the message names what."""


class KeyUnavailable(EncryptionError):
    """The key a record names is unknown, crypto-shredded, or its KEK cannot unwrap it."""


class DecryptionFailed(EncryptionError):
    """A token did not decrypt: wrong key, tampered or truncated ciphertext, or a token moved to
    another record, field or scope."""


class NotEncrypted(EncryptionError):
    """A field that must hold a token holds something else (plaintext where ciphertext belongs)."""


class DataKeys(Protocol):
    """Where data keys come from (security/keyring.py)."""

    def current(self, scope: str) -> tuple[str, bytes]:
        """The scope's current data key (created on first use): its id and its 32 bytes."""

    def key(self, key_id: str) -> bytes:
        """A data key by id (current or retired); KeyUnavailable when shredded or unknown."""


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def associated_data(scope: str, record_id: str, field: str) -> bytes:
    # JSON keeps the three parts unambiguous (no separator can be forged by a crafted id).
    return json.dumps([scope, record_id, field], separators=(",", ":")).encode()


def is_token(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def token_key_id(token: str) -> str:
    """The id of the data key a token was encrypted under."""
    if not is_token(token):
        raise NotEncrypted("value is not an encrypted token")
    key_id, sep, _ = token[len(PREFIX):].partition(":")
    if not sep or not key_id:
        raise DecryptionFailed("malformed token: no key id")
    return key_id


def seal(key: bytes, key_id: str, plaintext: bytes, aad: bytes) -> str:
    nonce = os.urandom(NONCE_BYTES)
    return f"{PREFIX}{key_id}:{_b64e(nonce + AESGCM(key).encrypt(nonce, plaintext, aad))}"


def open_token(key: bytes, token: str, aad: bytes, what: str = "token") -> bytes:
    key_id = token_key_id(token)
    body = token[len(PREFIX) + len(key_id) + 1:]
    try:
        raw = _b64d(body)
    except (ValueError, TypeError) as e:
        raise DecryptionFailed(f"{what}: ciphertext is not valid base64") from e
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionFailed(f"{what}: ciphertext is truncated ({len(raw)} bytes, at least "
                               f"{NONCE_BYTES + TAG_BYTES} expected)")
    try:
        return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptionFailed(f"{what}: authentication failed (wrong key, tampered or truncated ciphertext, "
                               "or a token moved from another record)") from None


class FieldCipher:
    """Encrypts and decrypts record fields with the data keys of `keys`."""

    def __init__(self, keys: DataKeys, allow_plaintext: bool = False):
        self.keys = keys
        # Only for reading data written before encryption was switched on (a migration window).
        self.allow_plaintext = allow_plaintext

    def encrypt(self, value: str, *, scope: str, record_id: str, field: str, key_scope: str | None = None) -> str:
        """`key_scope`: whose data key encrypts (default `scope`; a data subject's, for instance);
        the associated data always binds `scope`."""
        key_id, key = self.keys.current(key_scope or scope)
        return seal(key, key_id, value.encode(), associated_data(scope, record_id, field))

    def decrypt(self, value: Any, *, scope: str, record_id: str, field: str) -> Any:
        if not is_token(value):
            if self.allow_plaintext or value in (None, ""):
                return value
            raise NotEncrypted(f"{field} of record {record_id!r} in {scope!r} is not encrypted "
                               "(encryption.allow_plaintext_reads is off)")
        key = self.keys.key(token_key_id(value))
        what = f"{field} of record {record_id!r} in {scope!r}"
        return open_token(key, value, associated_data(scope, record_id, field), what).decode()

    def encrypt_json(self, obj: Any, *, scope: str, record_id: str, field: str) -> str:
        return self.encrypt(json.dumps(obj, separators=(",", ":"), default=str), scope=scope,
                            record_id=record_id, field=field)

    def decrypt_json(self, value: Any, *, scope: str, record_id: str, field: str) -> Any:
        if not is_token(value) and self.allow_plaintext and not isinstance(value, str):
            return value
        return json.loads(self.decrypt(value, scope=scope, record_id=record_id, field=field))

    def encrypt_fields(self, record: dict[str, Any], fields: tuple[str, ...] | list[str], *, scope: str,
                       record_id: str, key_scope: str | None = None) -> dict[str, Any]:
        """A copy of `record` with each present, non-empty string field of `fields` encrypted."""
        out = dict(record)
        for f in fields:
            v = out.get(f)
            if isinstance(v, str) and v and not is_token(v):
                out[f] = self.encrypt(v, scope=scope, record_id=record_id, field=f, key_scope=key_scope)
        return out

    def decrypt_fields(self, record: dict[str, Any], fields: tuple[str, ...] | list[str], *, scope: str,
                       record_id: str) -> dict[str, Any]:
        out = dict(record)
        for f in fields:
            if f in out and out[f] not in (None, ""):
                out[f] = self.decrypt(out[f], scope=scope, record_id=record_id, field=f)
        return out

    def reencrypt(self, token: str, *, scope: str, record_id: str, field: str, key_scope: str | None = None) -> str:
        """The token under its key scope's current data key (data-key rotation); unchanged if it already is."""
        current_id, _ = self.keys.current(key_scope or scope)
        if token_key_id(token) == current_id:
            return token
        return self.encrypt(self.decrypt(token, scope=scope, record_id=record_id, field=field), scope=scope,
                            record_id=record_id, field=field, key_scope=key_scope)
