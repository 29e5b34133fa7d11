"""Pure parts of the agents room: expressions, reply parsing, tool schemas, assignment and
conflict resolution, the bus core and versioned state. No cluster."""

import asyncio

import pytest

from agents.assignment import Candidate, pick, read_judge_choice, resolve
from agents.bus import BusCore, Inbox
from agents.expressions import ExpressionError, calculate, evaluate, render
from agents.protocol import parse_reply
from agents.state import VersionConflict, VersionedStore
from agents.tools import HttpGet, ToolError, build_tools
from config import Settings


@pytest.mark.parametrize("expr, value", [("2+3*4", 14), ("(2+3)*4", 20), ("2**10", 1024), ("7//2", 3),
                                         ("sqrt(16)", 4.0), ("-3 + abs(-5)", 2), ("round(pi, 2)", 3.14)])
def test_calculator_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "open('/etc/passwd')", "a.b", "[1,2]",
                                  "1/0", "2**100000", "'a'*3", "x", "lambda: 1", "1 if 1 else 2", ""])
def test_calculator_refuses_everything_else(expr):
    with pytest.raises(ExpressionError):
        calculate(expr)


def test_conditions_and_templates():
    ns = {"inputs": {"n": 3, "names": ["a", "b"]}, "steps": {"r": {"output": {"answer": "Approve"}}}}
    assert evaluate("inputs.n > 2 and lower(steps.r.output.answer) == 'approve'", ns) is True
    assert evaluate("len(inputs.names) == 2 and 'a' in inputs.names", ns) is True
    assert render("${inputs.names}", ns) == ["a", "b"]  # a whole template keeps its type
    assert render({"q": "n is ${inputs.n}"}, ns) == {"q": "n is 3"}
    with pytest.raises(ExpressionError):
        evaluate("inputs.__class__", ns)
    with pytest.raises(ExpressionError):
        evaluate("steps.missing.output", ns)


def test_reply_parsing_native_json_and_plain():
    native = parse_reply(None, [{"id": "c1", "type": "function",
                                 "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}])
    assert native.native and native.calls[0].arguments == {"expression": "1+1"}
    as_text = parse_reply('{"tool_calls": [{"id": "c2", "function": {"name": "kb_search", "arguments": "{bad"}}]}')
    assert as_text.calls[0].name == "kb_search" and "not valid JSON" in as_text.calls[0].error
    fallback = parse_reply('```json\n{"tool": "calculator", "arguments": {"expression": "2"}}\n```')
    assert not fallback.native and fallback.calls[0].arguments == {"expression": "2"}
    assert parse_reply('{"answer": "42"}').answer == "42"
    assert parse_reply("just words").answer == "just words"


def test_tool_arguments_are_checked_against_the_schema():
    calc = build_tools(Settings(), ["calculator"])["calculator"]
    assert asyncio.run(calc({"expression": "6*7"})) == {"result": 42}
    for bad, msg in [({}, "expression is required"), ({"expression": 5}, "must be string"),
                     ({"expression": "1", "x": 1}, "unknown field"), ([], "JSON object"),
                     ({"expression": "1/0"}, "division by zero")]:
        with pytest.raises(ToolError, match=msg):
            asyncio.run(calc(bad))
    with pytest.raises(ValueError, match="unknown tool"):
        build_tools(Settings(), ["rm_rf"])


def test_http_get_is_off_by_default_and_allowlisted_when_on():
    off = HttpGet(Settings())
    with pytest.raises(ToolError, match="switched off"):
        asyncio.run(off({"url": "http://127.0.0.1:1/x"}))
    on = HttpGet(Settings(agents={"http_get": {"enabled": True, "allowlist": ["http://127.0.0.1:9/api/"]}}))
    assert on.allowed("http://127.0.0.1:9/api/x")
    for url in ["http://127.0.0.1:9/other", "http://127.0.0.1:10/api/x", "file:///etc/passwd",
                "http://user:pw@127.0.0.1:9/api/", "https://127.0.0.1:9/api/x"]:
        assert not on.allowed(url), url
    with pytest.raises(ToolError, match="allowlist"):
        asyncio.run(on({"url": "http://example.com/"}))


def test_assignment_prefers_least_loaded_then_priority():
    cs = [Candidate("a", 0, 2, 0), Candidate("b", 0, 1, 0), Candidate("c", 0, 1, 5)]
    assert pick(cs).agent == "c"
    assert pick([]) is None


def test_conflicts_by_priority_vote_and_judge():
    answers = [{"agent": "a", "answer": "Approve.", "priority": 0}, {"agent": "b", "answer": "reject", "priority": 9},
               {"agent": "c", "answer": "approve", "priority": 1}]
    vote = resolve(answers, "vote")
    assert vote["conflict"] and vote["answer"] in ("Approve.", "approve") and vote["votes"]["approve"] == 2
    assert resolve(answers, "priority")["agent"] == "b"
    assert resolve(answers, "judge", judge_choice=1)["agent"] == "b"
    assert resolve(answers, "judge", judge_choice=None)["policy"].startswith("vote")
    assert read_judge_choice("The best is 2.", 3) == 1 and read_judge_choice("none", 3) is None
    assert not resolve(answers[:1], "vote")["conflict"]


def test_bus_core_order_redelivery_and_idempotent_publish():
    bus = BusCore()
    bus.subscribe("s1", "t")
    m1, dup1 = bus.publish("t", {"n": 1}, key="k1")
    m2, _ = bus.publish("t", {"n": 2}, key="k2")
    again, dup = bus.publish("t", {"n": 1}, key="k1")
    assert not dup1 and dup and again.seq == m1.seq
    assert [m.seq for m in bus.pending("s1", "t")] == [1, 2]
    assert [m.seq for m in bus.pending("s1", "t")] == [1, 2]  # not acked: delivered again
    bus.ack("s1", "t", 1)
    assert [m.payload for m in bus.pending("s1", "t")] == [{"n": 2}]
    inbox = Inbox()
    assert inbox.accept(m2) and not inbox.accept(m2)
    with pytest.raises(KeyError):
        bus.pending("nobody", "t")


def test_versioned_store_compare_and_set():
    s = VersionedStore()
    assert s.put("run", "doc", {"v": 1}, 0)["version"] == 1
    with pytest.raises(VersionConflict) as e:
        s.put("run", "doc", {"v": "stale"}, 0)
    assert e.value.current == 1 and s.get("run", "doc")["value"] == {"v": 1}
    assert s.put("run", "doc", {"v": 2}, 1, idempotency_key="m1")["version"] == 2
    again = s.put("run", "doc", {"v": 2}, 1, idempotency_key="m1")
    assert again["duplicate"] and s.get("run", "doc")["version"] == 2
