"""The `orfeas` CLI as a user runs it, against the session's cluster given as an external address."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import ray
import yaml

ORFEAS = str(Path(sys.executable).with_name("orfeas"))
KEY = re.compile(r"orf_[0-9a-f]{8}_[A-Za-z0-9-]+")


def orfeas(*args, config=None, check=True, key=None):
    cmd = [ORFEAS, *args] + (["--config", str(config)] if config else [])
    env = {**os.environ, "ORFEAS_API_KEY": key} if key else None  # keys|teams|roles: the admin API over HTTP
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    if check:
        assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def config_file(serve_port, tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    path = d / "orfeas.yaml"
    path.write_text(yaml.safe_dump({
        "data_dir": str(d / "data"),
        "ray": {"address": ray.get_runtime_context().gcs_address},
        "serve": {"host": "127.0.0.1", "port": serve_port},
        "auth": {"key_cache_s": 0},
        "rag": {"enabled": False},
        "agents": {"enabled": False},
        "autoscaling": {"enabled": False},  # fixed replica counts, as harness.deployed gives the others
        "models": [{"id": "tiny-chat", "engine": "transformers", "source": str(tiny_model_dir)}],
    }))
    yield path
    orfeas("down", config=path, check=False)


@pytest.fixture(scope="module")
def admin_key(config_file):
    first = orfeas("up", config=config_file)
    assert "Admin API key" in first.stdout and "ready" in first.stdout
    keys = KEY.findall(first.stdout)
    assert len(keys) == 1
    return keys[0]


def models(base, key):
    return httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_up_twice_is_harmless(config_file, admin_key, serve_port):
    base = f"http://127.0.0.1:{serve_port}"
    assert models(base, admin_key).status_code == 200
    again = orfeas("up", config=config_file)
    assert "Admin API key" not in again.stdout  # the admin key is created once, printed once
    assert models(base, admin_key).json()["data"][0]["status"] == "ready"


def test_rag_routes_say_the_service_is_off(admin_key, serve_port):
    """This config has `rag.enabled: false`: the gateway answers the RAG routes with a 404 that says so."""
    for method, path in [("POST", "/v1/rag/query"), ("GET", "/v1/rag/ingest/ingest-1")]:
        r = httpx.request(method, f"http://127.0.0.1:{serve_port}{path}", json={"query": "x"},
                          headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
        assert r.status_code == 404 and "rag.enabled: false" in r.json()["error"]["message"]


def test_status_reports_applications_and_model_health(config_file, admin_key):
    out = json.loads(orfeas("status", "--json", config=config_file).stdout)
    assert out["applications"]["gateway"]["status"] == "RUNNING"
    assert out["applications"]["model-tiny-chat"]["status"] == "RUNNING"
    assert out["models"] == {"tiny-chat": "ready"}
    assert re.fullmatch(r"http://[^/]+:\d+/metrics", out["metrics"]), out["metrics"]  # Ray's export of the node


def test_make_demo_always_leaves_a_working_admin_key(config_file, admin_key):
    """Each `make demo` run makes a fresh demo admin key (and user key), the previous demo keys
    revoked, also when the data directory has an admin key already (this module's `orfeas up`
    made one, printed once): a newcomer re-running the demo is never locked out of admin commands."""
    from cluster.demo import demo_keys
    from config.settings import load_settings
    from security.keys import keystore

    settings = load_settings(config_file)
    store = keystore(settings.resolved_data_dir())
    first_user, first_admin = demo_keys(settings)
    user, admin = demo_keys(settings)
    assert ray.get(store.verify.remote(admin))["role"] == "admin" and ray.get(store.verify.remote(user))
    assert ray.get(store.verify.remote(first_admin)) is None and ray.get(store.verify.remote(first_user)) is None
    assert ray.get(store.verify.remote(admin_key))["role"] == "admin"  # the operator's own key is untouched


def test_keys_create_list_revoke(config_file, admin_key, serve_port):
    base = f"http://127.0.0.1:{serve_port}"
    created = orfeas("keys", "create", "--role", "user", "--models", "tiny-chat", "--name", "ci", config=config_file,
                     key=admin_key)
    key = KEY.findall(created.stdout)[0]
    key_id = key.split("_")[1]
    assert [m["id"] for m in models(base, key).json()["data"]] == ["tiny-chat"]
    listing = orfeas("keys", "list", config=config_file, key=admin_key).stdout
    assert key_id in listing and "tiny-chat" in listing and key not in listing
    orfeas("keys", "revoke", key_id, config=config_file, key=admin_key)
    assert models(base, key).status_code == 401
    assert "revoked" in orfeas("keys", "list", config=config_file, key=admin_key).stdout
    # Without a credential only the bootstrap (keys create on the head machine) works; the rest say how to get one.
    r = orfeas("keys", "list", config=config_file, check=False)
    assert r.returncode == 2 and "no admin credential" in r.stderr
    # A user key is refused by the admin API: its message, not a traceback.
    r = orfeas("keys", "list", config=config_file, check=False, key=KEY.findall(orfeas(
        "keys", "create", "--role", "user", config=config_file, key=admin_key).stdout)[0])
    assert r.returncode == 1 and "keys:read" in r.stderr and "Traceback" not in r.stderr


def test_bad_cli_input_is_refused_without_changes(config_file, admin_key, tmp_path):
    before = orfeas("keys", "list", config=config_file, key=admin_key).stdout
    r = orfeas("keys", "create", "--models", "no-such-model", config=config_file, check=False, key=admin_key)
    assert r.returncode == 2 and "unknown model 'no-such-model'" in r.stderr
    r = orfeas("keys", "create", "--role", "root", config=config_file, check=False, key=admin_key)
    assert r.returncode == 2 and "unknown role 'root'" in r.stderr
    r = orfeas("keys", "create", "--role", "root", config=config_file, check=False)  # the bootstrap checks too
    assert r.returncode == 2 and "--role" in r.stderr
    r = orfeas("keys", "revoke", "deadbeef", config=config_file, check=False, key=admin_key)
    assert r.returncode == 2 and "no key with id 'deadbeef'" in r.stderr and "Traceback" not in r.stderr
    assert orfeas("keys", "list", config=config_file, key=admin_key).stdout == before
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  port: -1\n")
    r = orfeas("status", config=bad, check=False)
    assert r.returncode == 2 and "serve.port" in r.stderr and "greater than or equal to 1" in r.stderr


def test_auth_off_only_on_purpose_and_up_warns(config_file, admin_key, serve_port):
    import os

    base = f"http://127.0.0.1:{serve_port}"
    assert httpx.get(base + "/v1/models", timeout=30).status_code == 401  # on by default
    env = {**os.environ, "ORFEAS_AUTH__ENABLED": "false"}
    r = subprocess.run([ORFEAS, "up", "--config", str(config_file)], capture_output=True, text=True, env=env,
                       timeout=400)
    assert r.returncode == 0, r.stderr
    assert "auth is switched off" in r.stderr
    assert httpx.get(base + "/v1/models", timeout=30).status_code == 200
