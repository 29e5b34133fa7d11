"""API keys: shown once, stored only as hashes, written atomically, revocable."""

import json

import pytest

from security.keys import KeyStore, hash_key


def test_create_verify_and_store_only_hashes(tmp_path):
    store = KeyStore(str(tmp_path / "keys.json"))
    record, key = store.create("user", ["tiny-chat"], "ci")
    assert key.startswith(f"orf_{record['id']}_")
    on_disk = (tmp_path / "keys.json").read_text()
    assert key not in on_disk and hash_key(key) in on_disk
    assert store.verify(key)["models"] == ["tiny-chat"]
    assert store.verify(key + "x") is None
    assert store.verify("orf_nope_nope") is None and store.verify("garbage") is None
    # A second store over the same file sees the same keys.
    assert KeyStore(str(tmp_path / "keys.json")).verify(key)["id"] == record["id"]


def test_revoke_and_admin_presence(tmp_path):
    store = KeyStore(str(tmp_path / "keys.json"))
    assert not store.has_admin()
    admin, admin_key = store.create("admin")
    assert store.has_admin()
    store.revoke(admin["id"])
    assert store.verify(admin_key) is None and not store.has_admin()
    with pytest.raises(KeyError):
        store.revoke("unknown")


def test_bad_role_changes_nothing(tmp_path):
    path = tmp_path / "keys.json"
    store = KeyStore(str(path))
    store.create("user")
    before = path.read_text()
    with pytest.raises(ValueError, match="role"):
        store.create("root")
    assert path.read_text() == before and len(json.loads(before)["keys"]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keys.")]  # no temp files left
