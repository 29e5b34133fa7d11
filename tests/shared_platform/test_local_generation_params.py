"""The OpenAI sampling parameters on a local transformers model, through the gateway with the
official `openai` client: each is honoured, or refused with a 400 naming it, never dropped."""

import openai
import pytest

from harness import make_key

from . import CHAT


@pytest.fixture(scope="module")
def client(shared_platform):
    """The package's platform (conftest.py): its tiny chat model is the local transformers model."""
    _, key = make_key(shared_platform.settings, "admin")
    return openai.OpenAI(base_url=shared_platform.base + "/v1", api_key=key, max_retries=0)


def ask(client, **kw):
    return client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hello there"}], **kw)


@pytest.mark.parametrize("fmt", [{"type": "json_object"},
                                 {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}])
@pytest.mark.parametrize("stream", [False, True])
def test_json_mode_is_refused_naming_response_format(client, fmt, stream):
    with pytest.raises(openai.BadRequestError) as e:
        r = ask(client, max_tokens=4, response_format=fmt, stream=stream)
        list(r) if stream else None
    assert e.value.body["param"] == "response_format" and "constrained decoding" in e.value.body["message"]


def test_logit_bias_is_honoured(client):
    # Token 7592 is "hello" in the tiny model's WordPiece vocabulary (tests/test_transformers_engine.py
    # checks the same bias on the engine itself).
    r = ask(client, max_tokens=4, temperature=0, logit_bias={"7592": 100})
    assert r.choices[0].message.content == "hello hello hello hello"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, max_tokens=2, logit_bias={"99999999": 1})
    assert e.value.body["param"] == "logit_bias"


def test_penalties_are_honoured(client):
    greedy = ask(client, max_tokens=10, temperature=0).choices[0].message.content.split()
    assert len(set(greedy)) < len(greedy)
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        words = ask(client, max_tokens=10, temperature=0, **penalty).choices[0].message.content.split()
        assert len(set(words)) == len(words), (penalty, words)


def test_seed_makes_sampling_repeatable(client):
    a, b, c = (ask(client, max_tokens=8, seed=s).choices[0].message.content for s in (11, 11, 12))
    assert a == b != c


def test_logprobs_come_back_in_the_choices(client):
    r = ask(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    streamed = [c for ch in ask(client, max_tokens=5, temperature=0, logprobs=True, stream=True)
                if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    completion = client.completions.create(model=CHAT, prompt="hello there", max_tokens=3, temperature=0, logprobs=1)
    assert len(completion.choices[0].logprobs.token_logprobs) == 3


def test_stop_and_user_are_honoured(client):
    full = ask(client, max_tokens=12, seed=3).choices[0].message.content
    stop = full.split()[2]
    cut = ask(client, max_tokens=12, seed=3, stop=[stop], user="someone")
    assert stop not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
