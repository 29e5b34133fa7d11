"""Key providers: where the key-encryption key (KEK) lives and how data keys are wrapped by it.

One interface, three providers:

- `LocalKeyProvider` (the default): a KEK from the `ORFEAS_ENCRYPTION_KEY` environment variable
  (the Kubernetes Secret the manifests inject), else a key file `data_dir/keys/kek.json`
  created on first start with mode 0600. Wrapping is AES-256-GCM under the KEK.
- `VaultTransitProvider`: HashiCorp Vault's transit engine through `hvac`; the KEK never
  leaves Vault (encrypt, decrypt, rewrap, rotate are Vault calls).
- `AwsKmsProvider`: AWS KMS's JSON API (Encrypt, Decrypt, ReEncrypt, RotateKeyOnDemand) over
  httpx with Signature Version 4, so no botocore is needed; `endpoint` points it at any
  KMS-compatible service (a VPC endpoint, LocalStack, the tests' loopback stand-in).

A wrapped data key is a JSON-safe dict: {"provider", "kek" (the KEK version that wrapped it),
"blob"}. Providers raise `KeyUnavailable` naming what failed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from security.crypto import KEY_BYTES, NONCE_BYTES, KeyUnavailable

ENV_KEY = "ORFEAS_ENCRYPTION_KEY"
ENV_PREVIOUS = "ORFEAS_ENCRYPTION_KEY_PREVIOUS"  # comma-separated older KEKs, kept readable while rewrapping


def _context_bytes(context: dict[str, str]) -> bytes:
    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


class KeyProvider(ABC):
    name: str

    @abstractmethod
    def wrap(self, data_key: bytes, context: dict[str, str]) -> dict[str, Any]: ...

    @abstractmethod
    def unwrap(self, wrapped: dict[str, Any], context: dict[str, str]) -> bytes: ...

    @abstractmethod
    def current_version(self) -> str: ...

    @abstractmethod
    def rotate(self) -> str:
        """Make a new KEK version current; returns it. Older versions still unwrap."""

    def rewrap(self, wrapped: dict[str, Any], context: dict[str, str]) -> dict[str, Any]:
        """`wrapped` under the current KEK version."""
        return self.wrap(self.unwrap(wrapped, context), context)

    def _check(self, wrapped: dict[str, Any]) -> None:
        if wrapped.get("provider") != self.name:
            raise KeyUnavailable(f"data key was wrapped by provider {wrapped.get('provider')!r}, "
                                 f"but the configured provider is {self.name!r}")


# --- local ----------------------------------------------------------------------------------------

def _kek_from_secret(secret: str) -> bytes:
    """A 32-byte KEK from the Secret's value: base64 or hex of 32 bytes as is, anything else through HKDF."""
    s = secret.strip()
    for decode in (lambda v: base64.b64decode(v, validate=True), bytes.fromhex,
                   lambda v: base64.urlsafe_b64decode(v + "=" * (-len(v) % 4))):
        try:
            raw = decode(s)
        except ValueError:
            continue
        if len(raw) == KEY_BYTES:
            return raw
    if len(s) < 16:
        raise KeyUnavailable(f"{ENV_KEY} is too short: give 32 random bytes (base64 or hex) or a passphrase "
                             "of at least 16 characters")
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=b"orfeas-kek", info=b"orfeas kek v1").derive(s.encode())


def _version_of(kek: bytes) -> str:
    return "local:" + hashlib.sha256(b"orfeas-kek-id" + kek).hexdigest()[:12]


