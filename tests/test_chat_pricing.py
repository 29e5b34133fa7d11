"""Settling a chat: an answer cut short is priced by the tokens actually sent, and a provider
that reports no usage is priced from counted tokens (real gateway, real provider on loopback)."""

import time

import httpx
import pytest
import ray

from analytics.ledger import ledger
from harness import deployed, make_key, platform_settings, remote_model

WORDS = " ".join(f"w{i}" for i in range(300))  # the provider sends one word every 10 ms: ~3 s


@pytest.fixture(scope="module")
def gateway(serve_port, provider, tmp_path_factory):
    # A dollar a token each way, so any counted token shows in the cost.
    price = {"price_input_per_m": 1e6, "price_output_per_m": 1e6}
    settings = platform_settings(tmp_path_factory.mktemp("pricing-data"), serve_port, models=[
        remote_model(provider, "echo", "echo", **price), remote_model(provider, "quiet", "nousage", **price)])
    with deployed(settings):
        _, key = make_key(settings, "admin")
        yield settings, f"http://127.0.0.1:{serve_port}/v1", {"Authorization": f"Bearer {key}"}


def ledger_entry(settings, response_id: str, timeout_s: float = 30) -> dict:
    """The ledger's entry for a response (the gateway records it without waiting)."""
    actor = ledger(settings.resolved_data_dir())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = ray.get(actor.entry.remote(response_id))
        if entry is not None:
            return entry
        time.sleep(0.2)
    raise AssertionError(f"no ledger entry for {response_id}")


def test_a_stream_cut_short_is_priced_by_the_tokens_sent(gateway):
    settings, base, headers = gateway
    body = {"model": "echo", "messages": [{"role": "user", "content": WORDS}], "stream": True,
            "stream_options": {"include_usage": True}}
    received = 0
    with httpx.stream("POST", base + "/chat/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        rid = r.headers["x-orfeas-response-id"]
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line.replace(" ", "") and '"content":""' not in line:
                received += 1
                if received == 5:
                    break  # the client goes away mid-answer
    entry = ledger_entry(settings, rid)
    assert entry["error"] is True
    assert 1 <= entry["completion_tokens"] < 300, entry
    assert entry["prompt_tokens"] > 0 and entry["cost_usd"] > 0, entry


def test_a_provider_without_usage_is_priced_from_counted_tokens(gateway):
    settings, base, headers = gateway
    r = httpx.post(base + "/chat/completions", headers=headers, timeout=30,
                   json={"model": "quiet", "messages": [{"role": "user", "content": "one two three four"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "one two three four"
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] >= 4, usage
    assert float(r.headers["x-orfeas-cost-usd"]) > 0
    entry = ledger_entry(settings, r.headers["x-orfeas-response-id"])
    assert entry["completion_tokens"] == usage["completion_tokens"] and entry["cost_usd"] > 0
