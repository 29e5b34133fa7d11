"""The gateway's stale-while-revalidate cache of health answers (no Ray needed)."""

import asyncio

from serve.gateway.backends import StaleWhileRevalidate


def test_stale_answer_served_while_one_refresh_runs_and_a_failed_refresh_keeps_it():
    async def scenario():
        answers, calls = ["a", "b", RuntimeError("controller away"), "d", "e", "f"], []

        async def fetch():
            calls.append(len(calls))
            await asyncio.sleep(0.01)
            answer = answers[len(calls) - 1]
            if isinstance(answer, Exception):
                raise answer
            return answer

        cache = StaleWhileRevalidate(fetch, max_age_s=0.0, what="test")
        assert await cache.get() == "a"                       # first read waits for the fetch
        assert [await cache.get() for _ in range(3)] == ["a"] * 3  # stale at once, one refresh started
        await asyncio.sleep(0)
        assert len(calls) == 2
        await asyncio.sleep(0.03)
        assert await cache.get() == "b"                       # the refresh landed; the next one fails
        await asyncio.sleep(0.03)
        assert await cache.get() == "b"                       # failure logged, last answer kept
        await asyncio.sleep(0.03)
        assert await cache.get() == "d"
        cache.set("probe")                                    # a fresher answer from an active probe
        assert await cache.get() == "probe"
        await asyncio.sleep(0.03)
        cache.forget()
        assert await cache.get() == "f"                       # forgotten: the next read waits again

    asyncio.run(scenario())
