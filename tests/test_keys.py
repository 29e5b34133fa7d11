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


def test_bootstrap_secret_is_what_the_gateway_pods_read_and_installs_as_admin(tmp_path):
    """`orfeas keys bootstrap-secret` prints the Secret the RayService's pods reference as
    ORFEAS_BOOTSTRAP_ADMIN_KEY; its key is one KeyStore.install (the gateway's bootstrap) takes."""
    from pathlib import Path

    import yaml
    from typer.testing import CliRunner

    from cluster.cli import app as cli
    from config import Settings

    result = CliRunner().invoke(cli, ["keys", "bootstrap-secret", "-n", "prod"])
    assert result.exit_code == 0, result.output
    secret = yaml.safe_load(result.stdout)
    assert (secret["apiVersion"], secret["kind"], secret["metadata"]["namespace"]) == ("v1", "Secret", "prod")
    # Every reference to it in the manifests names this Secret and this key, as the setting's variable.
    rayservice = (Path(__file__).resolve().parents[1] / "kuberay" / "base" / "rayservice.yaml").read_text()
    refs = [(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in _env_entries(list(yaml.safe_load_all(rayservice))) if e["name"] == Settings().auth.bootstrap_key_env]
    assert refs and set(refs) == {(secret["metadata"]["name"], next(iter(secret["stringData"])))}
    key = secret["stringData"]["api-key"]
    store = KeyStore(str(tmp_path / "keys.json"))
    installed = store.install(key)
    assert installed["role"] == "admin" and store.verify(key)["id"] == installed["id"] and key in result.stdout
    assert installed["installed"] and not store.install(key)["installed"]  # once: the audit entry names the first
    assert installed["id"] in result.stderr and key not in result.stderr
    again = yaml.safe_load(CliRunner().invoke(cli, ["keys", "bootstrap-secret"]).stdout)
    assert again["stringData"]["api-key"] != key and again["metadata"]["namespace"] == "orfeas"


def _env_entries(node):
    if isinstance(node, dict):
        if "valueFrom" in node and "name" in node:
            yield node
        for v in node.values():
            yield from _env_entries(v)
    elif isinstance(node, list):
        for v in node:
            yield from _env_entries(v)


def test_erasure_scrubs_the_user_and_name_of_a_subjects_keys(tmp_path):
    path = tmp_path / "keys.json"
    store = KeyStore(str(path))
    theirs, _ = store.create("user", name="Wombat-Q's laptop", user="wombat-q")
    other, _ = store.create("user", name="ops", user="u-1")
    store.set_user("wombat-q", budget_usd=5)
    assert store.scrub_subject("wombat-q") == [theirs["id"]]
    assert "wombat" not in path.read_text().lower() and "wombat" not in path.with_name("teams.json").read_text()
    again = KeyStore(str(path))
    assert again.get(theirs["id"])["user"] == "" and again.get(theirs["id"])["revoked_at"]
    assert again.get(other["id"]) == store.get(other["id"]) and again.get(other["id"])["user"] == "u-1"
    assert again.scrub_subject("nobody") == []
