"""The transformers engine on a tiny local model: sampling controls, stops, limits, streaming."""

import asyncio

import pytest

from config import ModelSpec
from models.engines.transformers_engine import ModelLoadError, TransformersEngine
from models.errors import InvalidRequest
from models.protocol import GenerationParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = TransformersEngine(ModelSpec(id="tiny", engine="transformers", source=str(tiny_model_dir), max_context=128))
    e.load()
    return e


def run(engine, params, prompt="hello there"):
    async def go():
        ids = engine.chat_prompt_ids([{"role": "user", "content": prompt}])
        return [ev async for ev in engine.stream(ids, params)]

    return asyncio.run(go())


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
    async def go(tools):
        ids = engine.chat_prompt_ids([{"role": "user", "content": "hello there"}])
        return [ev async for ev in engine.stream(ids, GenerationParams(max_tokens=24, temperature=0), tools)]

    plain, offered = asyncio.run(go(None)), asyncio.run(go({"weather"}))
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
