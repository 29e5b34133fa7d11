"""Chat and text generation with Hugging Face `transformers` (CPU, or GPU when present).

Generation runs on one worker thread per engine (a CPU model saturates the cores anyway);
tokens reach the event loop through an asyncio queue as they are produced, so streams are
real streams. Stop sequences are applied on the decoded text and end generation early.
A GGUF source (`models.gguf`) is loaded through transformers' GGUF support (dequantised to
fp32, slower than llama.cpp): the fallback of the llama.cpp engine for the same file.

The OpenAI sampling parameters are honoured as OpenAI and vLLM define them: `seed` seeds the
sampler; `presence_penalty` / `frequency_penalty` subtract from the logit of every token already
generated (once, and once per occurrence); `logit_bias` adds to the logits of the tokens it names;
`logprobs` / `top_logprobs` report the model's own log-probabilities (before penalties, bias and
temperature) of each generated token and of the most likely ones. JSON mode and JSON schemas need
constrained decoding, which this engine does not do: they are refused, naming `response_format`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from config import ModelSpec
from models.engine import Engine, EngineStatus
from models.engines.local_generation import answer_budget
from models.engines.local_generation import hold_back as _hold_back
from models.engines.local_generation import template_message as _template_message
from models.engines.tool_parser import may_be_a_call, parse_tool_calls
from models.errors import InvalidRequest, ModelLoadError
from models.gguf import is_gguf_source, locate_gguf
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


def _resolve_source(spec: ModelSpec) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only): a local directory, or a hub repo id."""
    path = Path(spec.source).expanduser()
    if path.is_dir() or is_gguf_source(spec.source):
        return str(path), True
    if spec.source.startswith(("/", ".", "~")):
        raise ModelLoadError(f"model {spec.id!r}: directory {spec.source} does not exist")
    return spec.source, not spec.allow_download


