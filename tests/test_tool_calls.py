"""Native tool calls, the pure parts: reading calls out of a local model's text, holding back
text that may become a call while streaming, and joining streamed call pieces."""

import json

from models.engines.tool_parser import may_be_a_call, parse_tool_calls
from models.protocol import GenerationKind, StreamReader, ToolCallCollector, ToolCallDelta

OFFERED = {"weather", "calculator"}


def test_hermes_calls_after_text():
    text = ('Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2+2\\"}"}</tool_call>')
    content, calls = parse_tool_calls(text, OFFERED)
    assert content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("weather", {"city": "Oslo"}), ("calculator", {"expression": "2+2"})]
    assert calls[0].id != calls[1].id


def test_llama_style_bare_json_call():
    content, calls = parse_tool_calls(' {"name": "weather", "parameters": {"city": "Bergen"}}', OFFERED)
    assert content == "" and json.loads(calls[0].function.arguments) == {"city": "Bergen"}


def test_what_is_not_a_call_to_an_offered_tool_stays_text():
    for text in ['<tool_call>{"name": "rm", "arguments": {}}</tool_call>',      # not offered
                 '<tool_call>{"name": "weather", "arguments": {"city": "Os',      # cut off
                 '{"name": "weather", "arguments": [1]}',                         # not an object
                 '{"answer": "42"}', "plain words"]:
        assert parse_tool_calls(text, OFFERED) == (text, [])


def test_streaming_holds_back_only_what_may_be_a_call():
    assert may_be_a_call("Hello there") == 0
    assert may_be_a_call("Hello <tool") == len("<tool")
    assert may_be_a_call("Hello <tool_call>{\"na") == len("<tool_call>{\"na")
    assert may_be_a_call('  {"name"') == len('  {"name"')
    assert may_be_a_call("<tool_c") == len("<tool_c")
    assert may_be_a_call("a < b") == 0


def test_stream_pieces_join_into_whole_calls():
    reader = StreamReader(GenerationKind.CHAT)
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "id": "call_b", "function": {"name": "calculator", "arguments": '{"expression": "1"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    collector = ToolCallCollector()
    for chunk in chunks:
        for event in reader.read(chunk):
            assert not event.text
            collector.add(event.tool_calls)
    calls = collector.calls()
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_a", "weather", {"city": "Oslo"}), ("call_b", "calculator", {"expression": "1"})]
    assert reader.final().finish_reason == "tool_calls"
    assert ToolCallCollector().calls() is None
    collector = ToolCallCollector()
    collector.add([ToolCallDelta(index=0, function={"name": "weather", "arguments": "{}"})])
    assert collector.calls()[0].id.startswith("call-")  # an id is made when the provider sent none


def test_provider_log_probabilities_ride_with_their_text():
    chat = StreamReader(GenerationKind.CHAT)
    lp = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
    [event] = chat.read({"choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": lp}]})
    assert event.text == "Hi" and event.logprobs == lp
    completion = StreamReader(GenerationKind.COMPLETION)
    lp = {"tokens": ["Hi"], "token_logprobs": [-0.1], "top_logprobs": [{"Hi": -0.1}]}
    [event] = completion.read({"choices": [{"index": 0, "text": "Hi", "logprobs": lp}]})
    assert event.text == "Hi" and event.logprobs == lp
