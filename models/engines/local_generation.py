"""What the in-process chat engines (transformers, llama.cpp) share: OpenAI messages in the shape
chat templates expect, the context budget of an answer, and holding back streamed text that may
be the start of a stop sequence."""

from __future__ import annotations

import json
from typing import Any

from config import ModelSpec
from models.errors import InvalidRequest
from models.protocol import GenerationParams


def template_message(m: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message in the shape Hugging Face chat templates expect: tool-call arguments as
    objects, tool results with their call id and name."""
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
    if isinstance(out["content"], list):
        out["content"] = "".join(p.get("text", "") for p in out["content"] if p.get("type") == "text")
    if m.get("tool_calls"):
        calls = []
        for c in m["tool_calls"]:
            fn = dict(c.get("function") or {})
            try:
                fn["arguments"] = json.loads(fn.get("arguments") or "{}")
            except (TypeError, ValueError):
                pass
            calls.append({"id": c.get("id"), "type": "function", "function": fn})
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if m.get(key):
            out[key] = m[key]
    return out


def hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop sequence (not safe to emit yet)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def answer_budget(spec: ModelSpec, prompt_len: int, params: GenerationParams, prompt_param: str) -> int:
    """The most tokens the answer may have: the request's max_tokens (capped) when prompt and answer
    fit the model's context, else a `context_length_exceeded` error naming what is too long."""
    ctx = spec.max_context
    if params.max_tokens is None and prompt_len < ctx:
        return min(params.max_tokens_cap, ctx - prompt_len)
    if prompt_len >= ctx:
        raise InvalidRequest(
            f"the prompt is {prompt_len} tokens, over the {ctx}-token context of {spec.id!r}", prompt_param,
            code="context_length_exceeded",
        )
    if prompt_len + params.max_tokens > ctx:
        raise InvalidRequest(
            f"the prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
            f"{ctx}-token context of {spec.id!r}", "max_tokens", code="context_length_exceeded",
        )
    return min(params.max_tokens, params.max_tokens_cap)