class LocalKeyProvider(KeyProvider):
    name = "local"

    def __init__(self, path: str | Path, secret: str | None = None, previous: str | None = None):
        self.path = Path(path)
        self.from_secret = bool(secret)
        if secret:
            current = _kek_from_secret(secret)
            keks = [current] + [_kek_from_secret(p) for p in (previous or "").split(",") if p.strip()]
            self.keys = {_version_of(k): k for k in keks}
            self.current = _version_of(current)
        else:
            self.keys, self.current = self._load_or_create()

    @classmethod
    def from_environment(cls, path: str | Path) -> "LocalKeyProvider":
        return cls(path, os.environ.get(ENV_KEY) or None, os.environ.get(ENV_PREVIOUS))

    def _load_or_create(self) -> tuple[dict[str, bytes], str]:
        if self.path.exists():
            mode = self.path.stat().st_mode & 0o777
            if mode & 0o077:
                raise KeyUnavailable(f"KEK file {self.path} has mode {oct(mode)}: it must be readable by its "
                                     "owner only (chmod 600)")
            try:
                data = json.loads(self.path.read_text())
                keys = {v: base64.b64decode(k) for v, k in data["keys"].items()}
                current = data["current"]
            except (ValueError, KeyError, TypeError) as e:
                raise KeyUnavailable(f"KEK file {self.path} is unreadable: {type(e).__name__}: {e}") from e
            if current not in keys:
                raise KeyUnavailable(f"KEK file {self.path}: current version {current!r} is not in it")
            return keys, current
        kek = os.urandom(KEY_BYTES)
        keys, current = {_version_of(kek): kek}, _version_of(kek)
        self._save(keys, current)
        return keys, current

    def _save(self, keys: dict[str, bytes], current: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        payload = json.dumps({"current": current, "keys": {v: base64.b64encode(k).decode() for v, k in keys.items()}})
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kek.")  # mkstemp files are 0600
        with os.fdopen(fd, "w") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def current_version(self) -> str:
        return self.current

    def wrap(self, data_key: bytes, context: dict[str, str]) -> dict[str, Any]:
        nonce = os.urandom(NONCE_BYTES)
        blob = nonce + AESGCM(self.keys[self.current]).encrypt(nonce, data_key, _context_bytes(context))
        return {"provider": self.name, "kek": self.current, "blob": base64.b64encode(blob).decode()}

    def unwrap(self, wrapped: dict[str, Any], context: dict[str, str]) -> bytes:
        self._check(wrapped)
        kek = self.keys.get(wrapped.get("kek", ""))
        if kek is None:
            where = f"{ENV_KEY} (or {ENV_PREVIOUS})" if self.from_secret else str(self.path)
            raise KeyUnavailable(f"KEK version {wrapped.get('kek')!r} that wrapped this data key is not in {where}")
        raw = base64.b64decode(wrapped["blob"])
        try:
            return AESGCM(kek).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _context_bytes(context))
        except InvalidTag:
            raise KeyUnavailable(f"KEK {wrapped.get('kek')!r} did not unwrap the data key for {context} "
                                 "(wrong key or a tampered key ring)") from None

    def rotate(self) -> str:
        if self.from_secret:
            raise KeyUnavailable(f"the KEK comes from {ENV_KEY}: rotate by putting the new key in {ENV_KEY} and the "
                                 f"old one in {ENV_PREVIOUS}, restarting, then running `orfeas keys rotate-kek`")
        kek = os.urandom(KEY_BYTES)
        keys, current = {**self.keys, _version_of(kek): kek}, _version_of(kek)
        self._save(keys, current)  # on disk first
        self.keys, self.current = keys, current
        return current


# --- Vault transit --------------------------------------------------------------------------------

class VaultTransitProvider(KeyProvider):
    name = "vault"

    def __init__(self, url: str, token: str, key_name: str = "orfeas", mount_point: str = "transit",
                 namespace: str | None = None, verify: bool | str = True, timeout_s: float = 10.0):
        import hvac

        if not token:
            raise KeyUnavailable("Vault transit needs a token (encryption.vault.token_env names its variable)")
        self.client = hvac.Client(url=url, token=token, namespace=namespace, verify=verify, timeout=timeout_s)
        self.key_name, self.mount = key_name, mount_point

    def _call(self, what: str, fn, **kw):
        import hvac.exceptions

        try:
            return fn(name=self.key_name, mount_point=self.mount, **kw)
        except hvac.exceptions.VaultError as e:
            raise KeyUnavailable(f"Vault transit {what} of key {self.key_name!r} failed: {type(e).__name__}: {e}") from e
        except OSError as e:  # connection refused, DNS, TLS
            raise KeyUnavailable(f"Vault at {self.client.url} is unreachable ({what}): {e}") from e

    @staticmethod
    def _version(ciphertext: str) -> str:
        return "vault:" + ciphertext.split(":")[1]  # vault:v3:... -> vault:v3

    def current_version(self) -> str:
        data = self._call("read", self.client.secrets.transit.read_key)
        return f"vault:v{data['data']['latest_version']}"

    def wrap(self, data_key: bytes, context: dict[str, str]) -> dict[str, Any]:
        r = self._call("encrypt", self.client.secrets.transit.encrypt_data,
                       plaintext=base64.b64encode(data_key).decode())
        ct = r["data"]["ciphertext"]
        return {"provider": self.name, "kek": self._version(ct), "blob": ct}

    def unwrap(self, wrapped: dict[str, Any], context: dict[str, str]) -> bytes:
        self._check(wrapped)
        r = self._call("decrypt", self.client.secrets.transit.decrypt_data, ciphertext=wrapped["blob"])
        return base64.b64decode(r["data"]["plaintext"])

    def rewrap(self, wrapped: dict[str, Any], context: dict[str, str]) -> dict[str, Any]:
        self._check(wrapped)  # Vault rewraps without the data key ever leaving it
        r = self._call("rewrap", self.client.secrets.transit.rewrap_data, ciphertext=wrapped["blob"])
        ct = r["data"]["ciphertext"]
        return {"provider": self.name, "kek": self._version(ct), "blob": ct}

    def rotate(self) -> str:
        self._call("rotate", self.client.secrets.transit.rotate_key)
        return self.current_version()


