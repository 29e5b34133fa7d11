"""Directory sync (security/directory.py) against a real slapd on loopback (tests/slapd_server.py):
groups map to roles and teams, a user removed from a group loses the role at the next sync, a
failed sync keeps the last answer; then the DirectoryStore actor and `orfeas directory sync` on
the session's Ray cluster, and a token user's principal taking the synced role."""

import asyncio
import os

import pytest

from config import Settings
from harness import free_port
from security.directory import DirectoryError, read_directory
from slapd_server import ADMIN_DN, ADMIN_PASSWORD, BASE, Slapd, slapd_binary

pytestmark = pytest.mark.skipif(slapd_binary() is None, reason="slapd is not installed (make install adds it)")


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd"), free_port()).start()
    server.seed(["alice", "bob", "carol"], {"orfeas-admins": ["alice"], "staff": ["alice", "bob", "carol"],
                                            "search-team": ["bob"], "unmapped": ["carol"]})
    yield server
    server.stop()


def directory_settings(slapd, tmp_path, auth: dict | None = None, **overrides) -> Settings:
    os.environ["ORFEAS_TEST_LDAP_PASSWORD"] = ADMIN_PASSWORD
    d = {"enabled": True, "url": slapd.url, "bind_dn": ADMIN_DN, "bind_password_env": "ORFEAS_TEST_LDAP_PASSWORD",
         "group_base_dn": f"ou=groups,{BASE}", "interval_s": 3600,
         "groups": [{"group": "orfeas-admins", "role": "admin"}, {"group": "staff", "role": "user"},
                    {"group": "search-team", "team": "search"}], **overrides}
    return Settings(data_dir=tmp_path, ray={"address": "auto"}, auth={"directory": d, **(auth or {})})


def test_groups_map_to_roles_and_teams_and_removal_takes_the_role(slapd, tmp_path):
    s = directory_settings(slapd, tmp_path)
    users = read_directory(s.auth.directory)
    assert users["alice"]["role"] == "admin" and users["bob"] == {"role": "user", "team": "search",
                                                                  "groups": ["search-team", "staff"]}
    assert users["carol"]["role"] == "user" and "unmapped" not in users["carol"]["groups"]
    slapd.remove_member("orfeas-admins", "alice")
    try:
        assert read_directory(s.auth.directory)["alice"]["role"] == "user"
    finally:
        import ldap3

        conn = slapd.connection()
        conn.modify(slapd.group_dn("orfeas-admins"), {"member": [(ldap3.MODIFY_ADD, [slapd.user_dn("alice")])]})
        conn.unbind()


def test_bad_credentials_and_servers_name_what_failed(slapd, tmp_path):
    os.environ["ORFEAS_TEST_LDAP_WRONG"] = "wrong"
    with pytest.raises(DirectoryError, match="cannot bind"):
        read_directory(directory_settings(slapd, tmp_path, bind_password_env="ORFEAS_TEST_LDAP_WRONG").auth.directory)
    with pytest.raises(DirectoryError, match="cannot bind"):
        read_directory(directory_settings(slapd, tmp_path, url=f"ldap://127.0.0.1:{free_port()}",
                                          timeout_s=1).auth.directory)


def test_the_store_actor_syncs_and_the_token_user_loses_the_role(slapd, tmp_path, ray_cluster):
    import ray
    from typer.testing import CliRunner

    from cluster.cli import app as cli
    from security.auth import Authenticator
    from security.directory import directory_store
    from oidc_provider import OidcProvider

    idp = OidcProvider(free_port()).start()
    try:
        s = directory_settings(slapd, tmp_path, auth={"oidc": [idp.settings()], "key_cache_s": 0})
        store = directory_store(s)
        status = ray.get(store.sync.remote())
        assert status["error"] is None and status["users"] == 3
        auth = Authenticator(s)
        p = asyncio.run(auth.authenticate(f"Bearer {idp.token(sub='alice', roles=[])}"))
        assert (p.role, p.key_id) == ("admin", "test:alice")
        slapd.remove_member("orfeas-admins", "alice")
        config = tmp_path / "orfeas.yaml"
        import yaml

        config.write_text(yaml.safe_dump(s.to_dict()))
        result = CliRunner().invoke(cli, ["directory", "sync", "--config", str(config), "--json"])
        assert result.exit_code == 0, result.output
        assert '"users": 3' in result.output
        auth._directory = None  # the replica's view refreshes after key_cache_s (0 here)
        p = asyncio.run(auth.authenticate(f"Bearer {idp.token(sub='alice', roles=[])}"))
        assert p.role == "user"
        # A failed sync keeps the last answer.
        bad = directory_settings(slapd, tmp_path, url=f"ldap://127.0.0.1:{free_port()}", timeout_s=1)
        broken = directory_store(bad)
        ray.get(broken.sync.remote())
        assert ray.get(broken.sync.remote())["error"]
        ray.kill(broken)
        ray.kill(store)
    finally:
        idp.stop()
