"""The gateway on the package's platform (conftest.py), through the official `openai` client and raw HTTP."""

import base64
import time

import httpx
import numpy as np
import openai
import pytest
import ray

from security.keys import keystore
from harness import make_key

from . import BROKEN, CHAT, EMB

SCRIPT = "script"  # the package platform's stand-in provider model (conftest.py)
RAG = "rag"  # the alias the RAG app adds to the catalog


@pytest.fixture(scope="module")
def platform(live):
    """The package's platform (conftest.py), with a user key scoped to the chat model."""
    settings = live["settings"]
    _, user = make_key(settings, "user", [CHAT])
    yield settings, live["base"], live["admin"], user


@pytest.fixture(scope="module")
def client(platform):
    _, base, admin, _ = platform
    return openai.OpenAI(base_url=base + "/v1", api_key=admin, max_retries=0)


def keys_snapshot(settings):
    return ray.get(keystore(settings.resolved_data_dir()).list.remote())


# ------------------------------------------------------------------ models and health


def test_models_list_reports_health_and_respects_key_scope(platform, client):
    settings, base, _, user = platform
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert set(cards) == {EMB, CHAT, BROKEN, SCRIPT, RAG}
    assert cards[EMB]["status"] == "ready" and cards[CHAT]["status"] == "ready"
    assert cards[BROKEN]["status"] == "unhealthy" and "does not exist" in cards[BROKEN]["error"]
    scoped = openai.OpenAI(base_url=base + "/v1", api_key=user, max_retries=0)
    # its one model, and the RAG alias a user role may query (not a model a key scope names)
    assert [m.id for m in scoped.models.list().data] == [CHAT, RAG]


def test_health_endpoints(platform):
    _, base, _, _ = platform
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(base + "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": {}}  # anonymous callers learn no model names
    _, _, admin, _ = platform
    ready = httpx.get(base + "/readyz", headers={"Authorization": f"Bearer {admin}"})
    assert ready.status_code == 200, ready.text
    assert ready.json()["models"] == {EMB: "ready", CHAT: "ready", BROKEN: "unhealthy", SCRIPT: "ready", RAG: "ready"}


# ------------------------------------------------------------------ chat and completions


def test_chat_completion_with_usage(client):
    r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=12, seed=4)
    assert r.object == "chat.completion" and r.model == CHAT
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == 12