# --- AWS KMS --------------------------------------------------------------------------------------

def sigv4_headers(*, method: str, url: str, body: bytes, headers: dict[str, str], region: str, service: str,
                  access_key: str, secret_key: str, session_token: str | None = None,
                  now: dt.datetime | None = None) -> dict[str, str]:
    """`headers` plus X-Amz-Date (and the session token) and an AWS Signature Version 4 Authorization."""
    from urllib.parse import urlsplit

    now = now or dt.datetime.now(dt.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    u = urlsplit(url)
    out = {**headers, "host": u.netloc, "x-amz-date": amz_date}
    if session_token:
        out["x-amz-security-token"] = session_token
    lower = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
    signed = ";".join(sorted(lower))
    canonical = "\n".join([method, u.path or "/", u.query, "".join(f"{k}:{lower[k]}\n" for k in sorted(lower)),
                           signed, hashlib.sha256(body).hexdigest()])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = hmac.new(("AWS4" + secret_key).encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={sig}"
    return out


class AwsKmsProvider(KeyProvider):
    name = "aws-kms"

    def __init__(self, key_id: str, region: str, endpoint: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, session_token: str | None = None, timeout_s: float = 10.0):
        self.key_id, self.region = key_id, region
        self.endpoint = (endpoint or f"https://kms.{region}.amazonaws.com").rstrip("/") + "/"
        self.access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID", "")
        self.secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        self.session_token = session_token or os.environ.get("AWS_SESSION_TOKEN")
        if not (self.access_key and self.secret_key):
            raise KeyUnavailable("AWS KMS needs credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        self.timeout_s = timeout_s

    def _call(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        data = json.dumps(body).encode()
        headers = sigv4_headers(method="POST", url=self.endpoint, body=data, region=self.region, service="kms",
                                access_key=self.access_key, secret_key=self.secret_key,
                                session_token=self.session_token,
                                headers={"content-type": "application/x-amz-json-1.1",
                                         "x-amz-target": f"TrentService.{action}"})
        try:
            r = httpx.post(self.endpoint, content=data, headers=headers, timeout=self.timeout_s)
        except httpx.HTTPError as e:
            raise KeyUnavailable(f"AWS KMS at {self.endpoint} is unreachable ({action}): {e}") from e
        if r.status_code != 200:
            try:
                err = r.json()
                detail = f"{err.get('__type', '')}: {err.get('message') or err.get('Message') or ''}"
            except ValueError:
                detail = r.text[:200]
            raise KeyUnavailable(f"AWS KMS {action} on key {self.key_id!r} failed ({r.status_code}): {detail}")
        return r.json()

    def current_version(self) -> str:
        return "kms:" + self.key_id

    def wrap(self, data_key: bytes, context: dict[str, str]) -> dict[str, Any]:
        r = self._call("Encrypt", {"KeyId": self.key_id, "Plaintext": base64.b64encode(data_key).decode(),
                                   "EncryptionContext": context})
        return {"provider": self.name, "kek": "kms:" + r.get("KeyId", self.key_id), "blob": r["CiphertextBlob"]}

    def unwrap(self, wrapped: dict[str, Any], context: dict[str, str]) -> bytes:
        self._check(wrapped)
        r = self._call("Decrypt", {"CiphertextBlob": wrapped["blob"], "EncryptionContext": context,
                                   "KeyId": wrapped["kek"].removeprefix("kms:")})
        return base64.b64decode(r["Plaintext"])

    def rewrap(self, wrapped: dict[str, Any], context: dict[str, str]) -> dict[str, Any]:
        self._check(wrapped)  # ReEncrypt: KMS decrypts and re-encrypts inside itself
        r = self._call("ReEncrypt", {"CiphertextBlob": wrapped["blob"], "SourceEncryptionContext": context,
                                     "DestinationKeyId": self.key_id, "DestinationEncryptionContext": context})
        return {"provider": self.name, "kek": "kms:" + r.get("KeyId", self.key_id), "blob": r["CiphertextBlob"]}

    def rotate(self) -> str:
        self._call("RotateKeyOnDemand", {"KeyId": self.key_id})
        return self.current_version()


def provider_from_settings(settings) -> KeyProvider:
    """The configured key provider (settings.encryption.provider)."""
    e = settings.encryption
    if e.provider == "vault":
        v = e.vault
        return VaultTransitProvider(v.url, os.environ.get(v.token_env, ""), v.key_name, v.mount_point,
                                    v.namespace or None, v.ca_file or True)
    if e.provider == "aws-kms":
        a = e.aws_kms
        return AwsKmsProvider(a.key_id, a.region, a.endpoint or None)
    return LocalKeyProvider.from_environment(settings.resolved_data_dir() / "keys" / "kek.json")
