"""Stream batching between a model replica and its caller: the first event at once, then what a
fast engine produced within each interval as one event; nothing lost, order kept, and a caller
that goes away stops the engine."""

import asyncio

import pytest

from models.protocol import GenerationEvent, ToolCallDelta, Usage
from serve.model_apps import batched


async def source(n: int, gap_s: float, log: list[str], fail_at: int | None = None):
    try:
        for i in range(n):
            await asyncio.sleep(gap_s)
            if i == fail_at:
                raise RuntimeError("engine broke")
            last = i == n - 1
            yield GenerationEvent(text=f"t{i} ", finish_reason="stop" if last else None,
                                  usage=Usage.of(3, n) if last else None)
    finally:
        log.append("closed")


def collect(events):
    async def go():
        return [e async for e in events]
    return asyncio.run(go())


def test_first_event_alone_then_batches_with_nothing_lost():
    log: list[str] = []
    out = collect(batched(source(12, 0.002, log), interval_s=0.05))
    assert out[0].text == "t0 "
    assert 2 <= len(out) < 12  # fewer messages than tokens
    assert "".join(e.text for e in out) == "".join(f"t{i} " for i in range(12))
    assert out[-1].finish_reason == "stop" and out[-1].usage.completion_tokens == 12
    assert all(e.finish_reason is None for e in out[:-1]) and log == ["closed"]


def test_slow_engines_and_zero_interval_pass_every_event():
    assert len(collect(batched(source(4, 0.03, []), interval_s=0.005))) == 4
    assert len(collect(batched(source(6, 0.0, []), interval_s=0))) == 6


def test_tool_call_pieces_are_kept_in_order():
    async def calls():
        yield GenerationEvent(text="")
        for piece in ('{"a"', ': 1}'):
            yield GenerationEvent(tool_calls=[ToolCallDelta(index=0, function={"arguments": piece})])
        yield GenerationEvent(finish_reason="tool_calls")

    out = collect(batched(calls(), interval_s=0.05))
    pieces = [d.function.arguments for e in out for d in e.tool_calls or []]
    assert pieces == ['{"a"', ': 1}'] and out[-1].finish_reason == "tool_calls"


def test_engine_errors_reach_the_caller():
    with pytest.raises(RuntimeError, match="engine broke"):
        collect(batched(source(5, 0.001, [], fail_at=3), interval_s=0.05))


def test_a_caller_that_goes_away_stops_the_engine():
    log: list[str] = []

    async def go():
        stream = batched(source(1000, 0.001, log), interval_s=0.01)
        first = await anext(stream)
        await stream.aclose()
        await asyncio.sleep(0.05)
        return first

    assert asyncio.run(go()).text == "t0 " and log == ["closed"]


def test_log_probabilities_survive_batching_in_order():
    async def tokens():
        for i in range(6):
            await asyncio.sleep(0.001)
            yield GenerationEvent(text=f"t{i}", logprobs={"content": [{"token": f"t{i}", "logprob": -i / 10,
                                                                       "top_logprobs": []}]},
                                  finish_reason="stop" if i == 5 else None)

    out = collect(batched(tokens(), interval_s=0.05))
    assert len(out) < 6
    assert [c["token"] for e in out for c in (e.logprobs or {}).get("content", [])] == [f"t{i}" for i in range(6)]
