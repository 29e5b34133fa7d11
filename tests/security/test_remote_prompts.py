"""Prompts to remote providers redacted (pii.remote_prompts), and the placeholders restored in the
answer: the real remote engine against the loopback provider stand-in, no Ray. The gateway path
(the openai client, streamed and not) is in tests/test_remote_provider.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from config import ModelSpec, Settings
from harness import free_port
from models.engines.openai_remote import RemoteOpenAIEngine
from models.protocol import GenerationKind, GenerationRequest, ToolCallCollector
from provider_server import ProviderServer
from security.remote_prompts import RedactingEngine, Restorer, guarded, policy_for

EMAIL, PHONE, CARD = "jane.doe@example.com", "+1 415-692-5513", "4111 1111 1111 1111"
RAW = (EMAIL, PHONE, CARD)


@pytest.fixture(scope="module")
def provider():
    server = ProviderServer(free_port()).start()
    yield server
    server.stop()


def remote(provider, model_id: str, source: str = "echo") -> ModelSpec:
    return ModelSpec(id=model_id, engine="openai", base_url=provider.base_url, source=source)


def settings_for(provider, **pii) -> Settings:
    return Settings(models=[remote(provider, "r-echo"), remote(provider, "r-script", "script"),
                            ModelSpec(id="local", engine="transformers", source="/nowhere")], pii=pii)


def run(engine, gen: GenerationRequest):
    async def go():
        events = [e async for e in engine.stream(gen)]
        await engine.aclose()
        return events
    return asyncio.run(go())


def chat(*messages, **kw) -> GenerationRequest:
    return GenerationRequest(kind=GenerationKind.CHAT, messages=list(messages), **kw)


def test_policy_per_model_and_local_models_untouched(provider):
    s = settings_for(provider, remote_prompts="redact", remote_prompts_models={"r-script": "off"})
    assert [policy_for(s, m) for m in s.models] == ["redact", "off", "off"]
    local = s.model("local")
    assert policy_for(settings_for(provider, remote_prompts="redact_restore"), local) == "off"
    off = settings_for(provider)  # the default: off
    engine = RemoteOpenAIEngine(off.model("r-echo"))
    assert guarded(engine, off) is engine  # no wrapper, no Presidio call
    assert isinstance(guarded(engine, s), RedactingEngine)
    with pytest.raises(ValueError, match="pii.remote_prompts_models: local not a remote"):
        Settings(models=s.models, pii={"remote_prompts_models": {"local": "redact"}})


def test_restorer_holds_back_a_placeholder_split_anywhere():
    mapping = {"<EMAIL_ADDRESS_1>": EMAIL, "<PHONE_NUMBER_12>": PHONE}
    text = "Write to <EMAIL_ADDRESS_1> or <PHONE_NUMBER_12>; <b> and <CREDIT_CARD_3> stay, a<"
    want = f"Write to {EMAIL} or {PHONE}; <b> and <CREDIT_CARD_3> stay, a<"
    for cut in range(1, len(text)):
        for second in (cut + 1, cut + 5, len(text)):
            r = Restorer(mapping)
            pieces = [r.feed(text[:cut]), r.feed(text[cut:second]), r.feed(text[second:]), r.flush()]
            assert "".join(pieces) == want, (cut, second)
            assert not any("<EMAIL_ADDRESS_1>" in p or "<PHONE" in p for p in pieces)


def test_redact_only_sends_placeholders_and_returns_them(provider):
    s = settings_for(provider, remote_prompts="redact")
    engine = guarded(RemoteOpenAIEngine(s.model("r-echo")), s)
    n = len(provider.requests)
    events = run(engine, chat({"role": "system", "content": f"The user is {EMAIL}."},
                              {"role": "user", "content": [{"type": "text", "text": f"mail {EMAIL} call {PHONE}"}]},
                              {"role": "user", "content": f"card {CARD} mail {EMAIL}"}, params={"user": EMAIL}))
    sent = json.dumps(provider.requests[n]["body"])
    assert not any(v in sent for v in RAW), sent
    body = provider.requests[n]["body"]
    assert body["messages"][0]["content"] == "The user is <EMAIL_ADDRESS_1>."  # numbered once per request
    assert body["messages"][1]["content"][0]["text"] == "mail <EMAIL_ADDRESS_1> call <PHONE_NUMBER_1>"
    assert body["user"] == "<EMAIL_ADDRESS_1>"
    assert "".join(e.text for e in events) == "card <CREDIT_CARD_1> mail <EMAIL_ADDRESS_1>"


def test_redact_restore_maps_text_and_tool_call_arguments_back(provider):
    s = settings_for(provider, remote_prompts="redact_restore")
    def echo():
        return guarded(RemoteOpenAIEngine(s.model("r-echo")), s)

    n = len(provider.requests)
    events = run(echo(), chat({"role": "user", "content": f"card {CARD} mail {EMAIL} or {PHONE}"}))
    assert not any(v in json.dumps(provider.requests[n]["body"]) for v in RAW)
    assert "".join(e.text for e in events) == f"card {CARD} mail {EMAIL} or {PHONE}"
    assert events[-1].finish_reason == "stop"
    # A completion prompt too.
    events = run(echo(), GenerationRequest(kind=GenerationKind.COMPLETION, prompt=f"reach {EMAIL}"))
    assert "".join(e.text for e in events) == f"reach {EMAIL}"
    assert provider.requests[-1]["body"]["prompt"] == "reach <EMAIL_ADDRESS_1>"
    # Tool-call arguments come back in two pieces, cut through the placeholder: restored whole.
    args = {"to": EMAIL, "note": "x"}
    sent_args = json.dumps({**args, "to": "<EMAIL_ADDRESS_1>"})
    assert sent_args.index("<") < len(sent_args) // 2 < sent_args.index(">")  # the stand-in's cut
    script = json.dumps([{"tool_calls": [{"name": "send", "arguments": args}]}])
    n = len(provider.requests)
    events = run(guarded(RemoteOpenAIEngine(s.model("r-script")), s),
                 chat({"role": "system", "content": "SCRIPT: " + script}, {"role": "user", "content": "go"}))
    assert EMAIL not in json.dumps(provider.requests[n]["body"])
    calls = ToolCallCollector()
    for e in events:
        calls.add(e.tool_calls)
    (call,) = calls.calls()
    assert json.loads(call.function.arguments) == args


def test_a_bare_yaml_off_is_the_off_policy(tmp_path):
    from config import load_settings

    f = tmp_path / "orfeas.yaml"
    f.write_text("models:\n  - {id: r, engine: openai, base_url: 'http://127.0.0.1:9/v1', source: echo}\n"
                 "pii:\n  remote_prompts: off\n  remote_prompts_models: {r: off}\n")
    s = load_settings(f)
    assert s.pii.remote_prompts == "off" and s.pii.remote_prompts_models == {"r": "off"}
    f.write_text("pii:\n  remote_prompts: scramble\n")
    with pytest.raises(Exception, match="pii.remote_prompts"):
        load_settings(f)
