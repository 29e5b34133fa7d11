"""A caller that goes away gives its slot back: the router's in-flight count and a half-open
breaker's trial are released whether the client leaves before the first token or mid-stream.
Real parts: the router and the remote backend against a real provider server on loopback."""

import asyncio
import time

import pytest

from harness import PROVIDER_KEY, platform_settings, remote_model
from models.protocol import GenerationKind, GenerationRequest
from serve.gateway.backends import BackendRegistry
from serve.router import health
from serve.router.runtime import Router


@pytest.fixture
def router(provider, tmp_path, monkeypatch):
    monkeypatch.setenv("ORFEAS_TEST_PROVIDER_KEY", PROVIDER_KEY)
    settings = platform_settings(tmp_path, 8000, models=[remote_model(provider, m, m) for m in ("slow", "echo")])
    return Router(settings, BackendRegistry(settings))


class Caller:
    key_id, role, models, team = "k", "admin", None, ""

    def check_model(self, _):
        pass

    def may_use(self, _):
        return True


def chat(text: str) -> GenerationRequest:
    return GenerationRequest(kind=GenerationKind.CHAT, messages=[{"role": "user", "content": text}])


def half_open(router: Router, mid: str) -> None:
    """The circuit of `mid` open long enough ago that the next request is its trial."""
    router.health[mid] = health.BackendHealth(state=health.OPEN, opened_at=time.monotonic() - 3600)


async def opened(router: Router, mid: str, text: str):
    route = await router.resolve(mid, {"model": mid}, Caller(), {}, 16, None)
    return await router.open(route, chat(text), time.monotonic() + 30)


async def open_then_cancel(router: Router, mid: str) -> None:
    route = await router.resolve(mid, {"model": mid}, Caller(), {}, 16, None)
    task = asyncio.create_task(router.open(route, chat("hello"), time.monotonic() + 30))
    await asyncio.sleep(0.5)  # the provider holds its first byte for `slow_s` (5 s)
    assert router.outstanding[mid] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_client_gone_before_the_first_token_releases_in_flight_and_trial(router):
    async def run():
        half_open(router, "slow")
        await open_then_cancel(router, "slow")
        assert router.outstanding["slow"] == 0
        h = router.health["slow"]
        assert h.state == health.HALF_OPEN and h.trials == 0
        # The next request is admitted as the trial (it was refused as circuit_open before the fix).
        assert health.admit(h, time.monotonic(), router.cfg.breaker)[0]

    asyncio.run(run())


def test_client_gone_mid_stream_releases_in_flight_and_trial(router):
    async def run():
        half_open(router, "echo")
        stream = await opened(router, "echo", "one two three four five six")
        assert router.outstanding["echo"] == 1
        await anext(stream.events)  # one more event, then the client leaves
        await stream.events.aclose()
        assert router.outstanding["echo"] == 0
        assert router.health["echo"].trials == 0
        assert health.admit(router.health["echo"], time.monotonic(), router.cfg.breaker)[0]

    asyncio.run(run())


def test_a_stream_closed_before_it_is_read_is_accounted_once(router):
    async def run():
        stream = await opened(router, "echo", "a b c")
        await stream.events.aclose()
        await stream.events.aclose()
        assert router.outstanding["echo"] == 0

    asyncio.run(run())


def test_a_finished_stream_closes_the_half_open_circuit(router):
    async def run():
        half_open(router, "echo")
        stream = await opened(router, "echo", "a b")
        async for event in stream.events:
            if event.finish_reason:
                break
        await stream.events.aclose()
        assert router.outstanding["echo"] == 0
        assert router.health["echo"].state == health.CLOSED

    asyncio.run(run())


def test_a_door_claim_is_handed_over_when_the_attempt_starts_and_released_once(router):
    """A request counted at the gateway's door (`Claim`) moves to the in-flight count when its
    first attempt starts; a client gone before the first token leaves neither count behind."""
    from serve.router.runtime import Claim

    async def run():
        claim = Claim(router.claimed, "echo")
        route = await router.resolve("echo", {"model": "echo"}, Caller(), {}, 16, None)
        assert router.claimed["echo"] == 1
        stream = await router.open(route, chat("a b"), time.monotonic() + 30, claim=claim)
        assert (router.claimed["echo"], router.outstanding["echo"]) == (0, 1)
        claim.release()  # the door's own release afterwards counts nothing twice
        await stream.events.aclose()
        assert (router.claimed["echo"], router.outstanding["echo"]) == (0, 0)
        claim = Claim(router.claimed, "slow")
        route = await router.resolve("slow", {"model": "slow"}, Caller(), {}, 16, None)
        task = asyncio.create_task(router.open(route, chat("hello"), time.monotonic() + 30, claim=claim))
        await asyncio.sleep(0.5)  # the provider holds its first byte for `slow_s` (5 s)
        assert (router.claimed["slow"], router.outstanding["slow"]) == (0, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        claim.release()
        assert (router.claimed["slow"], router.outstanding["slow"]) == (0, 0)

    asyncio.run(run())
