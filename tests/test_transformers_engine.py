"""The transformers engine on a tiny local model: sampling controls, stops, limits, streaming,
and every OpenAI parameter either honoured or refused naming it."""

import asyncio
import math

import pytest

from config import ModelSpec
from models.engine import Engine
from models.engines.transformers_engine import ModelLoadError, TransformersEngine, _Penalties
from models.errors import InvalidRequest
from models.protocol import GenerationKind, GenerationParams, GenerationRequest, ResponseFormat


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = TransformersEngine(ModelSpec(id="tiny", engine="transformers", source=str(tiny_model_dir), max_context=128))
    e.load()
    return e


def chat(params: GenerationParams, prompt: str = "hello there", **fields) -> GenerationRequest:
    return GenerationRequest(kind=GenerationKind.CHAT, messages=[{"role": "user", "content": prompt}], params=params,
                             **fields)


def stream(engine, request: GenerationRequest):
    async def go():
        return [ev async for ev in engine.stream(request)]

    return asyncio.run(go())


def run(engine, params, prompt="hello there"):
    return stream(engine, chat(params, prompt))


def text_of(events):
    return "".join(e.text for e in events)


def test_streams_tokens_and_reports_usage(engine):
    events = run(engine, GenerationParams(max_tokens=12, seed=1))
    assert len([e for e in events if e.text]) > 1  # a real stream, not one blob
    last = events[-1]
    assert last.finish_reason in ("length", "stop") and last.usage.completion_tokens <= 12
    if last.finish_reason == "length":
        assert last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == len(engine.chat_prompt_ids([{"role": "user", "content": "hello there"}]))


def test_seed_and_greedy_are_deterministic(engine):
    a = text_of(run(engine, GenerationParams(max_tokens=10, seed=5)))
    b = text_of(run(engine, GenerationParams(max_tokens=10, seed=5)))
    c = text_of(run(engine, GenerationParams(max_tokens=10, seed=6)))
    assert a == b and a != c
    g1 = text_of(run(engine, GenerationParams(max_tokens=10, temperature=0)))
    g2 = text_of(run(engine, GenerationParams(max_tokens=10, temperature=0, seed=99)))
    assert g1 == g2


def test_stop_sequence_cuts_the_text_and_ends_early(engine):
    full = text_of(run(engine, GenerationParams(max_tokens=20, seed=3)))
    words = full.split()
    assert len(words) >= 4
    stop = words[3]
    events = run(engine, GenerationParams(max_tokens=20, seed=3, stop=[stop]))
    text = text_of(events)
    assert stop not in text and full.startswith(text)
    assert events[-1].finish_reason == "stop" and events[-1].usage.completion_tokens < 20


def test_context_limits_are_enforced(engine):
    with pytest.raises(InvalidRequest) as e:
        run(engine, GenerationParams(max_tokens=125))
    assert e.value.param == "max_tokens" and "context" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        run(engine, GenerationParams(max_tokens=1), prompt="word " * 200)
    assert e.value.param == "messages"
    # Without max_tokens the answer fits what is left of the context.
    events = run(engine, GenerationParams(max_tokens=None, max_tokens_cap=8, seed=2))
    assert events[-1].usage.completion_tokens <= 8


def test_missing_model_fails_fast_with_a_clear_message(tmp_path):
    import time

    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache.*allow_download"):
        TransformersEngine(ModelSpec(id="x", engine="transformers", source="nobody/no-such-model")).load()
    with pytest.raises(ModelLoadError, match="does not exist"):
        TransformersEngine(ModelSpec(id="y", engine="transformers", source=str(tmp_path / "nothing"))).load()
    assert time.monotonic() - start < 5


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_offered_tools_the_model_does_not_call_leave_its_answer_whole(engine):
    """Text held back while it might become a tool call is all given back when it does not."""
    params = GenerationParams(max_tokens=24, temperature=0)
    plain = stream(engine, chat(params))
    # The tiny template ignores tools, so the prompt is the same and only the holding back differs.
    offered = stream(engine, chat(params, tools=TOOLS, tool_choice="auto"))
    assert text_of(plain) and text_of(offered) == text_of(plain)
    assert offered[-1].finish_reason == plain[-1].finish_reason != "tool_calls"
    assert all(e.tool_calls is None for e in offered)


def test_tools_and_tool_turns_reach_the_chat_template(tiny_model_dir):
    """OpenAI tool turns are handed to the model's template as Hugging Face templates expect them:
    the offered tools, calls with their arguments as objects, results with their call id."""
    e = TransformersEngine(ModelSpec(id="tiny-tools", engine="transformers", source=str(tiny_model_dir)))
    e.load()
    e.tokenizer.chat_template = (
        "{% for t in tools or [] %}tool {{ t.function.name }} [SEP] {% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}call {{ c.function.name }} city {{ c.function.arguments.city }}{% endfor %}"
        "{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %} [SEP] {% endfor %}assistant:")
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "oslo"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    prompt = e.tokenizer.decode(e.chat_prompt_ids(messages, TOOLS))
    assert prompt.startswith("tool weather [SEP]")
    assert "call weather city oslo" in prompt and "tool : sunny for c1" in prompt


# ---------------------------------------------------------------- the Engine interface and the OpenAI parameters


