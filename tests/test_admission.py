"""Admission control and fast recovery of a model deployment on the session cluster: the tiny
transformers model behind a queue of one (`max_ongoing_requests` 1, `max_queued_requests` 1),
real HTTP on 127.0.0.1. Beyond the queue a request gets 503 `model_overloaded` with Retry-After
(at once, not after a timeout), load never opens the circuit nor reads as an unhealthy model, and
a breaker re-admits a backend on a passing probe, before its cooldown."""

import asyncio
import time

import httpx
import pytest

from config import ModelSpec
from config.settings import BreakerSettings
from harness import deployed, make_key, platform_settings
from serve.router import health

CHAT = "tiny-chat"


def test_a_passing_probe_re_admits_an_open_circuit_before_its_cooldown():
    cfg = BreakerSettings(cooldown_s=30)
    opened = health.BackendHealth(state=health.OPEN, opened_at=100.0, last_error="replica lost")
    assert health.probe(opened, True, 100.5, cfg).state == health.OPEN  # not within a probe interval
    h = health.probe(opened, True, 101.0, cfg)  # healthy again a probe interval later, cooldown or not
    assert h.state == health.HALF_OPEN and h.trials == 0
    ok, h = health.admit(h, 100.6, cfg)
    assert ok  # the next request is the trial...
    assert health.record(h, True, 0.1, 100.7, cfg, 0.2).state == health.CLOSED  # ...and closes it
    assert health.probe(opened, False, 100.5, cfg).state == health.OPEN


def test_a_request_no_model_of_its_plan_has_room_for_is_refused_before_rate_limits(tmp_path):
    """The gateway sheds first (Router.refusal, asked before the rate limiter and budgets): only
    when every model of the route's plan has its whole queue in flight from this replica."""
    from models.errors import ModelOverloaded
    from serve.gateway.backends import BackendRegistry
    from serve.router.runtime import Route, Router

    settings = platform_settings(tmp_path, 8000, models=[
        ModelSpec(id="a", engine="transformers", source="x", max_ongoing_requests=2, max_queued_requests=1),
        ModelSpec(id="b", engine="transformers", source="x", max_ongoing_requests=1, max_queued_requests=0)])
    router = Router(settings, BackendRegistry(settings))
    route = Route("a", "named", ["a", "b"], "test")
    router.outstanding["a"] = 3  # a's whole queue: 2 ongoing x 1 replica + 1 queued
    assert router.refusal(route) is None  # b still has room: the router will fall back to it
    router.outstanding["b"] = 1
    refused = router.refusal(route)
    assert isinstance(refused, ModelOverloaded) and refused.status == 503 and refused.retry_after_s
    router.outstanding["a"] = 2
    assert router.refusal(route) is None


@pytest.fixture(scope="module")
def platform(serve_port, tiny_model_dir, tmp_path_factory):
    settings = platform_settings(
        tmp_path_factory.mktemp("admission") / "data", serve_port,
        router={"breaker": {"cooldown_s": 600, "failure_threshold": 3}},
        models=[ModelSpec(id=CHAT, engine="transformers", source=str(tiny_model_dir), max_context=256,
                          max_ongoing_requests=1, max_queued_requests=1)],
    )
    with deployed(settings):
        _, admin = make_key(settings, "admin")
        yield {"base": f"http://127.0.0.1:{serve_port}", "admin": admin}


def test_beyond_the_queue_requests_get_503_with_retry_after_and_the_model_stays_healthy(platform):
    headers = {"Authorization": f"Bearer {platform['admin']}"}
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 48, "stream": True}

    async def one(c: httpx.AsyncClient) -> tuple[int, dict, str, float]:
        start = time.perf_counter()
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            text = (await r.aread()).decode()
            return r.status_code, dict(r.headers), text, time.perf_counter() - start

    async def burst():
        async with httpx.AsyncClient(base_url=platform["base"], timeout=120) as c:
            return await asyncio.gather(*(one(c) for _ in range(10)))

    results = asyncio.run(burst())
    statuses = sorted(s for s, *_ in results)
    assert set(statuses) <= {200, 503}, statuses
    refused = [(h, t) for s, h, t, _ in results if s == 503]
    assert refused and statuses.count(200) >= 1, statuses  # what the replica and its queue hold is served
    for h, text in refused:
        assert h.get("retry-after", "").isdigit(), h
        assert '"model_overloaded"' in text, text
    served = [t for s, _, t, _ in results if s == 200]
    assert all("data: [DONE]" in t for t in served)
    # Load is not failure: the circuit stays closed and the model ready.
    status = httpx.get(platform["base"] + "/v1/router/status", headers=headers, timeout=30).json()
    assert status["backends"][CHAT]["state"] == "closed" and status["backends"][CHAT]["failures"] == 0, status
    ready = httpx.get(platform["base"] + "/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
