"""The `openai` engine against a real OpenAI-compatible server on loopback, through the gateway."""

import json

import httpx
import openai
import pytest

from harness import PROVIDER_KEY, deployed, free_port, make_key
from config import ModelSpec, Settings
from provider_server import ProviderServer


@pytest.fixture(scope="module")
def provider():
    server = ProviderServer(free_port(), slow_s=3.0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(serve_port, provider, tmp_path_factory):
    def remote(model_id, source, **kw):
        return ModelSpec(id=model_id, engine="openai", base_url=provider.base_url, source=source,
                         api_key_env="ORFEAS_TEST_PROVIDER_KEY", **kw)

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("remote-data"),
        serve={"host": "127.0.0.1", "port": serve_port},
        auth={"key_cache_s": 0},
        limits={"max_tokens": 64},
        rag={"enabled": False},  # tests/shared_platform/test_rag_gateway.py covers the RAG service
        agents={"enabled": False},  # tests/agents covers the agents API
        models=[
            remote("echo", "echo"),
            remote("tools", "script", capabilities=["chat", "tools"]),
            remote("fails", "fail-500"),
            remote("limited", "rate-limited"),
            remote("slow", "slow", timeout_s=1.0),
            remote("drops", "drop"),
            remote("garbage", "garbage"),
            remote("remote-emb", "emb-model", task="embedding"),
            remote("no-bias", "refuses:logit_bias"),
            ModelSpec(id="keyless", engine="openai", base_url=provider.base_url, source="echo",
                      api_key_env="ORFEAS_TEST_UNSET_KEY"),
            remote("pii-restore", "echo"),  # prompts redacted, answers restored (test_pii_* below)
            remote("pii-redact", "echo"),
        ],
        pii={"remote_prompts_models": {"pii-restore": "redact_restore", "pii-redact": "redact"}},
    )
    with deployed(settings):
        _, key = make_key(settings, "admin")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key=key, max_retries=0), key


def test_stream_is_passed_through_with_usage(gateway, provider):
    client, _ = gateway
    n = len(provider.requests)
    chunks = list(client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "alpha beta gamma delta"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "alpha beta gamma delta"
    assert chunks[-1].usage.completion_tokens == 4
    sent = provider.requests[n]
    assert sent["body"]["model"] == "echo" and sent["body"]["stream"] is True
    assert sent["authorization"] == f"Bearer {PROVIDER_KEY}"


def test_non_streamed_chat_and_completion_and_sampling_params(gateway, provider):
    client, _ = gateway
    r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "one two three"}],
                                       max_tokens=2, temperature=0.3, stop=["zzz"])
    assert r.choices[0].message.content == "one two" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 2
    body = provider.requests[-1]["body"]
    assert body["max_tokens"] == 2 and body["temperature"] == 0.3 and body["stop"] == ["zzz"]
    assert "max_tokens_cap" not in body
    c = client.completions.create(model="echo", prompt="x y z", max_tokens=5)
    assert c.choices[0].text == "x y z" and c.choices[0].finish_reason == "stop"


def test_remote_embeddings(gateway):
    client, _ = gateway
    r = client.embeddings.create(model="remote-emb", input=["ab", "abcd"], encoding_format="float")
    assert [d.embedding[0] for d in r.data] == [2.0, 4.0] and r.usage.prompt_tokens == 2