def test_it_is_an_engine_and_serves_completions_from_the_bare_prompt(engine):
    assert isinstance(engine, Engine)
    assert asyncio.run(engine.status()).status == "ready"
    prompt = "the quick brown fox"
    events = stream(engine, GenerationRequest(kind=GenerationKind.COMPLETION, prompt=prompt,
                                              params=GenerationParams(max_tokens=4, temperature=0)))
    assert events[-1].usage.prompt_tokens == len(engine.text_prompt_ids(prompt))  # no chat template around it
    assert events[-1].usage.completion_tokens == 4


def test_a_prompt_over_the_context_names_prompt_for_completions(engine):
    with pytest.raises(InvalidRequest) as e:
        stream(engine, GenerationRequest(kind=GenerationKind.COMPLETION, prompt="word " * 200,
                                         params=GenerationParams(max_tokens=1)))
    assert e.value.param == "prompt"


@pytest.mark.parametrize("fmt", [ResponseFormat(type="json_object"),
                                 ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": {}})])
def test_json_mode_is_refused_naming_response_format(engine, fmt):
    with pytest.raises(InvalidRequest) as e:
        run(engine, GenerationParams(max_tokens=4, response_format=fmt))
    assert e.value.param == "response_format" and fmt.type in e.value.message
    # Plain text is what the engine does anyway.
    assert run(engine, GenerationParams(max_tokens=2, response_format=ResponseFormat(type="text")))[-1].finish_reason


def test_presence_and_frequency_penalties_are_openais():
    """logit -= frequency * count + presence * (count > 0), over the generated tokens only."""
    import torch

    prompt = [5, 7]
    ids = torch.tensor([prompt + [5, 5, 9]])
    out = _Penalties(len(prompt), presence=0.5, frequency=0.25)(ids, torch.zeros(1, 12))
    assert out[0, 5].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[0, 9].item() == pytest.approx(-(0.5 + 0.25))
    assert out[0, 7].item() == 0 and out[0, 0].item() == 0  # prompt-only and unseen tokens are left alone


def test_penalties_change_what_the_model_generates(engine):
    greedy = text_of(run(engine, GenerationParams(max_tokens=12, temperature=0))).split()
    assert len(set(greedy)) < len(greedy)  # the random tiny model repeats itself when greedy
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        words = text_of(run(engine, GenerationParams(max_tokens=12, temperature=0, **penalty))).split()
        assert len(set(words)) == len(words), (penalty, words)


def test_logit_bias_forces_and_bans_tokens(engine):
    hello = engine.tokenizer.convert_tokens_to_ids("hello")
    for temperature in (0, 1.0):
        forced = run(engine, GenerationParams(max_tokens=5, temperature=temperature, seed=3,
                                              logit_bias={str(hello): 100}))
        assert text_of(forced) == "hello hello hello hello hello"
    greedy = text_of(run(engine, GenerationParams(max_tokens=3, temperature=0))).split()
    top = engine.tokenizer.convert_tokens_to_ids(greedy[0])
    banned = text_of(run(engine, GenerationParams(max_tokens=3, temperature=0, logit_bias={str(top): -100})))
    assert greedy[0] not in banned.split()


def test_logit_bias_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(InvalidRequest) as e:
        run(engine, GenerationParams(max_tokens=2, logit_bias={"99999999": 5}))
    assert e.value.param == "logit_bias" and "99999999" in e.value.message


def test_logprobs_of_every_generated_token_with_the_top_ones(engine):
    events = run(engine, GenerationParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3))
    entries = [c for e in events for c in (e.logprobs or {}).get("content", [])]
    assert len(entries) == events[-1].usage.completion_tokens == 6
    assert "".join(c["token"] for c in entries).replace(" ", "") == text_of(events).replace(" ", "")
    for c in entries:
        assert c["logprob"] <= 0 and len(c["top_logprobs"]) == 3
        # Greedy picks the most likely token, whose log-probability is the model's own.
        assert c["top_logprobs"][0]["token"] == c["token"]
        assert c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"])
        assert c["bytes"] == list(c["token"].encode())
    # Without logprobs none are computed; without top_logprobs only the chosen token's.
    assert all(e.logprobs is None for e in run(engine, GenerationParams(max_tokens=3, temperature=0)))
    only = run(engine, GenerationParams(max_tokens=3, temperature=0, logprobs=True))
    assert all(c["top_logprobs"] == [] for e in only for c in (e.logprobs or {}).get("content", []))


def test_completion_logprobs_have_openais_completion_shape(engine):
    events = stream(engine, GenerationRequest(kind=GenerationKind.COMPLETION, prompt="hello there", params=GenerationParams(
        max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)))
    tokens = [t for e in events for t in (e.logprobs or {}).get("tokens", [])]
    lps = [x for e in events for x in (e.logprobs or {}).get("token_logprobs", [])]
    tops = [x for e in events for x in (e.logprobs or {}).get("top_logprobs", [])]
    assert len(tokens) == len(lps) == len(tops) == 4
    assert all(len(t) <= 2 and math.isfinite(v) for t, v in zip(tops, lps))
    assert all(max(t.values()) == pytest.approx(v) for t, v in zip(tops, lps))  # greedy: the chosen is the top
