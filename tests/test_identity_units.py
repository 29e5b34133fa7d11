"""Pure parts of identity, no Ray and no servers: sealed sessions, cookie flags, the TOTP store
(enrolment, replay, recovery codes hashed at rest), role picking, and open-redirect protection."""

import json
import time

import pyotp
import pytest

from config import Settings
from security.mfa import MfaStore
from security.oidc import pick_role
from security.sessions import SessionCodec, SessionRejected, cookie_flags, session_key
from security.sso import pkce_pair, safe_next


def test_sessions_round_trip_and_refuse_tampering_and_expiry(tmp_path):
    s = Settings(data_dir=tmp_path)
    codec = SessionCodec(s)
    value = codec.seal({"key_id": "t:alice", "role": "user", "exp": time.time() + 60})
    assert value.startswith("orfs.") and value.count(".") == 1
    assert codec.open(value)["key_id"] == "t:alice"
    tampered = value[:-6] + ("A" if value[-6] != "A" else "B") + value[-5:]
    with pytest.raises(SessionRejected, match="invalid or has expired"):
        codec.open(tampered)
    with pytest.raises(SessionRejected, match="expired"):
        codec.open(codec.seal({"key_id": "t:alice", "role": "user", "exp": time.time() - 1}))
    # Another data directory (another key) cannot open it.
    with pytest.raises(SessionRejected):
        SessionCodec(Settings(data_dir=tmp_path / "other")).open(value)
    assert (tmp_path / "auth" / "session.key").stat().st_mode & 0o777 == 0o600


def test_session_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ORFEAS_SESSION_SECRET", "from-a-kubernetes-secret")
    a, b = session_key(Settings(data_dir=tmp_path / "a")), session_key(Settings(data_dir=tmp_path / "b"))
    assert a == b and not (tmp_path / "a" / "auth" / "session.key").exists()


def test_cookie_flags():
    s = Settings()
    assert cookie_flags(s, over_tls=False) == {"httponly": True, "samesite": "lax", "secure": False, "path": "/"}
    assert cookie_flags(s, over_tls=True)["secure"] is True
    assert cookie_flags(Settings(auth={"session": {"secure": "always"}}), over_tls=False)["secure"] is True


def test_totp_enrolment_verification_replay_and_recovery(tmp_path):
    from cryptography.fernet import Fernet

    path = tmp_path / "mfa.json"
    key = Fernet.generate_key()
    store = MfaStore(str(path), key, "ORFEAS", 3)
    assert not store.enrolled("k1") and not store.verify("k1", "123456")
    e = store.enrol("k1", "ops key")
    assert store.enrolled("k1") and len(e["recovery_codes"]) == 3 and "issuer=ORFEAS" in e["otpauth_uri"]
    totp = pyotp.TOTP(e["secret"])
    code = totp.now()
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    assert not store.verify("k1", wrong)
    assert store.verify("k1", code)
    assert not store.verify("k1", code)  # replay
    earlier = totp.at(time.time() - 30)
    assert not store.verify("k1", earlier)  # an older step than the one used
    stored = path.read_text()
    assert e["secret"] not in stored and all(c not in stored for c in e["recovery_codes"])
    rc = e["recovery_codes"][1]
    assert store.verify("k1", rc.upper()) and not store.verify("k1", rc) and store.recovery_left("k1") == 2
    # A restarted store (the actor restarting) reads its file: used codes stay used.
    again = MfaStore(str(path), key, "ORFEAS", 3)
    assert not again.verify("k1", rc) and not again.verify("k1", code) and again.verify("k1", e["recovery_codes"][2])
    assert json.loads(path.read_text())["enrolments"]["k1"]["last_step"] >= 0
    assert again.remove("k1") and not again.enrolled("k1")


def test_pick_role_by_priority_and_map():
    prio = ["admin", "developer", "user", "auditor", "viewer"]
    assert pick_role(["staff", "ops"], {"ops": "admin", "staff": "user"}, prio, "viewer") == "admin"
    assert pick_role(["guest"], {"ops": "admin"}, prio, "viewer") == "viewer"
    assert pick_role(["user", "admin"], {}, prio, "") == "admin"
    assert pick_role(["custom-role"], {}, prio, "") == "custom-role"
    assert pick_role([], {}, prio, "") == ""


@pytest.mark.parametrize("path,ok", [("/console", True), ("/v1/models?x=1", True), ("//evil.example", False),
                                     ("https://evil.example", False), ("/\\evil.example", False),
                                     ("console", False)])
def test_sign_in_only_returns_to_same_site_paths(path, ok):
    assert (safe_next(path) == path) is ok


def test_pkce_pair_is_s256():
    import base64
    import hashlib

    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    assert challenge == base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def test_verified_token_cache_deadline_lru_and_off():
    from config.settings import OidcIssuerSettings
    from security.oidc import VerifiedToken, VerifiedTokenCache

    issuer = OidcIssuerSettings(issuer="http://idp", audience="a")
    tok = lambda exp: VerifiedToken(issuer, {"exp": exp})  # noqa: E731
    cache = VerifiedTokenCache(max_entries=2, ttl_s=5)
    d = [VerifiedTokenCache.digest(f"t{i}") for i in range(4)]
    assert d[0] != d[1] and len(d[0]) == 32
    cache.put(d[0], tok(1000 + 60), 1, now=1000)  # lives to min(exp, now + ttl) = 1005
    cache.put(d[1], tok(1002), 1, now=1000)  # its exp comes first: 1002
    assert cache.get(d[0], 1004.9).deadline == 1005 and cache.get(d[1], 1001).deadline == 1002
    assert cache.get(d[1], 1002) is None and len(cache) == 1  # lapsed: dropped
    cache.put(d[1], tok(2000), 1, now=1000)
    cache.get(d[0], 1001)  # d[0] is now the most recently used
    cache.put(d[2], tok(2000), 1, now=1001)  # over the bound: d[1], the least recently used, goes
    assert cache.get(d[1], 1001) is None and cache.get(d[0], 1001) and cache.get(d[2], 1001)
    cache.put(d[3], tok(999), 1, now=1000)  # accepted in the leeway past exp: never kept
    assert cache.get(d[3], 1000) is None
    cache.drop(d[0])
    assert cache.get(d[0], 1001) is None
    assert not VerifiedTokenCache(0, 5).enabled and not VerifiedTokenCache(10, 0).enabled
    off = VerifiedTokenCache(0, 5)
    off.put(d[0], tok(2000), 1, now=1000)
    assert len(off) == 0