@pytest.mark.parametrize("model, status, etype, fragment", [
    ("fails", 502, "upstream_error", "provider exploded"),
    ("limited", 429, "rate_limit_error", "slow down"),
    ("slow", 504, "timeout_error", "did not answer within 1s"),
    ("garbage", 502, "upstream_error", "unreadable"),
    ("keyless", 503, "service_unavailable", "ORFEAS_TEST_UNSET_KEY"),
])
def test_provider_failures_map_to_clear_errors(gateway, model, status, etype, fragment):
    client, key = gateway
    for stream in (False, True):
        r = httpx.post(str(client.base_url) + "chat/completions", timeout=30,
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": model, "messages": [{"role": "user", "content": "a b c"}], "stream": stream})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["type"] == etype and fragment in err["message"]


def test_stream_dropped_mid_way_ends_with_an_error_event(gateway):
    client, _ = gateway
    stream = client.chat.completions.create(model="drops", messages=[{"role": "user", "content": "a b c d"}],
                                            stream=True)
    got = []
    with pytest.raises(openai.APIError, match="ended the stream before finishing"):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "a b"  # what came before the drop was delivered, nothing invented after


WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tool_script(*replies) -> dict:
    return {"role": "system", "content": "SCRIPT: " + json.dumps(list(replies))}


def test_native_tool_calls_round_trip_non_streamed(gateway, provider):
    client, _ = gateway
    system = tool_script({"tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}},
                                         {"name": "weather", "arguments": {"city": "Bergen"}}]}, "it is {last}")
    messages = [system, {"role": "user", "content": "weather in Oslo and Bergen?"}]
    r = client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER], tool_choice="auto")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["weather", "weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Oslo"}, {"city": "Bergen"}]
    assert len({c.id for c in calls}) == 2 and r.usage.total_tokens == 12
    sent = provider.requests[-1]["body"]
    assert sent["tools"][0]["function"]["name"] == "weather" and sent["tool_choice"] == "auto"

    # The tool results go back as `tool` messages after the assistant's calls; the model answers.
    messages += [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in calls]
    r = client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "it is sunny" and r.choices[0].finish_reason == "stop"
    forwarded = provider.requests[-1]["body"]["messages"]
    assert forwarded[2]["tool_calls"][1]["function"]["arguments"] == '{"city": "Bergen"}'
    assert forwarded[3] == {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}


def test_native_tool_calls_stream_as_deltas(gateway):
    client, _ = gateway
    messages = [tool_script({"tool_calls": [{"name": "weather", "arguments": {"city": "Tromsø"}}]}),
                {"role": "user", "content": "weather?"}]
    chunks = list(client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER], stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].function.name == "weather" and pieces[0].index == 0
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "Tromsø"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == 5


@pytest.mark.parametrize("extra, param, fragment", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "pattern"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "stocks"}}}, "tool_choice",
     "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "function"),
])
def test_bad_tool_definitions_are_400_and_reach_no_provider(gateway, provider, extra, param, fragment):
    _, key = gateway
    n = len(provider.requests)
    r = httpx.post(f"{gateway[0].base_url}chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "tools", "messages": [{"role": "user", "content": "x"}], **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and fragment in error["message"]
    assert error["param"].startswith(param)
    assert len(provider.requests) == n


# ---------------------------------------------------------------- every parameter reaches the provider


def test_every_sampling_parameter_reaches_the_provider(gateway, provider):
    client, _ = gateway
    r = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "one two three"}], max_tokens=10, temperature=0.4,
        top_p=0.8, stop=["zzz", "yyy"], seed=7, presence_penalty=0.5, frequency_penalty=-0.25,
        logit_bias={"42": -5, "7": 10}, logprobs=True, top_logprobs=2, user="user-1",
        response_format={"type": "json_object"})
    assert r.choices[0].message.content == "one two three"
    body = provider.requests[-1]["body"]
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
                                 "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user",
                                 "response_format")} == {
        "max_tokens": 10, "temperature": 0.4, "top_p": 0.8, "stop": ["zzz", "yyy"], "seed": 7,
        "presence_penalty": 0.5, "frequency_penalty": -0.25, "logit_bias": {"42": -5, "7": 10}, "logprobs": True,
        "top_logprobs": 2, "user": "user-1", "response_format": {"type": "json_object"}}

    schema = {"name": "answer", "strict": True,
              "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                   response_format={"type": "json_schema", "json_schema": schema})
    assert provider.requests[-1]["body"]["response_format"] == {"type": "json_schema", "json_schema": schema}

    client.completions.create(model="echo", prompt="a b c", max_tokens=3, seed=1, logprobs=2, presence_penalty=1.0,
                              frequency_penalty=1.5, logit_bias={"3": 1}, stop="q", user="user-2")
    body = provider.requests[-1]["body"]
    assert body["prompt"] == "a b c" and body["logprobs"] == 2 and body["seed"] == 1 and body["stop"] == ["q"]
    assert body["presence_penalty"] == 1.0 and body["frequency_penalty"] == 1.5 and body["logit_bias"] == {"3": 1}
    assert body["user"] == "user-2" and "top_logprobs" not in body and "messages" not in body


def test_provider_log_probabilities_come_back_in_the_choices(gateway):
    client, _ = gateway
    r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "red green blue"}],
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == ["red", "green", "blue"]
    assert [c.logprob for c in content] == [-0.25, -0.5, -0.75] and all(len(c.top_logprobs) == 2 for c in content)
    chunks = list(client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "red green"}],
                                                 logprobs=True, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == ["red", "green"]
    # Not asked for, none come back.
    assert client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a"}]
                                          ).choices[0].logprobs is None
    c = client.completions.create(model="echo", prompt="x y", logprobs=1)
    assert c.choices[0].logprobs.tokens == ["x", "y"] and c.choices[0].logprobs.token_logprobs == [-0.25, -0.5]