class TransformersEngine(Engine):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.tokenizer: Any = None
        self.model: Any = None
        self.device = "cpu"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gen-{spec.id}")

    # ------------------------------------------------------------ loading

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, local_only = _resolve_source(self.spec)
        # A GGUF file (the llama.cpp engine's fallback): transformers dequantises it on load.
        gguf = locate_gguf(self.spec.id, self.spec.source) if is_gguf_source(self.spec.source) else None
        extra: dict[str, Any] = {}
        if gguf is not None:
            source, local_only, extra = str(gguf.parent), True, {"gguf_file": gguf.name}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **extra)
            if self.spec.num_gpus > 0 and torch.cuda.is_available():
                self.device = "cuda"
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, dtype=dtype,
                                                              **extra)
        except (OSError, ValueError, ImportError) as e:
            if gguf is not None:
                raise ModelLoadError(f"model {self.spec.id!r}: transformers cannot load GGUF file {gguf}: {e}") from None
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

    async def status(self) -> EngineStatus:
        return EngineStatus(status="ready" if self.model is not None else "loading",
                            max_context=self.spec.max_context)

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
            # The tokenizer's own message names its internals (TextEncodeInput, Union[...]): logged, not sent.
            log.info("chat template of %s refused the messages: %s", self.spec.id, e)
            raise InvalidRequest(f"messages do not fit the chat template of {self.spec.id!r} (check the roles, "
                                 "their order and that every content is text)", "messages") from None
        # Newer tokenizers return a BatchEncoding, older ones a list of ids.
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _budget(self, prompt_len: int, params: GenerationParams, prompt_param: str) -> int:
        return answer_budget(self.spec, prompt_len, params, prompt_param)

    def _vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _refuse_what_cannot_be_honoured(self, params: GenerationParams) -> None:
        fmt = params.response_format
        if fmt is not None and fmt.type != "text":
            raise InvalidRequest(
                f"model {self.spec.id!r} (transformers engine) cannot guarantee {fmt.type} output: it has no "
                f"constrained decoding. Use a model with the json capability (vLLM or a provider), or ask for "
                f"JSON in the prompt without response_format", "response_format")
        vocab = self._vocab_size()
        for token in params.logit_bias or {}:
            if not 0 <= int(token) < vocab:
                raise InvalidRequest(f"logit_bias names token {token}, outside the {vocab}-token vocabulary of "
                                     f"{self.spec.id!r}", "logit_bias")

    # ------------------------------------------------------------ generation

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Generation events. A chat that offers tools (unless tool_choice is "none") ends with
        tool-call events when the model calls them (see models.engines.tool_parser); "required" or
        a named tool cannot be enforced without constrained decoding and act as "auto"."""
        params = request.params
        self._refuse_what_cannot_be_honoured(params)
        tools = None
        if request.kind is GenerationKind.CHAT:
            offered = request.tools if request.tool_choice != "none" else None
            prompt_ids = self.chat_prompt_ids(request.messages or [], offered)
            tools = {t["function"]["name"] for t in offered} if offered else None
            prompt_param = "messages"
        else:
            prompt_ids = self.text_prompt_ids(request.prompt or "")
            prompt_param = "prompt"
        max_new = self._budget(len(prompt_ids), params, prompt_param)
        async for event in self._stream_ids(prompt_ids, params, max_new, tools, request.kind):
            yield event

    async def _stream_ids(self, prompt_ids: list[int], params: GenerationParams, max_new: int,
                          tools: set[str] | None, kind: GenerationKind) -> AsyncIterator[GenerationEvent]:
        from transformers.generation.streamers import BaseStreamer

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[list[int], list[_TokenLogprob]] | None] = asyncio.Queue()
        halt = threading.Event()
        recorder = _LogprobRecorder(self.tokenizer, params.top_logprobs or 0) if params.logprobs else None

        class _QueueStreamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):  # first call carries the prompt
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                ids = value.reshape(-1).tolist()
                entries = recorder.entries(ids) if recorder is not None else []
                loop.call_soon_threadsafe(queue.put_nowait, (ids, entries))

            def end(self):
                loop.call_soon_threadsafe(queue.put_nowait, None)

        job = loop.run_in_executor(self._executor, self._generate, prompt_ids, params, max_new, _QueueStreamer(),
                                   halt, recorder)
        stops = params.stop or []
        generated: list[int] = []
        logprobs: list[_TokenLogprob] = []  # of tokens not yet reported
        text = emitted = ""
        finish: str | None = None
        try:
            ended = False
            while not ended:
                item = await queue.get()
                if item is None:
                    break
                generated.extend(item[0])
                logprobs.extend(item[1])
                # Tokens that piled up while the consumer was busy go out as one event: fewer
                # messages per answer through Serve, and the first token is never held back.
                while not queue.empty():
                    more = queue.get_nowait()
                    if more is None:
                        ended = True
                        break
                    generated.extend(more[0])
                    logprobs.extend(more[1])
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
                        yield GenerationEvent(text=safe[len(emitted):], logprobs=_shaped(kind, logprobs))
                        emitted, logprobs = safe, []
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
                                  usage=Usage.of(len(prompt_ids), len(generated)), logprobs=_shaped(kind, logprobs))
        finally:
            halt.set()  # the client went away or we stopped: end generation at the next token

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def _generate(self, prompt_ids, params: GenerationParams, max_new: int, streamer, halt: threading.Event,
                  recorder: "_LogprobRecorder | None") -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

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
        # Applied in this order, before temperature and top_p: the recorder sees the model's own
        # logits; penalties and bias change what is sampled (as OpenAI and vLLM apply them).
        processors = LogitsProcessorList([recorder] if recorder is not None else [])
        if params.presence_penalty or params.frequency_penalty:
            processors.append(_Penalties(len(prompt_ids), params.presence_penalty or 0.0,
                                         params.frequency_penalty or 0.0))
        if params.logit_bias:
            processors.append(_LogitBias(params.logit_bias, self._vocab_size(), self.device))
        ids = torch.tensor([prompt_ids], device=self.device)
        try:
            with torch.inference_mode():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                elif sampling:
                    torch.seed()  # an earlier seeded request must not make this one repeatable
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=config,
                    logits_processor=processors,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Halt()]),
                )
        except BaseException:
            streamer.end()
            raise


# ---------------------------------------------------------------- logits processors (called by
# transformers' LogitsProcessorList with the ids so far and the next token's scores)

class _Penalties:
    """OpenAI's presence and frequency penalties over the generated tokens (not the prompt):
    logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        import torch

        out = input_ids[:, self.prompt_len:]
        if out.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class _LogitBias:
    """OpenAI's logit_bias: a fixed amount added to the logits of the named tokens."""

    def __init__(self, bias: dict[str, float], vocab: int, device: str):
        import torch

        self.row = torch.zeros(vocab, device=device)
        for token, value in bias.items():
            self.row[int(token)] = value

    def __call__(self, input_ids, scores):
        return scores + self.row.to(scores.dtype)


_TokenLogprob = tuple[str, float, list[tuple[str, float]]]  # (token, logprob, [(top token, logprob), ...])


class _LogprobRecorder:
    """Keeps the log-softmax of each step's raw logits (first in the processor list) so that the
    streamer, which gets the sampled token right after, can report its log-probability."""

    def __init__(self, tokenizer, top: int):
        self.tokenizer, self.top = tokenizer, top
        self.last = None

    def __call__(self, input_ids, scores):
        import torch

        self.last = torch.log_softmax(scores[0].float(), dim=-1)
        return scores

    def entries(self, ids: list[int]) -> list[_TokenLogprob]:
        import torch

        if self.last is None or not ids:
            return []
        out = []
        for token in ids[-1:]:  # one sampled token per step
            top: list[tuple[str, float]] = []
            if self.top:
                values, indices = torch.topk(self.last, self.top)
                top = [(self._text(i), v) for i, v in zip(indices.tolist(), values.tolist())]
            out.append((self._text(token), float(self.last[token]), top))
        self.last = None
        return out

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])


def _shaped(kind: GenerationKind, entries: list[_TokenLogprob]) -> dict[str, Any] | None:
    """Log probabilities in OpenAI's shape for the request's kind."""
    if not entries:
        return None
    if kind is GenerationKind.CHAT:
        return {"content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode()),
             "top_logprobs": [{"token": tt, "logprob": tl, "bytes": list(tt.encode())} for tt, tl in top]}
            for t, lp, top in entries]}
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries]}
