"""Chat and text generation with llama.cpp (`llama-cpp-python`) from a GGUF file, on CPU.

The default engine for GGUF models (`engine: llama.cpp`); transformers' GGUF loading is the
fallback for the same file where llama.cpp cannot be imported (`models.engines.local`). No Ray
here: Serve wraps it in `serve/model_apps.py`, the edge node runs it in its own process.

- The prompt is the chat template the GGUF carries (`tokenizer.chat_template`), rendered as
  Hugging Face renders it. A template that takes no tools gets them described in the system
  message, with the Hermes `<tool_call>` format that `models.engines.tool_parser` reads.
- Sampling follows OpenAI's definitions: temperature, then top_p (no top_k, min_p or repeat
  penalty of llama.cpp's own defaults); `presence_penalty` / `frequency_penalty` over the
  generated tokens; `logit_bias` added to the named tokens' logits; `seed` seeds the sampler.
  A seeded or greedy (temperature 0) request is evaluated from an empty KV cache, so that its
  answer never depends on what an earlier request left there: a prompt found in the cache has its
  last token decoded again alone, and those logits differ from the batched ones in the last bits,
  enough to flip a near-tie ("What is 2 + 2?" answered two ways at temperature 0, by turns).
- Constrained decoding with llama.cpp grammars: `response_format` `json_object` (any JSON
  object) and `json_schema` (the schema compiled to a grammar), and `tool_choice` "required"
  or a named tool (a `<tool_call>` whose arguments follow the tool's parameter schema). The
  output parses every time unless it is cut by max_tokens (finish_reason "length").
- One generation at a time on one worker thread (a llama.cpp context is not shared between
  threads); tokens reach the event loop as they are produced.
- Log probabilities need llama.cpp's `logits_all` (the logits of every position, ~0.4 GB for a
  2k context here): refused, naming `logprobs`.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import random
import re
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from config import ModelSpec
from models.engine import Engine, EngineStatus
from models.engines.local_generation import answer_budget, hold_back, template_message
from models.engines.tool_parser import CALL_OPEN, may_be_a_call, parse_tool_calls
from models.errors import InvalidRequest, ModelLoadError
from models.gguf import locate_gguf
from models.protocol import (
    FunctionCallDelta,
    GenerationEvent,
    GenerationKind,
    GenerationParams,
    GenerationRequest,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger(__name__)


class LlamaCppUnavailable(ModelLoadError):
    """`llama_cpp` cannot be imported here (not installed, or its library does not load on this CPU)."""


def import_llama_cpp():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise LlamaCppUnavailable(f"llama-cpp-python cannot be imported: {e} (install it with `make install`)") \
            from None
    _route_llama_logs(llama_cpp)
    return llama_cpp


# ---------------------------------------------------------------- llama.cpp's log

# llama.cpp logs through one process-wide callback: ours sends it to `logging` and keeps the
# latest errors, so that a failed load can say why (llama-cpp-python silences them otherwise).
_recent_errors: deque[str] = deque(maxlen=8)
_log_callback: Any = None


def _route_llama_logs(llama_cpp) -> None:
    global _log_callback
    if _log_callback is not None:
        return
    llama_log = logging.getLogger("llama_cpp")

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        msg = text.decode("utf-8", "replace").strip()
        if not msg:
            return
        if level == 3:  # GGML_LOG_LEVEL_ERROR
            _recent_errors.append(msg)
            llama_log.warning("%s", msg)
        else:
            llama_log.debug("%s", msg)

    _log_callback = callback  # kept alive: llama.cpp holds a raw pointer to it
    llama_cpp.llama_log_set(callback, None)


# ---------------------------------------------------------------- tools in the prompt

def tool_instructions(tools: list[dict[str, Any]]) -> str:
    """The offered tools and the call format, for a chat template that takes no tools."""
    lines = [f"- {json.dumps(t['function'])}" for t in tools]
    return ("You can call these tools:\n" + "\n".join(lines) + "\nTo call a tool, answer with only\n"
            f'{CALL_OPEN}\n{{"name": "<tool name>", "arguments": {{<its arguments>}}}}\n</tool_call>\n'
            "Otherwise answer in plain text.")


def with_tool_instructions(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    text = tool_instructions(tools)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}".strip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tool_call_schema(tools: list[dict[str, Any]], choice: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a forced tool call follows ("required": any offered tool; a named tool:
    that one), or None when the model may answer in text."""
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"]["name"] == name]
    elif choice != "required":
        return None

    def one(t: dict[str, Any]) -> dict[str, Any]:
        fn = t["function"]
        return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                  "arguments": fn.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}

    return one(tools[0]) if len(tools) == 1 else {"anyOf": [one(t) for t in tools]}