def test_a_parameter_the_provider_refuses_is_a_400_naming_it(gateway, provider):
    client, _ = gateway
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="no-bias", messages=[{"role": "user", "content": "a"}],
                                       logit_bias={"1": 2})
    assert e.value.body["param"] == "logit_bias" and "logit_bias is not supported" in e.value.body["message"]
    assert provider.requests[-1]["body"]["logit_bias"] == {"1": 2}
    ok = client.chat.completions.create(model="no-bias", messages=[{"role": "user", "content": "a b"}])
    assert ok.choices[0].message.content == "a b"


def test_the_gateway_cap_binds_providers_also_without_max_tokens(gateway, provider):
    """limits.max_tokens is 64 here: it is what the provider is sent when the client sets no limit."""
    client, _ = gateway
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}])
    assert provider.requests[-1]["body"]["max_tokens"] == 64
    list(client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}], stream=True))
    assert provider.requests[-1]["body"]["max_tokens"] == 64
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}],
                                   max_completion_tokens=9)
    assert provider.requests[-1]["body"]["max_tokens"] == 9
    client.completions.create(model="echo", prompt="a b")
    assert provider.requests[-1]["body"]["max_tokens"] == 16  # the completions endpoint's own default
    n = len(provider.requests)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a"}], max_tokens=65)
    assert e.value.body["param"] == "max_tokens" and len(provider.requests) == n


PII_PROMPT = "mail jane.doe@example.com or call +1 415-692-5513, card 4111 1111 1111 1111"


def test_pii_prompts_reach_the_provider_redacted_and_come_back_restored(gateway, provider):
    """pii.remote_prompts: the provider stand-in never sees the raw email, phone or card; with
    redact_restore the caller gets its own values back, streamed and not; with redact it gets
    the placeholders the provider saw."""
    client, _ = gateway
    n = len(provider.requests)
    r = client.chat.completions.create(model="pii-restore", messages=[{"role": "user", "content": PII_PROMPT}])
    assert r.choices[0].message.content == PII_PROMPT
    chunks = list(client.chat.completions.create(model="pii-restore", stream=True,
                                                 messages=[{"role": "user", "content": PII_PROMPT}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PII_PROMPT
    r = client.chat.completions.create(model="pii-redact", messages=[{"role": "user", "content": PII_PROMPT}])
    redacted = "mail <EMAIL_ADDRESS_1> or call <PHONE_NUMBER_1>, card <CREDIT_CARD_1>"
    assert r.choices[0].message.content == redacted
    seen = [json.dumps(q["body"]) for q in provider.requests[n:]]
    assert len(seen) == 3 and all(redacted in s for s in seen)
    for raw in ("jane.doe@example.com", "415-692-5513", "4111 1111 1111 1111"):
        assert not any(raw in s for s in seen), raw
    # Models without the policy send the prompt as it is (the default is off).
    client.chat.completions.create(model="echo", messages=[{"role": "user", "content": PII_PROMPT}])
    assert PII_PROMPT in json.dumps(provider.requests[-1]["body"])
