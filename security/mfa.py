"""TOTP second factor for admin API keys (pyotp), for deployments without an identity provider.

Enrolment gives a base32 secret (and an otpauth:// URI for authenticator apps) and one-time
recovery codes. At rest the secret is encrypted with the session key (security/sessions.py) and
recovery codes are kept only as SHA-256 hashes (each is 80 random bits). A code is accepted once:
the last used time step is remembered, so a code seen on the wire cannot be replayed. A request
proves the factor with the `x-orfeas-otp` header (a current code or an unused recovery code).
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

import pyotp
from cryptography.fernet import Fernet

from config import Settings
from config.actors import detached_actor
from models.errors import AuthenticationFailed

OTP_HEADER = "x-orfeas-otp"


class MfaRequired(AuthenticationFailed):
    code = "mfa_required"


def _hash(code: str) -> str:
    return hashlib.sha256(code.replace("-", "").lower().encode()).hexdigest()


def new_recovery_codes(n: int) -> list[str]:
    return [f"{secrets.token_hex(5)[:5]}-{secrets.token_hex(5)[:5]}" for _ in range(n)]


class MfaStore:
    """The TOTP enrolments, one file under the data directory; run as a detached actor (`mfa_store`)."""

    def __init__(self, path: str, key: bytes, issuer_name: str = "ORFEAS", recovery_codes: int = 10):
        self.path = Path(path)
        self.fernet = Fernet(key)
        self.issuer_name, self.n_codes = issuer_name, recovery_codes
        self.records: dict[str, dict] = json.loads(self.path.read_text())["enrolments"] if self.path.exists() else {}

    def _save(self, records: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".mfa.")
        with os.fdopen(fd, "w") as f:
            json.dump({"enrolments": records}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        self.records = records

    def enrol(self, key_id: str, label: str = "") -> dict:
        """A new secret and recovery codes for `key_id` (replacing an earlier enrolment); shown once."""
        secret = pyotp.random_base32()
        codes = new_recovery_codes(self.n_codes)
        record = {"secret": self.fernet.encrypt(secret.encode()).decode(), "recovery": [_hash(c) for c in codes],
                  "last_step": -1, "enrolled_at": time.time()}
        self._save({**self.records, key_id: record})
        uri = pyotp.TOTP(secret).provisioning_uri(name=label or key_id, issuer_name=self.issuer_name)
        return {"key_id": key_id, "secret": secret, "otpauth_uri": uri, "recovery_codes": codes}

    def enrolled(self, key_id: str) -> bool:
        return key_id in self.records

    def verify(self, key_id: str, code: str) -> bool:
        """Whether `code` is a current TOTP code (not used before) or an unused recovery code."""
        record = self.records.get(key_id)
        if record is None or not code or len(code) > 32:
            return False
        if code.isdigit():
            totp = pyotp.TOTP(self.fernet.decrypt(record["secret"].encode()).decode())
            now = time.time()
            for drift in (0, -1, 1):  # one step of clock skew either way
                step = int(now // totp.interval) + drift
                if step > record["last_step"] and hmac.compare_digest(totp.generate_otp(step), code):
                    self._save({**self.records, key_id: {**record, "last_step": step}})
                    return True
            return False
        digest = _hash(code)
        if digest in record["recovery"]:
            rest = [h for h in record["recovery"] if h != digest]
            self._save({**self.records, key_id: {**record, "recovery": rest}})
            return True
        return False

    def recovery_left(self, key_id: str) -> int:
        return len(self.records.get(key_id, {}).get("recovery", []))

    def remove(self, key_id: str) -> bool:
        if key_id not in self.records:
            return False
        self._save({k: v for k, v in self.records.items() if k != key_id})
        return True


def mfa_store(settings: Settings):
    """The cluster's TOTP enrolment actor for this data directory."""
    from security.sessions import session_key

    path = settings.resolved_data_dir() / "auth" / "mfa.json"
    name = "orfeas-mfa-" + hashlib.sha1(str(path).encode()).hexdigest()[:10]
    m = settings.auth.mfa
    return detached_actor(MfaStore, name, str(path), session_key(settings), m.issuer_name, m.recovery_codes,
                          durable=True)
