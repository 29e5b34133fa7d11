"""Browser sessions: an encrypted, authenticated cookie (Fernet from `cryptography`) that carries
the principal a sign-in produced (OIDC or SAML), so every replica accepts it without a lookup.

A session value is `orfs.<fernet token>`: one dot, so the Authenticator tells it apart from a JWT
(two dots) and an API key (none). The key comes from `auth.session.secret_env` (Kubernetes: a
Secret) or, on one machine, from a file generated once under `data_dir/auth/session.key`.
Short-lived sign-in state (PKCE verifier, nonce, state) travels in a second cookie sealed the
same way, so the callback may land on any replica.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from config import Settings
from models.errors import AuthenticationFailed

SESSION_PREFIX = "orfs."
LOGIN_STATE_COOKIE = "orfeas_login"
LOGIN_STATE_TTL_S = 600


class SessionRejected(AuthenticationFailed):
    code = "invalid_session"


def looks_like_session(credential: str) -> bool:
    return credential.startswith(SESSION_PREFIX)


def _key_from_secret(secret: str) -> bytes:
    return base64.urlsafe_b64encode(hashlib.sha256(b"orfeas-session\0" + secret.encode()).digest())


def session_key(settings: Settings) -> bytes:
    """The Fernet key: from the environment when set, else the data directory's key file."""
    secret = os.environ.get(settings.auth.session.secret_env, "")
    if secret:
        return _key_from_secret(secret)
    path = settings.resolved_data_dir() / "auth" / "session.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two replicas starting together agree on the first one's key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        except FileExistsError:
            pass
    for _ in range(50):  # the other writer may not have written yet
        data = Path(path).read_bytes().strip()
        if data:
            return data
        time.sleep(0.01)
    raise RuntimeError(f"session key file {path} is empty")


class SessionCodec:
    def __init__(self, settings: Settings):
        self.fernet = Fernet(session_key(settings))
        self.ttl_s = settings.auth.session.ttl_s

    def seal(self, data: dict[str, Any]) -> str:
        return SESSION_PREFIX + self.fernet.encrypt(json.dumps(data, separators=(",", ":")).encode()).decode()

    def open(self, value: str, ttl_s: float | None = None) -> dict[str, Any]:
        if not looks_like_session(value):
            raise SessionRejected("not a session value")
        try:
            raw = self.fernet.decrypt(value[len(SESSION_PREFIX):].encode(), ttl=int(ttl_s or self.ttl_s))
        except InvalidToken:
            raise SessionRejected("session is invalid or has expired: sign in again") from None
        data = json.loads(raw)
        if data.get("exp") is not None and time.time() > data["exp"]:
            raise SessionRejected("session has expired: sign in again")
        return data


def cookie_flags(settings: Settings, over_tls: bool) -> dict[str, Any]:
    """Set-Cookie attributes: HttpOnly, SameSite=Lax, Secure when over TLS (or always/never)."""
    mode = settings.auth.session.secure
    secure = over_tls if mode == "auto" else mode == "always"
    return {"httponly": True, "samesite": "lax", "secure": secure, "path": "/"}
