"""Identity, access and limits on a live platform with two gateway replicas: rate limits and
budgets that hold across both, the admin API, RBAC and key scopes over HTTP, and in-cluster
calls that carry the caller's principal (never an internal admin)."""

import asyncio
import time

import httpx
import pytest
import ray

from harness import deployed, platform_settings, remote_model
from security.keys import keystore

ECHO, PAID, CONST = "echo", "paid", "toolbox"
FLAKY, CAPPED = "flaky", "capped"  # flaky always fails over to capped, which has its own rate limit
BUDGET_USD = 0.2
STREAMS = 200


@pytest.fixture(scope="module")
def platform(serve_port, provider, tmp_path_factory):
    settings = platform_settings(
        tmp_path_factory.mktemp("access-data"), serve_port,
        gateway={"num_replicas": 2, "max_ongoing_requests": 200},
        limits={"max_tokens": 16},
        auth={"roles": {"keymaster": {"permissions": ["keys:manage", "keys:read"], "inherits": ["user"]}}},
        rate_limits={"key": {"requests_per_minute": 100_000, "tokens_per_minute": 100_000_000, "concurrent": 1000},
                     "models": {CAPPED: {"requests_per_minute": 2}}},
        models=[remote_model(provider, ECHO, "echo", tags=["free"]),
                # Each call costs ~$0.02 at most: the budget covers about ten in flight.
                remote_model(provider, PAID, "delay:0.5", price_input_per_m=1000, price_output_per_m=1000),
                remote_model(provider, CONST, "const:hello", capabilities=["chat", "tools"]),
                remote_model(provider, FLAKY, "fail-500", fallbacks=[CAPPED]),
                remote_model(provider, CAPPED, "echo")])
    with deployed(settings):
        _, admin = ray.get(keystore(settings.resolved_data_dir()).create.remote("admin"))
        yield {"settings": settings, "base": f"http://127.0.0.1:{serve_port}", "admin": admin}


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def new_key(platform, **body) -> str:
    r = httpx.post(platform["base"] + "/v1/admin/keys", json=body, headers=auth(platform["admin"]), timeout=30)
    assert r.status_code == 201, r.text
    assert "hash" not in r.json()
    return r.json()["key"]


def chat(base: str, key: str, model: str, **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 8, **kw}
    return httpx.post(base + "/v1/chat/completions", json=body, headers=auth(key), timeout=60)


def rejections(metrics_port: int, *labels: str) -> float:
    """orfeas_ratelimit_rejections as Ray's metrics export has it now, summed over every replica."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("ray_orfeas_ratelimit_rejections_total{") and all(t in ln for t in labels))


def test_a_fallback_model_is_held_to_its_own_rate_limit(platform):
    """The model a call falls back to counts it against that model's own limit (before, only the
    plan's first model was counted, so every fallback call went past it)."""
    key = new_key(platform, role="user")
    responses = [chat(platform["base"], key, FLAKY) for _ in range(4)]
    codes = [r.status_code for r in responses]
    assert codes[:2] == [200, 200] and codes[2:] == [429, 429], [r.text[:300] for r in responses]
    assert responses[0].json()["model"] == CAPPED  # the fallback answered
    refused = responses[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "retry-after" in refused.headers


def test_rate_limit_holds_across_both_replicas_with_openai_headers(platform, metrics_port):
    base = platform["base"]
    key = new_key(platform, role="user", limits={"requests_per_minute": 20})
    counted = ('scope="key"', 'limit="requests"', f'model="{ECHO}"', 'team="-"')
    before = rejections(metrics_port, *counted)

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            sem = asyncio.Semaphore(8)

            async def one():
                async with sem:
                    body = {"model": ECHO, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                    return await c.post(base + "/v1/chat/completions", json=body, headers=auth(key))

            return await asyncio.gather(*(one() for _ in range(60)))

    started = time.monotonic()
    responses = asyncio.run(go())
    elapsed = time.monotonic() - started
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(limited) == 60, [r.text for r in responses if r.status_code not in (200, 429)]
    # Never more than the limit (plus what refilled meanwhile: 20 a minute), at most one lease
    # (5% of 20 = 1 request) parked in each replica short of it.
    assert 20 - 2 <= len(ok) <= 20 + 20 * elapsed / 60 + 1, (len(ok), elapsed)
    assert ok[0].headers["x-ratelimit-limit-requests"] == "20"
    assert int(ok[0].headers["x-ratelimit-remaining-requests"]) <= 20 and ok[0].headers["x-ratelimit-reset-requests"]
    assert ok[0].headers["x-ratelimit-limit-tokens"] == "100000000"
    err = limited[0]
    assert int(err.headers["retry-after"]) >= 1 and err.headers["x-ratelimit-limit-requests"] == "20"
    assert err.json()["error"]["type"] == "rate_limit_error" and err.json()["error"]["code"] == "rate_limit_exceeded"
    from security.ratelimit import counters
    assert len(ray.get(counters(platform["settings"].resolved_data_dir()).replicas.remote())) == 2
    # Every 429 is counted, by the scope and the limit that refused it, on both replicas.
    deadline = time.monotonic() + 60
    while (seen := rejections(metrics_port, *counted) - before) < len(limited) and time.monotonic() < deadline:
        time.sleep(1)
    assert seen == len(limited), (seen, len(limited))


def test_budget_holds_under_200_concurrent_streams_across_both_replicas(platform):
    """Spend never goes over the budget by more than the reservations in flight: with every call
    reserving its most cost before it runs, it never goes over at all."""
    from analytics.ledger import ledger

    base = platform["base"]
    record_key = new_key(platform, role="user", name="budgeted", budget_usd=BUDGET_USD)
    key_id = record_key.split("_")[1]

    async def go():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=STREAMS)) as c:
            async def one():
                body = {"model": PAID, "stream": True, "max_tokens": 8,
                        "messages": [{"role": "user", "content": "one two three four five six"}]}
                async with c.stream("POST", base + "/v1/chat/completions", json=body, headers=auth(record_key)) as r:
                    text = (await r.aread()).decode()
                    return r.status_code, text

            return await asyncio.gather(*(one() for _ in range(STREAMS)))

    results = asyncio.run(go())
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, [t for s, t in results if s not in (200, 429)][:3]
    assert statuses.count(200) >= 3 and statuses.count(429) >= STREAMS // 2
    assert all("budget" in t for s, t in results if s == 429)
    led = ledger(platform["settings"].resolved_data_dir())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # settlements are fire and forget: wait for the last
        state = ray.get(led.budget_state.remote("key", key_id, "month"))
        if state["held_usd"] == 0:
            break
        time.sleep(0.2)
    spent = state["spent_usd"]
    assert state["held_usd"] == 0 and 0 < spent <= BUDGET_USD + 1e-9, state
    print(f"\nbudget ${BUDGET_USD}: {statuses.count(200)} of {STREAMS} streams ran, spent ${spent:.6f} "
          f"(over by ${max(0.0, spent - BUDGET_USD):.6f})")


