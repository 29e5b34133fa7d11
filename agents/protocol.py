"""The agent's side of talking to a model: the prompt that offers tools, and reading a reply as
tool calls or a final answer, in the OpenAI tool-call format or the JSON fallback protocol.

Native (OpenAI) replies carry `tool_calls: [{id, type: function, function: {name, arguments}}]`
in the assistant message (or the same object as the reply's JSON text). Models without native
tools are asked to answer with one JSON object:

    {"tool": "calculator", "arguments": {"expression": "2+2"}}     a tool call
    {"answer": "..."}                                              the final answer

Anything else is taken as the final answer in plain text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

JSON_PROTOCOL = (
    "You can call tools. To call one, reply with only a JSON object "
    '{{"tool": "<name>", "arguments": {{...}}}}. When you have the answer, reply with '
    '{{"answer": "<your answer>"}}. Tools:\n{tools}'
)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: Any          # parsed JSON when it parsed; the raw string otherwise
    error: str | None = None  # the arguments were not valid JSON


@dataclass
class Reply:
    answer: str | None = None
    calls: list[ToolCall] = field(default_factory=list)
    native: bool = False


def system_prompt(role: str, instructions: str, tools: list[dict[str, Any]]) -> str:
    parts = [f"You are {role}." if role else "", instructions.strip()]
    if tools:
        listing = "\n".join(f"- {t['function']['name']}: {t['function']['description']} "
                            f"parameters: {json.dumps(t['function']['parameters'])}" for t in tools)
        parts.append(JSON_PROTOCOL.format(tools=listing))
    return "\n\n".join(p for p in parts if p)


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def _json_object(text: str) -> dict | None:
    text = text.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1)
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _arguments(raw: Any) -> tuple[Any, str | None]:
    if isinstance(raw, dict):
        return raw, None
    if isinstance(raw, str):
        try:
            return json.loads(raw or "{}"), None
        except ValueError as e:
            return raw, f"arguments are not valid JSON: {e}"
    return raw, f"arguments must be a JSON object, not {type(raw).__name__}"


def parse_reply(content: str | None, tool_calls: list[dict] | None = None, step: int = 0) -> Reply:
    """Read one model reply (message content and native tool_calls, when the model sent them)."""
    obj = None if tool_calls else _json_object(content or "")
    if tool_calls is None and obj is not None and isinstance(obj.get("tool_calls"), list):
        tool_calls = obj["tool_calls"]
    if tool_calls:
        calls = []
        for i, c in enumerate(tool_calls):
            fn = (c or {}).get("function") or {}
            args, err = _arguments(fn.get("arguments", "{}"))
            calls.append(ToolCall(id=c.get("id") or f"call_{step}_{i}", name=str(fn.get("name", "")),
                                  arguments=args, error=err))
        return Reply(calls=calls, native=True)
    if obj is not None:
        if "tool" in obj:
            args, err = _arguments(obj.get("arguments", {}))
            return Reply(calls=[ToolCall(id=f"call_{step}_0", name=str(obj["tool"]), arguments=args, error=err)])
        for key in ("answer", "final", "content"):
            if key in obj:
                value = obj[key]
                return Reply(answer=value if isinstance(value, str) else json.dumps(value))
    return Reply(answer=(content or "").strip())


def tool_result_messages(reply: Reply, results: list[tuple[ToolCall, str]]) -> list[dict[str, Any]]:
    """Messages that hand tool results back: `tool` messages after the assistant's tool_calls for
    native replies, one user message per result for the JSON protocol."""
    if reply.native:
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments if isinstance(c.arguments, str)
                               else json.dumps(c.arguments)}} for c, _ in results]
        return [{"role": "assistant", "content": None, "tool_calls": calls}] + \
               [{"role": "tool", "tool_call_id": c.id, "content": text} for c, text in results]
    msgs: list[dict[str, Any]] = []
    for c, text in results:
        msgs.append({"role": "assistant", "content": json.dumps({"tool": c.name, "arguments": c.arguments})})
        msgs.append({"role": "user", "content": f"Tool result ({c.name}): {text}"})
    return msgs
