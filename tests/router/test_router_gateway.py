"""The router live in the gateway: two tiny-model engines in the cluster and a real loopback
provider with injected faults, through the official `openai` client and raw HTTP."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray

from cluster.cli import experiment_report
from security.keys import keystore
from analytics.ledger import ledger
from config import ModelSpec
from harness import deployed, free_port, make_key, platform_settings, remote_model
from serve.router import experiments

ECHO_PRICE = (2.0, 4.0)  # USD per million tokens in, out


@pytest.fixture(scope="module")
def platform(serve_port, provider, tiny_model_dir, tmp_path_factory):
    def remote(mid, source, routable=False, **kw):
        return remote_model(provider, mid, source, routable=routable, **kw)

    def tiny(mid, **kw):
        return ModelSpec(id=mid, engine="transformers", source=str(tiny_model_dir), max_context=256,
                         num_cpus=0.25, **kw)

    settings = platform_settings(
        tmp_path_factory.mktemp("router-data"), serve_port,
        limits={"max_tokens": 64},
        models=[
            tiny("tiny-a", quality={"general": 0.3}, latency_prior_s=0.5),
            tiny("tiny-b", quality={"code": 0.9, "general": 0.4}, latency_prior_s=0.5),
            remote("p-echo", "echo", routable=True, capabilities=["chat", "tools", "json"], max_context=100_000,
                   price_input_per_m=ECHO_PRICE[0], price_output_per_m=ECHO_PRICE[1], quality={"general": 0.8}),
            remote("p-flaky", "flaky:2", fallbacks=["p-echo"]),
            remote("p-down", "echo", fallbacks=["p-echo"]),
            remote("p-slow", "delay:5", timeout_s=1.0, fallbacks=["p-echo"]),
            remote("p-limited", "limited:1", fallbacks=["p-echo"]),
            remote("p-garbage", "garbage", fallbacks=["p-echo"]),
            remote("p-drop", "drop", fallbacks=["p-echo"]),
            remote("pool-1", "delay:0.3", serves="pool"),
            remote("pool-2", "delay:0.3", serves="pool"),
            remote("p-plan", "plan", capabilities=["chat", "json"]),
            remote("p-d1", "delay:0.6", price_input_per_m=1.0, price_output_per_m=1.0),
            remote("p-d2", "delay:0.6", price_input_per_m=1.0, price_output_per_m=1.0),
            remote("p-d3", "delay:0.6", price_input_per_m=1.0, price_output_per_m=1.0),
            remote("p-yes", "const:yes"),
            remote("p-no", "const:no"),
        ],
        router={
            "classifier": "rules",
            "budget_cache_s": 0,
            "fallback": {"max_attempts": 3, "backoff_base_s": 0.01},
            "breaker": {"failure_threshold": 2, "cooldown_s": 5.0},  # outlasts a loaded CI worker's two calls
            "experiments": [{"name": "ab", "arms": [{"name": "one", "model": "pool-1"},
                                                    {"name": "two", "model": "pool-2"}]}],
            "orchestrator": {"planner": "p-plan", "synthesizer": "p-echo", "judge": "p-yes"},
        },
    )
    # p-down points at a closed port: connection refused on every attempt.
    down = settings.model("p-down").model_copy(update={"base_url": f"http://127.0.0.1:{free_port()}/v1"})
    settings = settings.model_copy(update={"models": [down if m.id == "p-down" else m for m in settings.models]})
    with deployed(settings):
        _, admin = make_key(settings, "admin")
        yield settings, f"http://127.0.0.1:{serve_port}", admin


def client_for(base, key):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def chat(base, key, model, content="hello there"):
    return post(base, key, "/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8})


def post(base, key, path, body, headers=None):
    return httpx.post(base + path, json=body, headers={"Authorization": f"Bearer {key}", **(headers or {})},
                      timeout=60)


def router_status(base, key):
    return httpx.get(base + "/v1/router/status", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()


def new_key(settings, role="user", models=None, **kw):
    record, key = ray.get(keystore(settings.resolved_data_dir()).create.remote(role, models, "t", **kw))
    return record["id"], key


# ------------------------------------------------------------------ selection


def test_auto_routes_by_task_and_capability_with_reason_header(platform):
    _, base, admin = platform
    code = post(base, admin, "/v1/chat/completions", {
        "model": "auto:best-quality", "max_tokens": 4,
        "messages": [{"role": "user", "content": "Write a Python function that reverses a list"}]})
    assert code.status_code == 200, code.text
    assert code.headers["x-orfeas-model"] == "tiny-b" and code.json()["model"] == "tiny-b"
    assert "task=code" in code.headers["x-orfeas-route"] and "policy=best-quality" in code.headers["x-orfeas-route"]
    general = post(base, admin, "/v1/chat/completions", {
        "model": "auto:best-quality", "max_tokens": 4, "messages": [{"role": "user", "content": "hello there"}]})
    assert general.headers["x-orfeas-model"] == "p-echo"
    tools = post(base, admin, "/v1/chat/completions", {
        "model": "auto:cheapest-adequate", "max_tokens": 4, "tools": [{"type": "function", "function": {"name": "f"}}],
        "messages": [{"role": "user", "content": "Write a Python function"}]})
    assert tools.headers["x-orfeas-model"] == "p-echo"  # the only model with tools
    assert "tiny-a:capability" in tools.headers["x-orfeas-route"]


def test_unmet_constraint_is_a_clear_error_and_key_scope_is_honoured(platform):
    settings, base, admin = platform
    r = post(base, admin, "/v1/chat/completions", {"model": "auto", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                     {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_capable_model"
    assert "'vision'" in r.json()["error"]["message"] and r.json()["error"]["param"] == "model"
    bad = post(base, admin, "/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "x"}]},
               headers={"x-orfeas-latency-budget-ms": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-orfeas-latency-budget-ms"
    _, scoped = new_key(settings, models=["tiny-a"])
    r = post(base, scoped, "/v1/chat/completions", {"model": "auto:best-quality", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200 and r.headers["x-orfeas-model"] == "tiny-a"
    cards = client_for(base, scoped).models.list().data
    assert [c.id for c in cards] == ["tiny-a"] and cards[0].model_extra["capabilities"] == ["chat"]


def test_logical_model_is_balanced_across_its_backends(platform):
    _, base, admin = platform

    def one(_):
        return post(base, admin, "/v1/chat/completions", {"model": "pool", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "a b"}]})

    with ThreadPoolExecutor(8) as pool:  # a burst: requests are outstanding together
        rs = list(pool.map(one, range(8)))
    assert all(r.status_code == 200 and "p2c" in r.headers["x-orfeas-route"] for r in rs)
    used = [r.headers["x-orfeas-model"] for r in rs]
    assert set(used) == {"pool-1", "pool-2"}


# ------------------------------------------------------------------ fallbacks and the breaker


@pytest.mark.parametrize("model, outcome", [
    ("p-down", "bad_gateway"),              # connection refused
    ("p-slow", "upstream_timeout"),         # slow first byte
    ("p-limited", "upstream_rate_limited"),  # 429 with Retry-After
    ("p-garbage", "bad_gateway"),           # unreadable stream event
])
def test_retryable_failures_fall_back_in_order(platform, model, outcome):
    _, base, admin = platform
    r = post(base, admin, "/v1/chat/completions", {"model": model, "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "one two"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-orfeas-attempts"] == f"{model}:{outcome},p-echo:ok"
    assert r.json()["model"] == "p-echo" and r.json()["choices"][0]["message"]["content"] == "one two"


def test_stream_is_never_retried_after_its_first_token(platform, provider):
    _, base, admin = platform
    before = dict(provider.counts)
    chunks, error = [], None
    with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {admin}"},
                      json={"model": "p-drop", "stream": True, "messages": [{"role": "user", "content": "a b c d"}]},
                      timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["x-orfeas-model"] == "p-drop"
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                if '"error"' in line:
                    error = line
                else:
                    chunks.append(line)
    assert error is not None and len(chunks) >= 2
    assert provider.counts["drop"] == before.get("drop", 0) + 1
    assert provider.counts.get("echo", 0) == before.get("echo", 0)  # no fallback after the first token


def test_breaker_opens_skips_then_half_open_trial_closes(platform):
    _, base, admin = platform
    seen = []
    for _ in range(2):  # flaky:2 fails twice: each time the fallback answers, then the circuit opens
        r = post(base, admin, "/v1/chat/completions", {"model": "p-flaky", "messages": [
            {"role": "user", "content": "x"}]})
        assert r.status_code == 200 and r.headers["x-orfeas-attempts"] == "p-flaky:bad_gateway,p-echo:ok"
        seen.append(router_status(base, admin)["backends"]["p-flaky"]["state"])
    assert seen == ["closed", "open"]
    r = post(base, admin, "/v1/chat/completions", {"model": "p-flaky", "messages": [{"role": "user", "content": "x"}]})
    assert r.headers["x-orfeas-attempts"] == "p-echo:ok" and "circuit open" in r.headers["x-orfeas-route"]
    while router_status(base, admin)["backends"]["p-flaky"]["open_for_s"]:
        pass  # the cooldown passes (polled, not timed)
    r = post(base, admin, "/v1/chat/completions", {"model": "p-flaky", "messages": [{"role": "user", "content": "x"}]})
    assert r.headers["x-orfeas-attempts"] == "p-flaky:ok"  # the half-open trial succeeds ...
    assert router_status(base, admin)["backends"]["p-flaky"]["state"] == "closed"  # ... and closes the circuit


# ------------------------------------------------------------------ cost, budgets, usage


def test_ledger_totals_equal_the_sum_of_responses(platform):
    settings, base, _ = platform
    key_id, key = new_key(settings, team="blue")
    client = client_for(base, key)
    expected = prompt = completion = 0
    for i in range(3):
        r = client.chat.completions.create(model="p-echo", messages=[{"role": "user", "content": "a b c " * (i + 1)}])
        prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="p-echo", messages=[{"role": "user", "content": "x y"}],
                                                 stream=True, stream_options={"include_usage": True}))
    prompt, completion = prompt + chunks[-1].usage.prompt_tokens, completion + chunks[-1].usage.completion_tokens
    expected = (prompt * ECHO_PRICE[0] + completion * ECHO_PRICE[1]) / 1e6
    u = httpx.get(base + "/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert u["key_id"] == key_id and u["totals"]["requests"] == 4
    assert u["totals"]["prompt_tokens"] == prompt and u["totals"]["completion_tokens"] == completion
    assert u["totals"]["cost_usd"] == pytest.approx(expected) and u["by_team"]["blue"]["requests"] == 4
    other = httpx.get(base + "/v1/usage?key_id=someone", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert other.status_code == 403
    everyone = httpx.get(base + "/v1/usage", headers={"Authorization": f"Bearer {platform[2]}"}, timeout=30).json()
    assert everyone["by_key"][key_id]["cost_usd"] == pytest.approx(expected) and len(everyone["by_key"]) > 1
    bad = httpx.get(base + "/v1/usage?period=week", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "period"


def test_budget_is_refused_with_429_once_spent_and_changes_nothing(platform):
    settings, base, _ = platform
    store = keystore(settings.resolved_data_dir())
    key_id, key = new_key(settings, budget_usd=1e-6, budget_period="day")
    # A call that could cost more than what is left is refused before it runs: the budget holds.
    r = chat(base, key, "p-echo", "one two three four five")
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded", r.text
    assert "may cost up to" in r.json()["error"]["message"]
    assert ray.get(ledger(settings.resolved_data_dir()).usage.remote(key_id))["totals"]["requests"] == 0
    ray.get(store.set_budget.remote(key_id, 1.0, "day"))
    first = chat(base, key, "p-echo", "one two three four five")
    assert first.status_code == 200
    spent = ray.get(ledger(settings.resolved_data_dir()).usage.remote(key_id))["totals"]
    assert spent["cost_usd"] > 1e-6
    ray.get(store.set_budget.remote(key_id, spent["cost_usd"], "day"))  # exactly spent
    for model in ("p-echo", "auto"):
        r = chat(base, key, model)
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded", r.text
        assert "budget" in r.json()["error"]["message"]
    assert ray.get(ledger(settings.resolved_data_dir()).usage.remote(key_id))["totals"] == spent
    u = httpx.get(base + "/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert u["budget"]["remaining_usd"] == 0 and u["budget"]["period"] == "day"


def test_ledger_actor_restart_keeps_totals(platform):
    settings, _, _ = platform
    actor = ledger(settings.resolved_data_dir())
    before = ray.get(actor.usage.remote())["totals"]
    ray.kill(actor, no_restart=False)
    after = None
    while after is None:  # the restarted actor reloads its file
        try:
            after = ray.get(ledger(settings.resolved_data_dir()).usage.remote())["totals"]
        except ray.exceptions.RayActorError:
            pass
    assert after == before


# ------------------------------------------------------------------ experiments


def test_sticky_ab_assignment_feedback_and_report(platform):
    settings, base, _ = platform
    exp = settings.router.experiments[0]
    keys = [new_key(settings) for _ in range(6)]
    ids = []
    for key_id, key in keys:
        arms = set()
        for _ in range(2):
            r = chat(base, key, "experiment:ab", "a b")
            assert r.status_code == 200
            arms.add(r.headers["x-orfeas-experiment"])
            ids.append((key, r.headers["x-orfeas-response-id"], r.json()["id"]))
        assert arms == {f"ab/{experiments.assign(exp, key_id).name}"}  # sticky per key
    for key, rid, body_id in ids:
        assert rid == body_id
        fb = post(base, key, "/v1/feedback", {"response_id": rid, "score": 1})
        assert fb.status_code == 200 and fb.json()["experiment"] == "ab"
    key, rid, _ = ids[0]
    assert post(base, key, "/v1/feedback", {"response_id": rid, "score": 7}).status_code == 400
    assert post(base, key, "/v1/feedback", {"response_id": "nope", "score": 1}).status_code == 404
    assert post(base, ids[-1][0], "/v1/feedback", {"response_id": rid, "score": 1}).status_code == 404
    report = experiment_report(settings, "ab")
    total = sum(a["requests"] for a in report["arms"].values())
    assert total == 12 and sum(a["feedback_n"] for a in report["arms"].values()) == 12
    assert set(report["arms"]) == {"one", "two"} and "two vs one" in report["tests"]


# ------------------------------------------------------------------ orchestrator


def test_orchestrator_plans_and_runs_subtasks_in_parallel(platform):
    _, base, admin = platform
    r = post(base, admin, "/v1/orchestrate", {"task": "alpha one\nbeta two\ngamma three",
                                              "models": ["p-d1", "p-d2", "p-d3"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["plan"]["source"] == "planner" and out["plan"]["model"] == "p-plan"
    assert [s["prompt"] for s in out["subtasks"]] == ["alpha one", "beta two", "gamma three"]
    assert [s["model"] for s in out["subtasks"]] == ["p-d1", "p-d2", "p-d3"]
    assert [s["text"] for s in out["subtasks"]] == ["alpha one", "beta two", "gamma three"]
    t = out["timings"]
    assert t["subtasks_wall_s"] < 0.6 * t["subtasks_sum_s"]  # parallel: well under the sum
    assert out["cost_usd"] > 0 and out["cost_usd"] == pytest.approx(sum(c["cost_usd"] for c in out["calls"]))
    assert "alpha one" in out["answer"]  # the synthesiser (echo) saw every part


def test_orchestrator_vote_schema_retry_and_chat_alias(platform):
    settings, base, admin = platform
    r = post(base, admin, "/v1/orchestrate", {"task": "is it?", "strategy": "vote", "n": 3,
                                              "models": ["p-yes", "p-no", "p-yes"]}).json()
    assert r["answer"] == "yes" and r["selected"]["votes"] == 2
    r = post(base, admin, "/v1/orchestrate", {"task": "is it?", "strategy": "vote", "n": 2, "models": ["p-yes"],
                                              "json_schema": {"type": "object"}}).json()
    assert r["validation"]["valid"] is False and r["validation"]["retried"] is True
    bad = post(base, admin, "/v1/orchestrate", {"task": "x", "strategy": "telepathy"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy"
    unknown = post(base, admin, "/v1/orchestrate", {"task": "x", "models": ["nope"]})
    assert unknown.status_code == 404
    c = client_for(base, admin).chat.completions.create(
        model=settings.router.orchestrator.alias, messages=[{"role": "user", "content": "first\nsecond"}])
    assert c.model == settings.router.orchestrator.alias and "first" in c.choices[0].message.content


def test_in_cluster_callers_are_routed_fall_back_and_are_metered(platform):
    """RAG generation and agents call the gateway handle's complete_chat for a named principal
    (here the operator, as the CLI does): the router applies and the ledger charges that principal."""
    from ray import serve

    from security.auth import OPERATOR
    from serve.applications import GATEWAY_APP

    settings, _, _ = platform
    gateway = serve.get_app_handle(GATEWAY_APP)
    before = ray.get(ledger(settings.resolved_data_dir()).usage.remote(OPERATOR.key_id))["totals"]["requests"]
    messages = [{"role": "user", "content": "internal hello"}]
    # p-down refuses connections: its fallback p-echo answers (echo repeats the prompt).
    assert "internal hello" in gateway.complete_chat.remote("p-down", messages, 16, OPERATOR).result(timeout_s=60)
    assert gateway.complete_chat.remote("auto:best-quality", messages, 8, OPERATOR).result(timeout_s=60)
    with pytest.raises(Exception, match="does not exist|not_found|unknown"):
        gateway.complete_chat.remote("no-such-model", messages, 8, OPERATOR).result(timeout_s=60)
    import time

    deadline = time.monotonic() + 30  # the gateway records asynchronously: wait for both entries
    while True:
        after = ray.get(ledger(settings.resolved_data_dir()).usage.remote(OPERATOR.key_id))["totals"]["requests"]
        if after >= before + 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after == before + 2


def test_probe_round_asks_hosted_providers_and_opens_the_circuit_of_an_unreachable_one(platform, provider):
    """Active probes reach the provider itself (GET /models with the model's key), not only its
    configuration; a provider that cannot be reached has its circuit opened with the reason."""
    from ray import serve

    from harness import PROVIDER_KEY
    from serve.applications import GATEWAY_APP

    gateway = serve.get_app_handle(GATEWAY_APP)
    n = len(provider.probes)
    status = gateway.router_status.remote(True).result(timeout_s=60)["backends"]
    assert len(provider.probes) - n >= 10  # one per remote catalog entry on this provider
    assert set(provider.probes[n:]) == {f"Bearer {PROVIDER_KEY}"}
    assert status["p-down"]["state"] == "open" and "cannot reach" in status["p-down"]["last_error"]
    assert status["p-echo"]["state"] == "closed" and status["tiny-a"]["state"] == "closed"
