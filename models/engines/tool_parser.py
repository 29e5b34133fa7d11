"""Reading tool calls out of a local model's generated text.

Open chat models that were trained for tools write them in one of two ways, and their chat
templates tell them which: Hermes style (Qwen 2.5/3, Hermes, many fine-tunes) wraps each call in
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` after optional text; Llama 3.1 style
answers with one bare JSON object `{"name": ..., "parameters": {...}}`. Anything that does not
parse as a call to an offered tool stays text, as vLLM's parsers do.
"""

from __future__ import annotations

import json
import re
from typing import Any

from models.protocol import FunctionCall, ToolCall, new_id

CALL_OPEN = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _call(obj: Any, offered: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in offered:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(id=new_id("call"), function=FunctionCall(name=obj["name"], arguments=json.dumps(args)))


def parse_tool_calls(text: str, offered: set[str]) -> tuple[str, list[ToolCall]]:
    """(the text before any call, the calls); no calls means the whole text is the answer."""
    start = text.find(CALL_OPEN)
    if start >= 0:
        calls = []
        for block in _BLOCK.findall(text[start:]):
            try:
                call = _call(json.loads(block), offered)
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return text[:start].rstrip(), calls
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            call = _call(json.loads(stripped), offered)
        except ValueError:
            call = None
        if call is not None:
            return "", [call]
    return text, []


def may_be_a_call(text: str) -> int:
    """How much of the text's end must be held back while streaming, because it may be (the start
    of) a tool call rather than answer text: all of it from the call marker or a leading `{`."""
    stripped = text.lstrip()
    if stripped.startswith("{") or CALL_OPEN.startswith(stripped) and stripped:
        return len(text)
    at = text.find(CALL_OPEN)
    if at >= 0:
        return len(text) - at
    for k in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:k]):
            return k
    return 0
