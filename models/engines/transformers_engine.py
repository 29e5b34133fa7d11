"""Chat and text generation with Hugging Face `transformers` (CPU, or GPU when present).

Generation runs on one worker thread per engine (a CPU model saturates the cores anyway);
tokens reach the event loop through an asyncio queue as they are produced, so streams are
real streams. Stop sequences are applied on the decoded text and end generation early.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from config import ModelSpec
from models.errors import InvalidRequest
from models.engines.tool_parser import may_be_a_call, parse_tool_calls
from models.protocol import FunctionCallDelta, GenerationEvent, GenerationParams, ToolCallDelta, Usage

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model's weights or tokenizer could not be loaded; the message says why and what to do."""


def _resolve_source(spec: ModelSpec) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only): a local directory, or a hub repo id."""
    path = Path(spec.source).expanduser()
    if path.is_dir():
        return str(path), True
    if spec.source.startswith(("/", ".", "~")):
        raise ModelLoadError(f"model {spec.id!r}: directory {spec.source} does not exist")
    return spec.source, not spec.allow_download


def _hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop sequence (not safe to emit yet)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def _template_message(m: dict[str, Any]) -> dict[str, Any]:
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


class TransformersEngine:
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.tokenizer: Any = None
        self.model: Any = None
        self.device = "cpu"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gen-{spec.id}")

    # ------------------------------------------------------------ loading

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, local_only = _resolve_source(self.spec)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            if self.spec.num_gpus > 0 and torch.cuda.is_available():
                self.device = "cuda"
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, dtype=dtype)
        except (OSError, ValueError) as e:
            if local_only and not Path(source).is_dir():
                raise ModelLoadError(
                    f"model {self.spec.id!r}: {source!r} is not a local directory and not in the Hugging Face "
                    f"cache, and downloads are off for it (set allow_download: true in its catalog entry, "
                    f"or point source at a local model directory)"
                ) from None
            raise ModelLoadError(f"model {self.spec.id!r}: cannot load {source!r}: {e}") from None
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        log.info("loaded %s from %s on %s", self.spec.id, source, self.device)

    # ------------------------------------------------------------ prompts

    def chat_prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"model {self.spec.id!r} has no chat template; use /v1/completions with a plain prompt", "messages"
            )
        msgs = [_template_message(m) for m in messages]
        try:
            out = self.tokenizer.apply_chat_template(msgs, tools=tools or None, add_generation_prompt=True,
                                                     tokenize=True)
        except Exception as e:  # templates raise on roles or orders they do not support
            raise InvalidRequest(f"messages do not fit the chat template of {self.spec.id!r}: {e}", "messages") from None
        # Newer tokenizers return a BatchEncoding, older ones a list of ids.
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _budget(self, prompt_len: int, params: GenerationParams) -> int:
        ctx = self.spec.max_context
        if params.max_tokens is None and prompt_len < ctx:
            return min(params.max_tokens_cap, ctx - prompt_len)
        if prompt_len >= ctx:
            raise InvalidRequest(
                f"the prompt is {prompt_len} tokens, over the {ctx}-token context of {self.spec.id!r}", "messages",
                code="context_length_exceeded",
            )
        if prompt_len + params.max_tokens > ctx:
            raise InvalidRequest(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"{ctx}-token context of {self.spec.id!r}", "max_tokens", code="context_length_exceeded",
            )
        return params.max_tokens

    # ------------------------------------------------------------ generation

    async def stream(self, prompt_ids: list[int], params: GenerationParams,
                     tools: set[str] | None = None) -> AsyncIterator[GenerationEvent]:
        """Generation events; with `tools` (the offered tool names) a reply that calls them ends
        with tool-call events instead of their text (see models.engines.tool_parser)."""
        from transformers.generation.streamers import BaseStreamer

        max_new = self._budget(len(prompt_ids), params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        halt = threading.Event()

        class _QueueStreamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):  # first call carries the prompt
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                loop.call_soon_threadsafe(queue.put_nowait, value.reshape(-1).tolist())

            def end(self):
                loop.call_soon_threadsafe(queue.put_nowait, None)

        job = loop.run_in_executor(self._executor, self._generate, prompt_ids, params, max_new, _QueueStreamer(), halt)
        stops = params.stop or []
        generated: list[int] = []
        text = emitted = ""
        finish: str | None = None
        try:
            ended = False
            while not ended:
                item = await queue.get()
                if item is None:
                    break
                generated.extend(item)
                # Tokens that piled up while the consumer was busy go out as one event: fewer
                # messages per answer through Serve, and the first token is never held back.
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is None:
                        ended = True
                        break
                    generated.extend(more)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
                if cuts:
                    text, finish = text[: min(cuts)], "stop"
                    halt.set()
                held = max(0 if finish else _hold_back(text, stops), may_be_a_call(text) if tools else 0)
                safe = text[: len(text) - held]
                # Emit only once the decoded text settles (no half characters, no re-spaced prefix).
                if safe.startswith(emitted) and not safe.endswith("\ufffd"):
                    if len(safe) > len(emitted):
                        yield GenerationEvent(text=safe[len(emitted):])
                        emitted = safe
                if finish:
                    break
            await job
            if not finish:
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                eos = self._eos_ids()
                finish = "stop" if generated and generated[-1] in eos else "length" if len(generated) >= max_new else "stop"
            calls = []
            if tools:
                content, calls = parse_tool_calls(text, tools)
                if calls:
                    text, finish = content, "tool_calls"
            tail = text[len(emitted):] if text.startswith(emitted) else ""
            deltas = [ToolCallDelta(index=i, id=c.id, type="function",
                                    function=FunctionCallDelta(name=c.function.name, arguments=c.function.arguments))
                      for i, c in enumerate(calls)] or None
            # The last text rides with the finish event: one message fewer per answer.
            yield GenerationEvent(text=tail, tool_calls=deltas, finish_reason=finish,
                                  usage=Usage.of(len(prompt_ids), len(generated)))
        finally:
            halt.set()  # the client went away or we stopped: end generation at the next token

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def _generate(self, prompt_ids, params: GenerationParams, max_new: int, streamer, halt: threading.Event) -> None:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        class _Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device)

        sampling = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=None,
            eos_token_id=sorted(self._eos_ids()) or None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        ids = torch.tensor([prompt_ids], device=self.device)
        try:
            with torch.inference_mode():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=config,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Halt()]),
                )
        except BaseException:
            streamer.end()
            raise
