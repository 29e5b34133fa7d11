"""Tools an agent (or a workflow's tool step) can call. Each declares a JSON schema; arguments
are checked against it before the tool runs, and every failure comes back as a `ToolError`
whose message is shown to the model, never an exception that stops the agent.

Shipped: `kb_search` (the RAG service), `calculator` (AST arithmetic, no eval) and `http_get`
(off by default; only URLs under `agents.http_get.allowlist` when on).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

from agents.expressions import ExpressionError, calculate
from config import Settings

log = logging.getLogger(__name__)


class ToolError(Exception):
    """A tool call that failed; the message goes back to the model."""


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
               "array": list, "null": type(None)}


def check_args(schema: dict[str, Any], value: Any, path: str = "arguments") -> None:
    """The JSON-schema subset tools use: type, properties, required, additionalProperties, enum,
    minimum/maximum, minLength/maxLength, items. Raises ToolError naming the first problem."""
    t = schema.get("type")
    if t:
        py = _JSON_TYPES[t]
        if not isinstance(value, py) or (t in ("integer", "number") and isinstance(value, bool)):
            raise ToolError(f"{path} must be {t}, not {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolError(f"{path} must be one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ToolError(f"{path} must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ToolError(f"{path} must be <= {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise ToolError(f"{path} must not be empty" if schema.get("minLength") == 1
                            else f"{path} is shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise ToolError(f"{path} is longer than {schema['maxLength']} characters")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                raise ToolError(f"{path}.{req} is required")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                raise ToolError(f"{path} has unknown field(s) {extra}; allowed: {sorted(props)}")
        for k, v in value.items():
            if k in props:
                check_args(props[k], v, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            check_args(schema["items"], v, f"{path}[{i}]")


# Whom the tool calls in this task are made for (the run's caller): tools that reach other
# services on a user's behalf (kb_search) pass it on, so that user's collection scopes apply.
current_caller: ContextVar[Any] = ContextVar("orfeas_tool_caller", default=None)


class Tool(ABC):
    name: str = ""
    description: str = ""
    parameters: dict[str, Any] = {}

    def openai_schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    async def __call__(self, args: Any, *, idempotency_key: str | None = None) -> Any:
        if not isinstance(args, dict):
            raise ToolError(f"arguments must be a JSON object, not {type(args).__name__}")
        check_args(self.parameters, args)
        return await self.run(args, idempotency_key=idempotency_key)

    @abstractmethod
    async def run(self, args: dict[str, Any], *, idempotency_key: str | None = None) -> Any:
        """The tool's work on checked arguments; ToolError for the model to read."""


class Calculator(Tool):
    name = "calculator"
    description = ("Evaluate an arithmetic expression: + - * / // % **, parentheses, sqrt, log, exp, sin, cos, "
                   "abs, round, min, max, pi, e.")
    parameters = {"type": "object", "additionalProperties": False, "required": ["expression"],
                  "properties": {"expression": {"type": "string", "minLength": 1, "maxLength": 500}}}

    async def run(self, args, *, idempotency_key=None):
        try:
            return {"result": calculate(args["expression"])}
        except ExpressionError as e:
            raise ToolError(f"cannot calculate {args['expression']!r}: {e}") from None


class KnowledgeBaseSearch(Tool):
    name = "kb_search"
    description = "Search the knowledge base (ingested documents); returns the best passages with sources."
    parameters = {"type": "object", "additionalProperties": False, "required": ["query"],
                  "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 2000},
                                 "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
                                 "collection": {"type": "string", "minLength": 1, "maxLength": 64}}}

    def __init__(self, settings: Settings):
        self.settings = settings

    async def run(self, args, *, idempotency_key=None):
        from ray import serve

        from config.names import RAG_APP

        if not self.settings.rag.enabled:
            raise ToolError("the knowledge base is not enabled on this platform")
        body = {"query": args["query"], "answer": False, "top_k": args.get("top_k", 4)}
        if args.get("collection"):
            body["collection"] = args["collection"]
        try:
            result = await serve.get_app_handle(RAG_APP).query.remote(body, None, current_caller.get())
        except Exception as e:  # the RAG service's typed errors (unknown collection, ...) go to the model
            cause = getattr(e, "cause", e)
            raise ToolError(f"knowledge base search failed: {getattr(cause, 'message', None) or cause}") from None
        return {"passages": [{"source": p.get("source"), "title": p.get("title"), "text": p.get("text")}
                             for p in result.get("passages", [])]}


class HttpGet(Tool):
    name = "http_get"
    description = "Fetch a URL with HTTP GET (only allow-listed addresses); returns status and text."
    parameters = {"type": "object", "additionalProperties": False, "required": ["url"],
                  "properties": {"url": {"type": "string", "minLength": 1, "maxLength": 2000}}}

    def __init__(self, settings: Settings):
        self.cfg = settings.agents.http_get

    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.username or parts.password:
            return False
        for prefix in self.cfg.allowlist:
            p = urlsplit(prefix)
            same_origin = (p.scheme, p.netloc.lower()) == (parts.scheme, parts.netloc.lower())
            if same_origin and (parts.path or "/").startswith(p.path or "/"):
                return True
        return False

    async def run(self, args, *, idempotency_key=None):
        import httpx

        url = args["url"]
        if not self.cfg.enabled:
            raise ToolError("http_get is switched off on this platform (agents.http_get.enabled)")
        if not self.allowed(url):
            raise ToolError(f"{url} is not on the http_get allowlist")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        try:
            async with httpx.AsyncClient(timeout=self.cfg.timeout_s, follow_redirects=False) as client:
                async with client.stream("GET", url, headers=headers) as resp:
                    body = b""
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) >= self.cfg.max_bytes:
                            body = body[: self.cfg.max_bytes]
                            break
        except httpx.HTTPError as e:
            raise ToolError(f"GET {url} failed: {type(e).__name__}: {e}") from None
        return {"status": resp.status_code, "text": body.decode("utf-8", "replace")}


def build_tools(settings: Settings, names: list[str] | None = None) -> dict[str, Tool]:
    """The named tools (all shipped ones when `names` is None); unknown names raise ValueError."""
    factories = {"calculator": lambda: Calculator(), "kb_search": lambda: KnowledgeBaseSearch(settings),
                 "http_get": lambda: HttpGet(settings)}
    wanted = list(factories) if names is None else names
    unknown = [n for n in wanted if n not in factories]
    if unknown:
        raise ValueError(f"unknown tool(s) {unknown}; shipped tools: {sorted(factories)}")
    return {n: factories[n]() for n in wanted}


SHIPPED_TOOLS = ("calculator", "kb_search", "http_get")