def test_in_cluster_calls_carry_the_callers_principal(platform):
    from ray import serve

    from analytics.ledger import ledger
    from models.errors import AuthenticationFailed, PermissionDenied
    from security.auth import principal_of

    settings = platform["settings"]
    gateway = serve.get_app_handle("gateway")
    messages = [{"role": "user", "content": "hi there"}]
    with pytest.raises(AuthenticationFailed, match="no internal admin caller"):
        gateway.chat_message.remote(ECHO, messages, 4).result(timeout_s=60)  # on main: answered as admin
    store = keystore(settings.resolved_data_dir())
    record, _ = ray.get(store.create.remote("user", [ECHO], "agent-owner"))
    principal = principal_of(ray.get(store.lookup.remote(record["id"])))
    with pytest.raises(PermissionDenied):
        gateway.chat_message.remote(CONST, messages, 4, None, principal).result(timeout_s=60)
    reply = gateway.chat_message.remote(ECHO, messages, 4, None, principal).result(timeout_s=60)
    assert reply["content"] == "hi there"
    usage = ray.get(ledger(settings.resolved_data_dir()).usage.remote(record["id"]))
    assert usage["totals"]["requests"] >= 1  # charged to the key that asked, not to "internal"
    ray.get(store.revoke.remote(record["id"]))
    # A long workflow holding the principal stops with its key (on main: it went on spending).
    with pytest.raises(AuthenticationFailed, match="revoked"):
        gateway.chat_message.remote(ECHO, messages, 4, None, principal).result(timeout_s=60)


def test_errors_and_route_header_name_no_model_outside_the_keys_scope(platform):
    base = platform["base"]
    key = new_key(platform, role="user", models=[ECHO])
    r = chat(base, key, "auto")
    assert r.status_code == 200, r.text
    route = r.headers["x-orfeas-route"]
    assert ECHO in route and PAID not in route and CONST not in route  # on main: "excluded 2: const:allowed, ..."
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = chat(base, key, "auto", tools=tools)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert ECHO in msg and CONST not in msg and PAID not in msg


