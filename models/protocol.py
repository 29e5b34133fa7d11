"""OpenAI API request and response types, in one place for the gateway and the engines.

Requests accept unknown fields (clients send options we do not act on), responses are
exactly the shapes the official `openai` client parses.
"""

from __future__ import annotations

import time
import uuid
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- requests


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        # As OpenAI: only an assistant message (one that calls tools) may have no content.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of parts), not null")
        return self

    def text(self) -> str:
        """Content as plain text (text parts of a multi-part message joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only n=1 is served.")
    stream: StrictBool = Field(False, description="true or false (JSON booleans only, as OpenAI).")
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids, not {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias of token {token} is {bias}, outside [-100, 100]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens_cap: int, limit: int | None, **extra: Any) -> GenerationParams:
        """Engine parameters; a limit over the cap is the caller's error, checked before this."""
        return GenerationParams(max_tokens=limit, max_tokens_cap=max_tokens_cap, temperature=self.temperature,
                                top_p=self.top_p, stop=self.stop, seed=self.seed,
                                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                logit_bias=self.logit_bias, user=self.user, **extra)


class ResponseFormat(BaseModel):
    """`text`, JSON mode (`json_object`) or structured output (`json_schema`: name, schema, strict)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and not (self.json_schema and "name" in self.json_schema):
            raise ValueError('type "json_schema" needs json_schema with at least a name')
        return self


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return v

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, v: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [t.function.name for t in v or []]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, v, info: ValidationInfo):
        offered = {t.function.name for t in info.data.get("tools") or []}
        if isinstance(v, dict):
            name = (v.get("function") or {}).get("name")
            if v.get("type") != "function" or not isinstance(name, str):
                raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
            if name not in offered:
                raise ValueError(f"names tool {name!r}, which is not in tools")
        elif v == "required" and not offered:
            raise ValueError('"required" needs tools')
        return v

    def tool_payload(self) -> dict[str, Any]:
        """The tool fields an engine needs (none when no tools were offered)."""
        if not self.tools:
            return {}
        out: dict[str, Any] = {"tools": [t.model_dump(exclude_none=True) for t in self.tools]}
        if self.tool_choice is not None:
            out["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None:
            out["parallel_tool_calls"] = self.parallel_tool_calls
        return out

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_generation(self, max_tokens_cap: int) -> GenerationRequest:
        return GenerationRequest(
            kind=GenerationKind.CHAT, messages=[m.model_dump(exclude_none=True) for m in self.messages],
            **self.tool_payload(), params=self._params(max_tokens_cap, self.token_limit(),
                                                     response_format=self.response_format,
                                                     logprobs=bool(self.logprobs),
                                                     top_logprobs=self.top_logprobs))


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="Only false is served (the prompt is never repeated in the answer).")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log probabilities of this many top tokens.")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        # Refused rather than ignored: a client that asks for its prompt back must not get less.
        if v:
            raise ValueError("echo is not served: the answer never repeats the prompt")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        # One prompt per request: a list must hold exactly one string.
        if isinstance(v, list):
            if len(v) != 1 or not isinstance(v[0], str):
                raise ValueError("exactly one prompt string is served per request")
            return v[0]
        return v

    def token_limit(self) -> int | None:
        return self.max_tokens

    def to_generation(self, max_tokens_cap: int) -> GenerationRequest:
        return GenerationRequest(kind=GenerationKind.COMPLETION, prompt=self.prompt,
                                 params=self._params(max_tokens_cap, self.token_limit(),
                                                     logprobs=self.logprobs is not None,
                                                     top_logprobs=self.logprobs))


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="One text or a list of texts (token-id inputs are not served).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be empty")
        if any(not isinstance(s, str) or not s for s in items):
            raise ValueError("every input must be a non-empty string")
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt: int, completion: int = 0) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call: the first piece of call `index` has its id and name,
    later pieces add to its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "orfeas"
    # ORFEAS extensions: what serves it and whether it can serve right now.
    task: str
    engine: str
    status: Literal["ready", "loading", "unhealthy"]
    error: str | None = None
    max_context: int | None = None
    # Router catalog (chat models): what it can do and what it costs.
    capabilities: list[str] | None = None
    price_input_per_m: float | None = None
    price_output_per_m: float | None = None
    tags: list[str] | None = None
    serves: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---------------------------------------------------------------- engine-side pieces


class GenerationKind(str, Enum):
    CHAT = "chat"
    COMPLETION = "completion"


class GenerationParams(BaseModel):
    """What an engine needs to generate, whatever the request's endpoint. Unset (None) fields are
    left to the engine; an engine that cannot honour a set one refuses the request naming it."""

    max_tokens: int | None = Field(None, description="None: as many as fit, up to max_tokens_cap.")
    max_tokens_cap: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    def token_budget(self) -> int:
        """The most tokens an answer may have: the request's limit or, without one, the cap."""
        return min(self.max_tokens or self.max_tokens_cap, self.max_tokens_cap)


