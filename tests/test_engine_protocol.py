"""The one engine interface and the request every engine takes (pure: no Ray, no model)."""

import inspect

import pytest
from pydantic import ValidationError

from models.engine import Engine, EngineStatus
from models.engines.openai_remote import RemoteOpenAIEngine
from models.engines.transformers_engine import TransformersEngine
from models.engines.vllm_engine import VLLMEngine
from models.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationEvent,
    GenerationKind,
    GenerationRequest,
    join_logprobs,
)
from serve.gateway.backends import ServeAppEngine, VLLMAppEngine


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


@pytest.mark.parametrize("cls", [TransformersEngine, RemoteOpenAIEngine, VLLMEngine, ServeAppEngine, VLLMAppEngine])
def test_every_engine_implements_the_one_interface(cls):
    assert issubclass(cls, Engine) and not inspect.isabstract(cls)
    params = list(inspect.signature(cls.stream).parameters)
    assert params == ["self", "request"]  # a GenerationRequest, whatever its kind
    assert inspect.isasyncgenfunction(cls.stream)


def test_engine_status_is_typed():
    assert EngineStatus.ready(max_context=8).model_dump() == {"status": "ready", "error": None, "max_context": 8}
    assert EngineStatus.model_validate({"status": "unhealthy", "error": "x", "dimension": 384}).dimension == 384
    with pytest.raises(ValidationError):
        EngineStatus(status="maybe")


def test_a_request_crosses_a_serve_handle_as_json_and_comes_back_equal():
    gen = chat_request(max_tokens=5, logprobs=True, top_logprobs=1, seed=3, logit_bias={"5": 1.5},
                       response_format={"type": "json_object"},
                       tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto").to_generation(64)
    wire = gen.model_dump(mode="json")
    assert wire["kind"] == "chat"
    assert GenerationRequest.model_validate(wire) == gen


def test_a_generation_needs_the_input_of_its_kind():
    with pytest.raises(ValidationError, match="needs messages"):
        GenerationRequest(kind=GenerationKind.CHAT, prompt="x")
    with pytest.raises(ValidationError, match="needs a prompt"):
        GenerationRequest(kind="completion", messages=[{"role": "user", "content": "x"}])


def test_top_logprobs_need_logprobs():
    with pytest.raises(ValidationError, match="needs logprobs"):
        chat_request(top_logprobs=2)
    assert chat_request(logprobs=True, top_logprobs=2).to_generation(64).params.top_logprobs == 2


def test_the_openai_body_has_every_set_parameter_and_always_max_tokens():
    body = chat_request().to_generation(64).openai_body("upstream-name")
    assert body == {"model": "upstream-name", "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": 64, "temperature": 1.0, "top_p": 1.0,
                    "messages": [{"role": "user", "content": "hi"}]}
    body = chat_request(max_tokens=9, stop="x", presence_penalty=1, frequency_penalty=2, logit_bias={"1": -1},
                        seed=4, user="u", logprobs=True, response_format={"type": "text"}).to_generation(64) \
        .openai_body("m")
    assert body["max_tokens"] == 9 and body["stop"] == ["x"] and body["presence_penalty"] == 1
    assert body["frequency_penalty"] == 2 and body["logit_bias"] == {"1": -1} and body["seed"] == 4
    assert body["user"] == "u" and body["logprobs"] is True and "top_logprobs" not in body
    assert body["response_format"] == {"type": "text"}
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "p", "logprobs": 0, "max_tokens": 100})
    body = completion.to_generation(50).openai_body("m")
    assert body["prompt"] == "p" and body["logprobs"] == 0 and body["max_tokens"] == 50  # the cap binds


def test_log_probabilities_of_consecutive_events_join():
    a = {"content": [{"token": "a"}]}
    b = {"content": [{"token": "b"}]}
    assert join_logprobs(a, b) == {"content": [{"token": "a"}, {"token": "b"}]}
    assert join_logprobs(None, b) == b and join_logprobs(a, None) == a
    merged = GenerationEvent(text="a", logprobs=a).followed_by(GenerationEvent(text="b", logprobs=b,
                                                                               finish_reason="stop"))
    assert merged.text == "ab" and merged.finish_reason == "stop" and len(merged.logprobs["content"]) == 2