def test_rbac_key_scopes_expiry_and_the_admin_api(platform):
    base, admin = platform["base"], platform["admin"]
    viewer = new_key(platform, role="viewer")
    r = chat(base, viewer, ECHO)
    assert r.status_code == 403 and "models:use" in r.json()["error"]["message"]
    assert httpx.get(base + "/v1/models", headers=auth(viewer)).status_code == 200
    only_models = new_key(platform, role="user", endpoints=["/v1/models"])
    assert httpx.get(base + "/v1/models", headers=auth(only_models)).status_code == 200
    r = chat(base, only_models, ECHO)
    assert r.status_code == 403 and "/v1/chat/completions" in r.json()["error"]["message"]
    short = new_key(platform, role="user", expires_in_s=1)
    assert chat(base, short, ECHO).status_code == 200
    time.sleep(1.2)
    r = chat(base, short, ECHO)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    # The admin API: a user may not manage keys; a custom key-managing role may not mint admins.
    user = new_key(platform, role="user")
    r = httpx.post(base + "/v1/admin/keys", json={"role": "user"}, headers=auth(user))
    assert r.status_code == 403 and "keys:manage" in r.json()["error"]["message"]
    keymaster = new_key(platform, role="keymaster")
    r = httpx.post(base + "/v1/admin/keys", json={"role": "admin"}, headers=auth(keymaster))
    assert r.status_code == 403 and "may not hand it out" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/admin/keys", json={"role": "user", "models": [ECHO]}, headers=auth(keymaster))
    assert r.status_code == 201
    # Budgets and limits need their own permissions beyond keys:manage.
    r = httpx.post(base + "/v1/admin/keys", json={"role": "user", "budget_usd": 1}, headers=auth(keymaster))
    assert r.status_code == 403 and "budgets:manage" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/admin/keys", json={"role": "user", "limits": {"concurrent": 1}}, headers=auth(keymaster))
    assert r.status_code == 403 and "limits:manage" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/admin/keys", json={"role": "ghost"}, headers=auth(admin))
    assert r.status_code == 400 and r.json()["error"]["param"] == "role"
    r = httpx.put(base + "/v1/admin/teams/red", json={"budget_usd": 5, "limits": {"concurrent": 3}}, headers=auth(admin))
    assert r.status_code == 200 and r.json()["limits"]["concurrent"] == 3
    kid = r.json() and httpx.get(base + "/v1/admin/keys", headers=auth(admin)).json()["data"][-1]["id"]
    r = httpx.patch(base + f"/v1/admin/keys/{kid}", json={"team": "red", "limits": {"requests_per_minute": 7}},
                    headers=auth(admin))
    assert r.status_code == 200 and r.json()["team"] == "red" and r.json()["limits"]["requests_per_minute"] == 7
    roles = {x["name"]: x for x in httpx.get(base + "/v1/admin/roles", headers=auth(admin)).json()["data"]}
    assert {"admin", "developer", "user", "viewer", "auditor", "keymaster"} <= set(roles)
    assert "keys:manage" in roles["keymaster"]["permissions"] and not roles["keymaster"]["builtin"]
    assert httpx.delete(base + f"/v1/admin/keys/{kid}", headers=auth(admin)).json()["revoked_at"]
    assert httpx.get(base + "/v1/admin/keys/nope", headers=auth(admin)).status_code == 404
    assert httpx.get(base + "/v1/models", headers=auth(admin)).headers["x-orfeas-api-version"] == "v1"


def test_cli_manages_keys_teams_and_roles_over_the_admin_api(platform, tmp_path):
    """`orfeas keys|teams|roles` against the live gateway, with an admin key in $ORFEAS_API_KEY;
    the API's refusals come back as their message and a non-zero exit, never a traceback."""
    import yaml
    from typer.testing import CliRunner

    from cluster.cli import app as cli

    config = tmp_path / "orfeas.yaml"
    config.write_text(yaml.safe_dump(platform["settings"].to_dict()))
    env = {"ORFEAS_API_KEY": platform["admin"], "ORFEAS_TOKEN_FILE": str(tmp_path / "none.json")}

    def orfeas(*args, **extra):
        return CliRunner().invoke(cli, [*args, "--config", str(config)], env={**env, **extra})

    r = orfeas("keys", "create", "--role", "user", "--team", "cli-team", "--name", "from-cli")
    assert r.exit_code == 0, r.output
    key_id = r.output.split()[2]
    r = orfeas("keys", "limits", key_id, "--rpm", "7")
    assert r.exit_code == 0 and "rpm=7" in r.output, r.output
    r = orfeas("teams", "set", "cli-team", "--usd", "4", "--period", "day", "--tpm", "900")
    assert r.exit_code == 0 and "$4/day" in r.output and "tpm=900" in r.output, r.output
    # What the CLI set is what the admin API holds.
    admin = auth(platform["admin"])
    got = httpx.get(platform["base"] + f"/v1/admin/keys/{key_id}", headers=admin, timeout=30).json()
    assert got["limits"]["requests_per_minute"] == 7 and got["team"] == "cli-team"
    teams = httpx.get(platform["base"] + "/v1/admin/teams", headers=admin, timeout=30).json()["data"]
    assert {"name": "cli-team", "budget_usd": 4.0, "budget_period": "day"}.items() <= \
        next(t for t in teams if t["name"] == "cli-team").items()
    r = orfeas("roles", "list", "--json")
    assert r.exit_code == 0 and '"keymaster"' in r.output, r.output
    r = orfeas("keys", "list")
    assert r.exit_code == 0 and key_id in r.output and "from-cli" in r.output, r.output
    # Refusals: an unknown role (400 → exit 2), a user key on the admin API (403 → exit 1).
    r = orfeas("keys", "create", "--role", "root")
    assert r.exit_code == 2 and "unknown role 'root'" in r.output and "Traceback" not in r.output
    user = new_key(platform, role="user")
    r = orfeas("teams", "list", ORFEAS_API_KEY=user)
    assert r.exit_code == 1 and "does not grant teams:read" in r.output, r.output
