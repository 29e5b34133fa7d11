"""Field encryption, the key ring and the three key providers (Vault and KMS through loopback
stand-ins). No Ray: the key ring runs in the test process."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kms_servers import AwsKms, VaultTransit  # noqa: E402

from security.crypto import (DecryptionFailed, FieldCipher, KeyUnavailable, NotEncrypted,  # noqa: E402
                             is_token, token_key_id)
from security.keyproviders import AwsKmsProvider, LocalKeyProvider, VaultTransitProvider  # noqa: E402
from security.keyring import KeyRing  # noqa: E402


def ring(tmp_path: Path, provider=None, events=None) -> KeyRing:
    provider = provider or LocalKeyProvider(tmp_path / "keys" / "kek.json")
    return KeyRing(tmp_path / "keys" / "datakeys.json", provider,
                   (lambda a, d: events.append((a, d))) if events is not None else None)


def test_round_trip_fresh_nonce_and_binding(tmp_path):
    c = FieldCipher(ring(tmp_path))
    a = c.encrypt("the flamingo sentence", scope="collection:docs", record_id="d#0", field="text")
    b = c.encrypt("the flamingo sentence", scope="collection:docs", record_id="d#0", field="text")
    assert is_token(a) and a != b and "flamingo" not in a  # a fresh nonce per record
    assert c.decrypt(a, scope="collection:docs", record_id="d#0", field="text") == "the flamingo sentence"
    # The associated data binds record, field and scope: a moved token does not decrypt.
    for where in ({"scope": "collection:docs", "record_id": "d#1", "field": "text"},
                  {"scope": "collection:docs", "record_id": "d#0", "field": "title"},
                  {"scope": "collection:other", "record_id": "d#0", "field": "text"}):
        with pytest.raises(DecryptionFailed, match="authentication failed"):
            c.decrypt(a, **where)


def test_bad_ciphertexts_are_named_errors(tmp_path):
    c = FieldCipher(ring(tmp_path))
    t = c.encrypt("secret", scope="collection:docs", record_id="r", field="text")
    where = dict(scope="collection:docs", record_id="r", field="text")
    with pytest.raises(DecryptionFailed, match="truncated"):
        c.decrypt(t[:len("orfenc1:") + len(token_key_id(t)) + 1 + 20], **where)
    tampered = t[:-3] + ("A" if t[-3] != "A" else "B") + t[-2:]
    with pytest.raises(DecryptionFailed, match="text of record 'r'"):
        c.decrypt(tampered, **where)
    with pytest.raises(NotEncrypted, match="not encrypted"):
        c.decrypt("plain words", **where)
    assert FieldCipher(c.keys, allow_plaintext=True).decrypt("plain words", **where) == "plain words"
    with pytest.raises(KeyUnavailable, match="not in the key ring"):
        c.decrypt(t.replace(token_key_id(t), "dk-0000000000000000"), **where)


def test_wrong_kek_cannot_unwrap(tmp_path):
    r = ring(tmp_path)
    key_id, _ = r.current("collection:docs")
    other = LocalKeyProvider(tmp_path / "other" / "kek.json")
    again = KeyRing(tmp_path / "keys" / "datakeys.json", other)
    with pytest.raises(KeyUnavailable, match="KEK version .* is not in"):
        again.key(key_id)


def test_local_kek_file_is_private_and_refused_when_not(tmp_path):
    p = LocalKeyProvider(tmp_path / "keys" / "kek.json")
    mode = stat.S_IMODE(os.stat(p.path).st_mode)
    assert mode == 0o600
    assert LocalKeyProvider(p.path).current_version() == p.current_version()  # read back, not recreated
    os.chmod(p.path, 0o644)
    with pytest.raises(KeyUnavailable, match="chmod 600"):
        LocalKeyProvider(p.path)


def test_kek_from_the_kubernetes_secret(tmp_path):
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYg=="  # base64 of 32 bytes
    p = LocalKeyProvider(tmp_path / "kek.json", secret)
    assert not (tmp_path / "kek.json").exists()  # the Secret is the KEK: no file
    r = KeyRing(tmp_path / "datakeys.json", p)
    key_id, dk = r.current("collection:docs")
    # The next start with the same Secret reads the key; a new Secret with the old one as previous too.
    assert KeyRing(tmp_path / "datakeys.json", LocalKeyProvider(tmp_path / "kek.json", secret)).key(key_id) == dk
    rotated = LocalKeyProvider(tmp_path / "kek.json", "a brand new passphrase of some length", previous=secret)
    r2 = KeyRing(tmp_path / "datakeys.json", rotated)
    assert r2.key(key_id) == dk
    with pytest.raises(KeyUnavailable, match="rotate by putting the new key"):
        rotated.rotate()
    with pytest.raises(KeyUnavailable, match="too short"):
        LocalKeyProvider(tmp_path / "kek.json", "short")


def test_kek_rotation_rewraps_online_and_is_audited(tmp_path):
    events = []
    r = ring(tmp_path, events=events)
    c = FieldCipher(r)
    t = c.encrypt("kept", scope="collection:docs", record_id="x", field="text")
    before = json.loads((tmp_path / "keys" / "datakeys.json").read_text())
    out = r.rotate_kek()
    after = json.loads((tmp_path / "keys" / "datakeys.json").read_text())
    assert out["rewrapped"] == 1 and out["from"] != out["to"]
    k = token_key_id(t)
    assert before["keys"][k]["wrapped"]["kek"] == out["from"] and after["keys"][k]["wrapped"]["kek"] == out["to"]
    # A fresh process (no cached keys) still decrypts: the data key was rewrapped, the data untouched.
    fresh = FieldCipher(ring(tmp_path))
    assert fresh.decrypt(t, scope="collection:docs", record_id="x", field="text") == "kept"
    assert [a for a, _ in events] == ["key.create", "key.rotate_kek"]


def test_data_key_rotation_reencrypt_destroy_and_shred(tmp_path):
    events = []
    r = ring(tmp_path, events=events)
    c = FieldCipher(r)
    where = dict(scope="collection:docs", record_id="x", field="text")
    t = c.encrypt("old", **where)
    rot = r.rotate_data_key("collection:docs")
    assert rot["retired"] == token_key_id(t)
    assert c.decrypt(t, **where) == "old"  # retired keys still decrypt
    t2 = c.reencrypt(t, **where)
    assert token_key_id(t2) == rot["key_id"] and c.decrypt(t2, **where) == "old"
    r.destroy(rot["retired"])
    with pytest.raises(KeyUnavailable, match="crypto-shredded"):
        FieldCipher(ring(tmp_path)).decrypt(t, **where)
    with pytest.raises(ValueError, match="current key"):
        r.destroy(rot["key_id"])
    # Shredding a data subject: its data is gone for good, and nothing new is written under it.
    s = c.encrypt("subject data", scope="collection:docs", record_id="y", field="text", key_scope="subject:42")
    r.shred("subject:42")
    with pytest.raises(KeyUnavailable, match="crypto-shredded"):
        FieldCipher(ring(tmp_path)).decrypt(s, scope="collection:docs", record_id="y", field="text")
    with pytest.raises(KeyUnavailable, match="crypto-shredded"):
        r.current("subject:42")
    assert "subject data" not in (tmp_path / "keys" / "datakeys.json").read_text()
    assert {"key.create", "key.rotate_data_key", "key.destroy", "key.shred"} <= {a for a, _ in events}


def test_vault_transit_provider_against_stand_in(tmp_path):
    vault = VaultTransit().start()
    try:
        p = VaultTransitProvider(vault.url, vault.token, key_name="orfeas")
        r = ring(tmp_path, p)
        c = FieldCipher(r)
        t = c.encrypt("vaulted", scope="collection:docs", record_id="x", field="text")
        paths = [(q["method"], q["path"]) for q in vault.requests]
        assert paths == [("POST", "/v1/transit/encrypt/orfeas")]
        assert all(q["token"] == vault.token for q in vault.requests)
        wrapped = json.loads((tmp_path / "keys" / "datakeys.json").read_text())["keys"][token_key_id(t)]["wrapped"]
        assert wrapped["provider"] == "vault" and wrapped["kek"] == "vault:v1" and wrapped["blob"].startswith("vault:v1:")
        out = r.rotate_kek()
        assert out == {"from": "vault:v1", "to": "vault:v2", "rewrapped": 1}
        assert ("POST", "/v1/transit/rewrap/orfeas") in [(q["method"], q["path"]) for q in vault.requests]
        fresh = FieldCipher(ring(tmp_path, VaultTransitProvider(vault.url, vault.token, key_name="orfeas")))
        assert fresh.decrypt(t, scope="collection:docs", record_id="x", field="text") == "vaulted"
        assert vault.requests[-1]["path"] == "/v1/transit/decrypt/orfeas"
        with pytest.raises(KeyUnavailable, match="Vault transit decrypt"):
            ring(tmp_path, VaultTransitProvider(vault.url, "wrong-token", key_name="orfeas")).key(token_key_id(t))
    finally:
        vault.stop()
    with pytest.raises(KeyUnavailable, match="unreachable|failed"):
        ring(tmp_path, VaultTransitProvider(vault.url, vault.token, key_name="orfeas")).key(token_key_id(t))


def test_aws_kms_provider_against_stand_in(tmp_path):
    kms = AwsKms("arn:aws:kms:eu-west-1:111122223333:key/test", "AKIDTEST", "secret/key+1", "eu-west-1").start()
    try:
        def provider(secret="secret/key+1"):
            return AwsKmsProvider(kms.key_id, "eu-west-1", kms.url, "AKIDTEST", secret)

        r = ring(tmp_path, provider())
        c = FieldCipher(r)
        t = c.encrypt("kms sealed", scope="collection:docs", record_id="x", field="text")
        enc = kms.requests[0]
        assert enc["target"] == "TrentService.Encrypt" and enc["content_type"] == "application/x-amz-json-1.1"
        assert enc["body"]["KeyId"] == kms.key_id
        assert enc["body"]["EncryptionContext"] == {"orfeas_key_id": token_key_id(t), "orfeas_scope": "collection:docs"}
        assert r.rotate_kek()["rewrapped"] == 1
        assert [q["target"] for q in kms.requests[1:]] == ["TrentService.RotateKeyOnDemand", "TrentService.ReEncrypt"]
        fresh = FieldCipher(ring(tmp_path, provider()))
        assert fresh.decrypt(t, scope="collection:docs", record_id="x", field="text") == "kms sealed"
        assert kms.requests[-1]["target"] == "TrentService.Decrypt"
        with pytest.raises(KeyUnavailable, match="InvalidSignatureException"):
            ring(tmp_path, provider("wrong secret")).key(token_key_id(t))
    finally:
        kms.stop()