# JSON Schema keywords that llama-cpp-python's schema-to-grammar converter ignores: a schema using
# them would parse but might not validate, so it is refused instead.
UNENFORCED_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
                       "not", "if", "then", "else", "contains", "minProperties", "maxProperties",
                       "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas")


def unenforced_keyword(schema: Any, path: str = "") -> str | None:
    """The first keyword (with where it is) that the grammar would not enforce, or None."""
    if isinstance(schema, list):
        return next((w for i, v in enumerate(schema) if (w := unenforced_keyword(v, f"{path}[{i}]"))), None)
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            found = next((w for name, sub in value.items() if (w := unenforced_keyword(sub, f"{path}{key}.{name}."))),
                         None)
        elif key in ("const", "enum", "default", "examples", "description", "title"):
            continue
        elif key in UNENFORCED_KEYWORDS:
            return f"{key!r} (at {path.rstrip('.') or 'the top level'})"
        else:
            found = unenforced_keyword(value, f"{path}{key}.")
        if found:
            return found
    return None


# ---------------------------------------------------------------- the engine

class LlamaCppEngine(Engine):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.llm: Any = None
        self.path = None
        self.threads = spec.num_threads or min(os.cpu_count() or 1, 8)
        self._llama_cpp: Any = None
        self._formatter: Any = None
        self._template_takes_tools = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{spec.id}")

    # ------------------------------------------------------------ loading

    def load(self) -> None:
        llama_cpp = self._llama_cpp = import_llama_cpp()
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.path = locate_gguf(self.spec.id, self.spec.source)
        _recent_errors.clear()
        try:
            self.llm = _openai_sampling_llama(llama_cpp)(
                model_path=str(self.path), n_ctx=self.spec.max_context, n_threads=self.threads,
                n_threads_batch=self.threads, last_n_tokens_size=self.spec.max_context, verbose=False)
        except (ValueError, RuntimeError) as e:
            why = "; ".join(_recent_errors) or str(e)
            raise ModelLoadError(f"model {self.spec.id!r}: llama.cpp cannot load GGUF file {self.path}: {why} "
                                 f"(is the file truncated or corrupt?)") from None
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template:
            def text(token: int) -> str:
                return self.llm._model.token_get_text(token) if token != -1 else ""

            eos = self.llm.token_eos()
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=text(eos),
                                                  bos_token=text(self.llm.token_bos()), stop_token_ids=[eos])
            self._template_takes_tools = "tools" in template
        log.info("loaded %s from %s with llama.cpp (%d threads)", self.spec.id, self.path, self.threads)

    async def status(self) -> EngineStatus:
        if self.llm is None:
            return EngineStatus(status="loading", max_context=self.spec.max_context)
        return EngineStatus.ready(max_context=self.spec.max_context, engine="llama.cpp", file=str(self.path))

    async def aclose(self) -> None:
        if self.llm is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.llm.close)
            self.llm = None
        self._executor.shutdown(wait=False)

    # ------------------------------------------------------------ prompts

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        if self._formatter is None:
            raise InvalidRequest(f"model {self.spec.id!r} has no chat template in its GGUF file; use "
                                 f"/v1/completions with a plain prompt", "messages")
        msgs = [template_message(m) for m in messages]
        if tools and not self._template_takes_tools:
            msgs = with_tool_instructions(msgs, tools)
        try:
            return self._formatter(messages=msgs, tools=tools or None).prompt
        except Exception as e:  # templates raise on roles or orders they do not support
            raise InvalidRequest(f"messages do not fit the chat template of {self.spec.id!r}: {e}",
                                 "messages") from None

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        # A rendered chat template holds its special tokens as text (and its BOS where it wants one).
        return self.llm.tokenize(text.encode("utf-8"), add_bos=not chat, special=chat)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    # ------------------------------------------------------------ constraints

    def _grammar(self, request: GenerationRequest, tools: list[dict[str, Any]] | None):
        """The llama.cpp grammar the answer must follow, or None."""
        from llama_cpp.llama_grammar import JSON_GBNF

        forced = tool_call_schema(tools, request.tool_choice) if tools else None
        fmt = request.params.response_format
        if forced is not None:
            call = re.sub(r"^root ::=", "tool-call ::=", self._schema_gbnf(forced, "tools"), count=1, flags=re.M)
            return self._compiled(f'root ::= "{CALL_OPEN}\\n" tool-call "\\n</tool_call>"\n{call}', "tools")
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return self._compiled(JSON_GBNF, "response_format")
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema needs a schema (a JSON Schema object)",
                                 "response_format")
        return self._compiled(self._schema_gbnf(schema, "response_format"), "response_format")

    @staticmethod
    def _schema_gbnf(schema: dict[str, Any], param: str) -> str:
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        where = unenforced_keyword(schema)
        if where:
            raise InvalidRequest(f"the llama.cpp grammar cannot enforce {where} of this JSON schema; leave it out "
                                 f"(and check the value yourself) or use a model with native structured output",
                                 param)
        try:
            return json_schema_to_gbnf(json.dumps(schema))
        except Exception as e:  # the converter raises on what it cannot express
            raise InvalidRequest(f"this JSON schema cannot be compiled to a llama.cpp grammar: {e}", param) from None

    def _compiled(self, gbnf: str, param: str):
        """A grammar llama.cpp accepted (it answers an unparsable one with no sampler at all)."""
        from llama_cpp.llama_grammar import LlamaGrammar

        llama_cpp = self._llama_cpp
        sampler = llama_cpp.llama_sampler_init_grammar(self.llm._model.vocab, gbnf.encode(), b"root")
        if not sampler:
            raise InvalidRequest("the constraint could not be compiled to a llama.cpp grammar", param)
        llama_cpp.llama_sampler_free(sampler)
        return LlamaGrammar.from_string(gbnf, verbose=False)

    def _refuse_what_cannot_be_honoured(self, params: GenerationParams) -> None:
        if params.logprobs:
            raise InvalidRequest(f"model {self.spec.id!r} (llama.cpp engine) does not report log probabilities",
                                 "logprobs")
        vocab = self.llm.n_vocab()
        for token in params.logit_bias or {}:
            if not 0 <= int(token) < vocab:
                raise InvalidRequest(f"logit_bias names token {token}, outside the {vocab}-token vocabulary of "
                                     f"{self.spec.id!r}", "logit_bias")

    # ------------------------------------------------------------ generation

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        params = request.params
        if self.llm is None:
            raise ModelLoadError(f"model {self.spec.id!r} is not loaded")
        self._refuse_what_cannot_be_honoured(params)
        tools = None
        offered = None
        if request.kind is GenerationKind.CHAT:
            offered = request.tools if request.tool_choice != "none" else None
            prompt_ids = self.tokenize(self.chat_prompt(request.messages or [], offered), chat=True)
            tools = {t["function"]["name"] for t in offered} if offered else None
            prompt_param = "messages"
        else:
            prompt_ids = self.tokenize(request.prompt or "", chat=False)
            prompt_param = "prompt"
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", prompt_param)
        max_new = answer_budget(self.spec, len(prompt_ids), params, prompt_param)
        grammar = self._grammar(request, offered)
        async for event in self._stream_ids(prompt_ids, params, max_new, grammar, tools):
            yield event

    async def _stream_ids(self, prompt_ids: list[int], params: GenerationParams, max_new: int, grammar,
                          tools: set[str] | None) -> AsyncIterator[GenerationEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        halt = threading.Event()
        counts = {"generated": 0, "eog": False}

        def put(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        job = loop.run_in_executor(self._executor, self._generate, prompt_ids, params, max_new, grammar, halt,
                                   put, counts)
        stops = params.stop or []
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = emitted = ""
        finish: str | None = None
        try:
            ended = False
            while not ended:
                item = await queue.get()
                pieces = [item]
                while not queue.empty():  # tokens that piled up go out as one event
                    pieces.append(queue.get_nowait())
                for piece in pieces:
                    if isinstance(piece, BaseException):
                        raise piece
                    if piece is None:
                        ended = True
                        break
                    text += decoder.decode(piece)
                cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
                if cuts:
                    text, finish = text[: min(cuts)], "stop"
                    halt.set()
                held = max(0 if finish or ended else hold_back(text, stops), may_be_a_call(text) if tools else 0)
                safe = text[: len(text) - held]
                if len(safe) > len(emitted):
                    yield GenerationEvent(text=safe[len(emitted):])
                    emitted = safe
                if finish:
                    break
            await job
            if not finish:
                text += decoder.decode(b"", final=True)
                finish = "stop" if counts["eog"] or counts["generated"] < max_new else "length"
            calls = []
            if tools:
                content, calls = parse_tool_calls(text, tools)
                if calls:
                    text, finish = content, "tool_calls"
            tail = text[len(emitted):] if text.startswith(emitted) else ""
            deltas = [ToolCallDelta(index=i, id=c.id, type="function",
                                    function=FunctionCallDelta(name=c.function.name, arguments=c.function.arguments))
                      for i, c in enumerate(calls)] or None
            yield GenerationEvent(text=tail, tool_calls=deltas, finish_reason=finish,
                                  usage=Usage.of(len(prompt_ids), counts["generated"]))
        finally:
            halt.set()  # the client went away or we stopped: generation ends at the next token

    def _generate(self, prompt_ids: list[int], params: GenerationParams, max_new: int, grammar,
                  halt: threading.Event, put, counts: dict) -> None:
        """On the worker thread: sample up to `max_new` tokens, handing each one's bytes to `put`
        (None at the end, or the exception)."""
        llm = self.llm
        try:
            if params.seed is not None or params.temperature <= 0:
                llm.reset()  # evaluated from scratch: the same request gives the same answer
            llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
            llm.request_logit_bias = {int(k): float(v) for k, v in (params.logit_bias or {}).items()}
            generated: list[int] = []
            tokens = llm.generate(prompt_ids, temp=params.temperature, top_p=params.top_p, top_k=0, min_p=0.0,
                                  typical_p=1.0, repeat_penalty=1.0,
                                  frequency_penalty=params.frequency_penalty or 0.0,
                                  presence_penalty=params.presence_penalty or 0.0, grammar=grammar)
            try:
                for token in tokens:
                    counts["generated"] += 1
                    if llm.is_eog(token):
                        counts["eog"] = True
                        break
                    put(llm.detokenize([token], prev_tokens=prompt_ids + generated))
                    generated.append(token)
                    if len(generated) >= max_new or halt.is_set():
                        break
            finally:
                tokens.close()
            put(None)
        except BaseException as e:
            put(e)


_LLAMA_CLASS: Any = None


def _openai_sampling_llama(llama_cpp):
    """`llama_cpp.Llama` whose sampler chain follows OpenAI's order and definitions: logit bias,
    presence/frequency penalties, the grammar, then greedy (temperature 0) or temperature, top_p
    and a seeded draw. (Its own chain draws from top_k 40 and min_p 0.05 first, applies top_p
    before temperature, and runs logit_bias through a Python callback per token.)"""
    global _LLAMA_CLASS
    if _LLAMA_CLASS is not None:
        return _LLAMA_CLASS
    from llama_cpp import _internals

    class OpenAISamplingLlama(llama_cpp.Llama):
        request_logit_bias: dict[int, float] = {}

        def is_eog(self, token: int) -> bool:
            return bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))

        def _init_sampler(self, top_p: float = 1.0, temp: float = 1.0, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, grammar=None, **_ignored):
            sampler = _internals.LlamaSampler()
            if self.request_logit_bias:
                sampler.add_logit_bias(self._n_vocab, self.request_logit_bias)
            if frequency_penalty or presence_penalty:
                sampler.add_penalties(n_vocab=self._n_vocab, penalty_last_n=self.last_n_tokens_size,
                                      penalty_repeat=1.0, penalty_freq=frequency_penalty,
                                      penalty_present=presence_penalty)
            if grammar is not None:
                sampler.add_grammar(self._model, grammar)
            if temp <= 0.0:
                sampler.add_greedy()
            else:
                sampler.add_temp(temp)
                sampler.add_top_p(top_p, 1)
                sampler.add_dist(self._seed)
            return sampler

    _LLAMA_CLASS = OpenAISamplingLlama
    return _LLAMA_CLASS