class GenerationRequest(BaseModel):
    """One generation, as every engine takes it: a chat (`messages`, optional tools) or a
    completion (`prompt`), and its parameters."""

    kind: GenerationKind
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    params: GenerationParams = Field(default_factory=GenerationParams)

    @model_validator(mode="after")
    def _input_of_its_kind(self) -> "GenerationRequest":
        if self.kind is GenerationKind.CHAT and not self.messages:
            raise ValueError("a chat generation needs messages")
        if self.kind is GenerationKind.COMPLETION and self.prompt is None:
            raise ValueError("a completion generation needs a prompt")
        return self

    def openai_body(self, model: str) -> dict[str, Any]:
        """This generation as the body of an OpenAI-compatible request (`/chat/completions` or
        `/completions`, by kind), streamed with usage. Every parameter that is set is sent, and
        `max_tokens` always is: the request's limit or, without one, the gateway's cap."""
        p = self.params
        body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                                "max_tokens": p.token_budget(), "temperature": p.temperature, "top_p": p.top_p}
        if self.kind is GenerationKind.CHAT:
            body["messages"] = self.messages
            for key in ("tools", "tool_choice", "parallel_tool_calls"):
                if getattr(self, key) is not None:
                    body[key] = getattr(self, key)
            if p.logprobs:
                body["logprobs"] = True
                if p.top_logprobs is not None:
                    body["top_logprobs"] = p.top_logprobs
        else:
            body["prompt"] = self.prompt
            if p.logprobs:
                body["logprobs"] = p.top_logprobs or 0  # completions: how many top tokens, 0 the chosen only
        for key in ("stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user"):
            if getattr(p, key) is not None:
                body[key] = getattr(p, key)
        if p.response_format is not None:
            fmt = p.response_format
            body["response_format"] = {"type": fmt.type, **({"json_schema": fmt.json_schema} if fmt.json_schema else {})}
        return body


class GenerationEvent(BaseModel):
    """One step of a streamed generation: new text or tool-call pieces, and at the end the finish
    reason and usage."""

    text: str = ""
    tool_calls: list[ToolCallDelta] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # The log probabilities of this step's tokens, in OpenAI's shape for the request's kind (chat:
    # {"content": [...]}; completion: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [...]}):
    # a provider's are passed back as they came.
    logprobs: dict[str, Any] | None = None

    def followed_by(self, later: "GenerationEvent") -> "GenerationEvent":
        """This event and the next as one (the later one's finish and usage stand)."""
        calls = (self.tool_calls or []) + (later.tool_calls or [])
        return GenerationEvent(text=self.text + later.text, tool_calls=calls or None,
                               finish_reason=later.finish_reason, usage=later.usage,
                               logprobs=join_logprobs(self.logprobs, later.logprobs))


def join_logprobs(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """The log probabilities of two consecutive pieces of one answer, as one (lists are joined)."""
    if not a or not b:
        return a or b
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + value
        elif out.get(key) is None:
            out[key] = value
    return out


class ToolCallCollector:
    """Joins streamed tool-call pieces into whole calls (pieces of one call share its index)."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: list[ToolCallDelta] | None) -> None:
        for d in deltas or []:
            call = self._calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.id:
                call["id"] = d.id
            if d.function is not None:
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""

    def calls(self) -> list[ToolCall] | None:
        if not self._calls:
            return None
        return [ToolCall(id=c["id"] or new_id("call"), function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                for _, c in sorted(self._calls.items())]


class StreamReader:
    """Turns an OpenAI-compatible server's stream chunks (chat or completion) into generation events."""

    def __init__(self, kind: GenerationKind):
        self.kind = GenerationKind(kind)
        self.finish: str | None = None
        self.usage: Usage | None = None

    def read(self, chunk: dict[str, Any]) -> list[GenerationEvent]:
        if chunk.get("usage"):
            self.usage = Usage.model_validate(chunk["usage"])
        chat = self.kind is GenerationKind.CHAT
        events = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content") if chat else choice.get("text")
            calls = delta.get("tool_calls") if chat else None
            logprobs = choice.get("logprobs") or None
            if text or calls or logprobs:
                events.append(GenerationEvent(text=text or "", logprobs=logprobs, tool_calls=[
                    ToolCallDelta.model_validate({"index": i, **c}) for i, c in enumerate(calls or [])]
                    or None))
            self.finish = choice.get("finish_reason") or self.finish
        return events

    def final(self) -> GenerationEvent:
        finish = self.finish if self.finish in ("length", "tool_calls") else "stop"
        return GenerationEvent(finish_reason=finish, usage=self.usage)