def test_streamed_chat_matches_the_unstreamed_answer_and_reports_usage(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a story"}]
    whole = client.chat.completions.create(model=CHAT, messages=msgs, max_tokens=16, seed=11)
    chunks = list(client.chat.completions.create(model=CHAT, messages=msgs, max_tokens=16, seed=11, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    plain = list(client.chat.completions.create(model=CHAT, messages=msgs, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain)  # usage only when asked for


def test_completions_plain_and_streamed(client):
    whole = client.completions.create(model=CHAT, prompt="once upon a time", max_tokens=10, seed=2)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens <= 10
    parts = list(client.completions.create(model=CHAT, prompt="once upon a time", max_tokens=10, seed=2,
                                           stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_sequences_through_the_api(client):
    base = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=20, seed=8).choices[0].message.content
    stop = base.split()[2]
    cut = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                         max_tokens=20, seed=8, stop=[stop])
    assert stop not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    assert base.startswith(cut.choices[0].message.content)


# ------------------------------------------------------------------ embeddings


def test_embeddings_are_unit_norm_deterministic_and_ordered(client):
    texts = ["Ray Serve hosts the gateway.", "Qdrant stores vectors.", "Ray Serve hosts the gateway."]
    r = client.embeddings.create(model=EMB, input=texts)  # the client asks for base64
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, 384) and [d.index for d in r.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert np.allclose(vecs[0], vecs[2], atol=1e-6) and not np.allclose(vecs[0], vecs[1], atol=1e-2)
    single = client.embeddings.create(model=EMB, input=texts[1], encoding_format="float")
    assert np.allclose(single.data[0].embedding, vecs[1], atol=1e-5)
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens


def test_embeddings_base64_is_little_endian_float32(platform):
    _, base, admin, _ = platform
    body = {"model": EMB, "input": "abc", "encoding_format": "base64"}
    r = httpx.post(base + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {admin}"})
    raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert raw.shape == (384,) and abs(np.linalg.norm(raw) - 1) < 1e-4


# ------------------------------------------------------------------ errors


def post(base, path, body, key=None, raw=None, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if raw is not None:
        return httpx.post(base + path, content=raw, headers={**h, "Content-Type": "application/json"}, timeout=30)
    return httpx.post(base + path, json=body, headers=h, timeout=30)


def assert_error(resp, status, type_, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == type_ and isinstance(err["message"], str) and err["message"]
    # Never a raw pydantic dump.
    assert "loc" not in err and "input" not in err and "pydantic" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return err


CHAT_BODY = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("case", [
    "no-key", "bad-key", "malformed", "forbidden-model", "unknown-model", "bad-temperature", "missing-messages",
    "bad-role", "bad-json", "not-object", "max-tokens-over-limit", "n-too-big", "wrong-task", "too-large",
    "unhealthy-model", "empty-embedding-input", "too-many-inputs", "unknown-route",
])
def test_errors_are_openai_shaped_and_change_nothing(platform, case):
    settings, base, admin, user = platform
    before = keys_snapshot(settings)
    emb = {"model": EMB, "input": "x"}
    if case == "no-key":
        assert_error(post(base, "/v1/chat/completions", CHAT_BODY), 401, "authentication_error")
    elif case == "bad-key":
        assert_error(post(base, "/v1/chat/completions", CHAT_BODY, "orf_x_y"), 401, "authentication_error")
    elif case == "malformed":
        assert_error(httpx.get(base + "/v1/models", headers={"Authorization": "Basic abc"}), 401,
                     "authentication_error")
    elif case == "forbidden-model":
        err = assert_error(post(base, "/v1/embeddings", emb, user), 403, "permission_error", "model")
        assert EMB in err["message"]
    elif case == "unknown-model":
        err = assert_error(post(base, "/v1/chat/completions", {**CHAT_BODY, "model": "nope"}, admin), 404,
                           "not_found_error", "model")
        assert err["code"] == "model_not_found"
    elif case == "bad-temperature":
        assert_error(post(base, "/v1/chat/completions", {**CHAT_BODY, "temperature": 5}, admin), 400,
                     "invalid_request_error", "temperature")
    elif case == "missing-messages":
        assert_error(post(base, "/v1/chat/completions", {"model": CHAT}, admin), 400, "invalid_request_error",
                     "messages")
    elif case == "bad-role":
        assert_error(post(base, "/v1/chat/completions",
                          {**CHAT_BODY, "messages": [{"role": "wizard", "content": "x"}]}, admin),
                     400, "invalid_request_error", "messages.0.role")
    elif case == "bad-json":
        assert_error(post(base, "/v1/chat/completions", None, admin, raw=b"{nope"), 400, "invalid_request_error")
    elif case == "not-object":
        assert_error(post(base, "/v1/chat/completions", None, admin, raw=b"[1, 2]"), 400, "invalid_request_error")
    elif case == "max-tokens-over-limit":
        assert_error(post(base, "/v1/chat/completions", {**CHAT_BODY, "max_tokens": 65}, admin), 400,
                     "invalid_request_error", "max_tokens")
    elif case == "n-too-big":
        assert_error(post(base, "/v1/chat/completions", {**CHAT_BODY, "n": 2}, admin), 400,
                     "invalid_request_error", "n")
    elif case == "wrong-task":
        assert_error(post(base, "/v1/chat/completions", {**CHAT_BODY, "model": EMB}, admin), 400,
                     "invalid_request_error", "model")
    elif case == "too-large":
        big = {**CHAT_BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
        err = assert_error(post(base, "/v1/chat/completions", big, admin), 413, "invalid_request_error")
        assert "4096" in err["message"]
    elif case == "unhealthy-model":
        err = assert_error(post(base, "/v1/chat/completions", {**CHAT_BODY, "model": BROKEN}, admin), 503,
                           "service_unavailable", "model")
        assert "does not exist" in err["message"]
    elif case == "empty-embedding-input":
        assert_error(post(base, "/v1/embeddings", {"model": EMB, "input": []}, admin), 400,
                     "invalid_request_error", "input")
    elif case == "too-many-inputs":
        assert_error(post(base, "/v1/embeddings", {"model": EMB, "input": ["a"] * 9}, admin), 400,
                     "invalid_request_error", "input")
    elif case == "unknown-route":
        assert_error(httpx.get(base + "/v1/nothing-here"), 404, "not_found_error")
    # Nothing changed: same keys, and the platform still answers.
    assert keys_snapshot(settings) == before
    ok = post(base, "/v1/chat/completions", CHAT_BODY, admin)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_openai_client_raises_typed_errors(platform, client):
    _, base, _, _ = platform
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="orf_bad_key", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}], top_p=0)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:  # refused, never silently ignored
        client.completions.create(model=CHAT, prompt="x", echo=True)
    assert e.value.body["param"] == "echo" and "not served" in e.value.body["message"]


def test_revoked_key_is_refused(platform):
    settings, base, admin, _ = platform
    record, key = make_key(settings, "user", [CHAT], "short-lived")
    assert httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    ray.get(keystore(settings.resolved_data_dir()).revoke.remote(record["id"]))
    assert_error(httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"}), 401,
                 "authentication_error")


# ------------------------------------------------------------------ metrics


def test_metrics_reach_rays_prometheus_export(platform, client, metrics_port):
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "m"}], max_tokens=3)
    want = [
        ('ray_orfeas_http_requests_total', 'app="gateway"', 'route="/v1/chat/completions"', f'model="{CHAT}"',
         'status="200"'),
        ('ray_orfeas_http_errors_total', 'app="gateway"', 'type="authentication_error"'),
        ('ray_orfeas_gateway_tokens_total', 'direction="out"'),
        ('ray_orfeas_gateway_time_to_first_token_seconds_bucket', f'model="{CHAT}"'),
        ('ray_orfeas_http_request_latency_seconds_bucket', 'app="gateway"', 'route="/v1/embeddings"'),
        ('ray_orfeas_http_requests_total', 'route="/v1/chat/completions"', 'model="other"', 'status="404"'),
    ]
    # A model name that is not in the catalog never becomes a label value of its own.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model-7f3a", messages=[{"role": "user", "content": "m"}])
    client.embeddings.create(model=EMB, input="m")
    httpx.get(f"http://127.0.0.1:{platform[0].serve.port}/v1/models")  # no key: a 401, counted as an error
    deadline = time.monotonic() + 90
    missing = want
    while missing and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        lines = [ln for ln in text.splitlines() if ln.startswith(("ray_orfeas_gateway", "ray_orfeas_http"))]
        assert not any("no-such-model-7f3a" in ln for ln in lines)
        missing = [w for w in want if not any(ln.startswith(w[0]) and all(t in ln for t in w[1:]) for ln in lines)]
        if missing:
            time.sleep(2)
    assert not missing, f"metrics not exported: {missing}"
