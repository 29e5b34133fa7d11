"""A small real OpenAI-compatible server on loopback, standing in for a hosted provider.

Its behaviour is chosen by the requested model name:
  echo          streams the last user message back word by word, with usage
  fail-500      answers 500 with an OpenAI error body
  rate-limited  answers 429 with Retry-After
  slow          waits `slow_s` before the first byte
  drop          sends two chunks, then ends the stream without finishing
  garbage       sends an unreadable stream event
  flaky:N       answers 500 to its first N requests (per server), then behaves as echo
  limited:N     answers 429 (Retry-After: 0.1) to its first N requests, then echo
  delay:S       echo after S seconds before the first byte
  const:TEXT    answers TEXT (with usage)
  nousage       echo, but never reports usage (a provider that ignores stream_options)
  refuses:P     answers 400 naming parameter P when the request sets it (a provider without P), else echo
  plan          a planner: a JSON plan with one subtask per non-empty line of the last user message
  script        a deterministic agent stand-in: a system message line `SCRIPT: [...]` (a JSON list)
                holds its replies; the k-th reply answers a conversation with k assistant turns
                (the last one repeats). In a reply, {last} is the last message's content and {task}
                the first user message's. An entry may be {"content": ..., "delay_s": ...}, or
                {"tool_calls": [{"name": ..., "arguments": {...}}]}: native tool calls, streamed as
                OpenAI does (id and name first, arguments in pieces), finish_reason tool_calls.
The echo models send log probabilities when asked (`logprobs`, `top_logprobs`), in OpenAI's shape
for chat and for completions: each word's log-probability is -0.25 times its position + 1.
Every request is recorded (path, body, Authorization header) for the tests to inspect;
GET /v1/models answers the listing and counts as a health probe.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class ProviderServer:
    def __init__(self, port: int, slow_s: float = 5.0):
        self.port = port
        self.slow_s = slow_s
        self.requests: list[dict] = []
        self.probes: list[str | None] = []  # GET /v1/models (health probes), by Authorization header
        self.counts: dict[str, int] = {}
        self.app = self._build()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "ProviderServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("provider server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def _build(self) -> FastAPI:
        app = FastAPI()

        def chunk(kind: str, model: str, text: str | None = None, finish: str | None = None, usage=None,
                  logprobs: dict | None = None) -> str:
            if kind == "chat":
                choices = [] if usage else [{"index": 0, "delta": {"content": text} if text else {},
                                             "finish_reason": finish}]
                obj = {"id": "p-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                       "choices": choices}
            else:
                choices = [] if usage else [{"index": 0, "text": text or "", "finish_reason": finish}]
                obj = {"id": "p-1", "object": "text_completion", "created": 1, "model": model, "choices": choices}
            if logprobs and choices:
                choices[0]["logprobs"] = logprobs
            if usage:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        async def generate(request: Request, kind: str):
            body = await request.json()
            self.requests.append({"path": request.url.path, "body": body,
                                  "authorization": request.headers.get("authorization")})
            model = body.get("model")
            seen = self.counts[model] = self.counts.get(model, 0) + 1
            mode, _, arg = (model or "").partition(":")
            if mode == "flaky" and seen <= int(arg):
                return JSONResponse({"error": {"message": f"flaky failure {seen}", "type": "server_error"}}, 500)
            if mode == "limited" and seen <= int(arg):
                return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, 429,
                                    headers={"Retry-After": "0.1"})
            if mode == "delay":
                await asyncio.sleep(float(arg))
            if mode == "refuses" and body.get(arg) is not None:
                return JSONResponse({"error": {"message": f"{arg} is not supported by this model",
                                               "type": "invalid_request_error", "param": arg}}, 400)
            if mode in ("const", "plan") and kind == "chat":
                if mode == "plan":
                    lines = [x.strip() for x in body["messages"][-1]["content"].splitlines() if x.strip()]
                    arg = json.dumps({"subtasks": [{"id": f"p{i + 1}", "prompt": x} for i, x in enumerate(lines)]})
                usage = {"prompt_tokens": 10, "completion_tokens": len(arg.split()),
                         "total_tokens": 10 + len(arg.split())}

                async def const():
                    yield chunk("chat", model, arg)
                    yield chunk("chat", model, finish="stop")
                    yield chunk("chat", model, usage=usage)
                    yield "data: [DONE]\n\n"

                return StreamingResponse(const(), media_type="text/event-stream")
            if model == "fail-500":
                return JSONResponse({"error": {"message": "provider exploded", "type": "server_error"}}, 500)
            if model == "rate-limited":
                return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, 429,
                                    headers={"Retry-After": "1"})
            if model == "slow":
                await asyncio.sleep(self.slow_s)
            if model == "script" and kind == "chat":
                text, delay = scripted_reply(body["messages"])
                await asyncio.sleep(delay)
                if isinstance(text, list):
                    return StreamingResponse(tool_calls(model, text), media_type="text/event-stream")
                return StreamingResponse(whole(model, text), media_type="text/event-stream")
            if kind == "chat":
                text = body["messages"][-1]["content"]
            else:
                text = body["prompt"]
            words = text.split()
            limit = body.get("max_tokens") or len(words)
            out = words[:limit]

            async def events():
                if model == "garbage":
                    yield "data: {not json\n\n"
                    return
                for i, w in enumerate(out):
                    yield chunk(kind, model, (" " if i else "") + w, logprobs=word_logprobs(kind, body, w, i))
                    if model == "drop" and i == 1:
                        return
                    await asyncio.sleep(0.01)
                yield chunk(kind, model, finish="length" if limit < len(words) else "stop")
                if (body.get("stream_options") or {}).get("include_usage") and model != "nousage":
                    yield chunk(kind, model, usage={"prompt_tokens": len(words), "completion_tokens": len(out),
                                                    "total_tokens": len(words) + len(out)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async def tool_calls(model: str, calls: list[dict]):
            def delta(d: dict, finish: str | None = None) -> str:
                obj = {"id": "p-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                       "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}
                return f"data: {json.dumps(obj)}\n\n"

            yield delta({"role": "assistant", "content": None})
            for i, c in enumerate(calls):
                args = json.dumps(c["arguments"])
                yield delta({"tool_calls": [{"index": i, "id": f"call_{i}_{len(self.requests)}", "type": "function",
                                             "function": {"name": c["name"], "arguments": ""}}]})
                for piece in (args[: len(args) // 2], args[len(args) // 2:]):
                    yield delta({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
            yield delta({}, finish="tool_calls")
            yield chunk("chat", model, usage={"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12})
            yield "data: [DONE]\n\n"

        async def whole(model: str, text: str):
            yield chunk("chat", model, text)  # one chunk: the reply's whitespace survives
            yield chunk("chat", model, finish="stop")
            yield "data: [DONE]\n\n"

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await generate(request, "chat")

        @app.get("/v1/models")
        async def models(request: Request):
            self.probes.append(request.headers.get("authorization"))
            return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"}
                                               for m in ("echo", "script")]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await generate(request, "completion")

        @app.post("/v1/embeddings")
        async def embeddings(request: Request):
            body = await request.json()
            self.requests.append({"path": request.url.path, "body": body,
                                  "authorization": request.headers.get("authorization")})
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.0]}
                    for i, t in enumerate(texts)]
            return {"object": "list", "data": data, "model": body["model"],
                    "usage": {"prompt_tokens": sum(len(t.split()) for t in texts),
                              "total_tokens": sum(len(t.split()) for t in texts)}}

        return app


def word_logprobs(kind: str, body: dict, word: str, i: int) -> dict | None:
    """The echo models' log probabilities of the i-th word, when the request asked for them."""
    lp = -0.25 * (i + 1)
    if kind == "chat":
        if not body.get("logprobs"):
            return None
        top = [{"token": word, "logprob": lp, "bytes": list(word.encode())}]
        top += [{"token": f"alt{k}", "logprob": lp - k, "bytes": list(f"alt{k}".encode())}
                for k in range(1, (body.get("top_logprobs") or 0))]
        return {"content": [{"token": word, "logprob": lp, "bytes": list(word.encode()),
                             "top_logprobs": top[: body.get("top_logprobs") or 0]}]}
    if body.get("logprobs") is None:
        return None
    top = {word: lp, **{f"alt{k}": lp - k for k in range(1, body["logprobs"])}}
    return {"tokens": [word], "token_logprobs": [lp], "top_logprobs": [dict(list(top.items())[: body["logprobs"]])]}


def scripted_reply(messages: list[dict]) -> tuple[str | list[dict], float]:
    """The `script` model's reply to a conversation (see the module docstring)."""
    script = None
    for m in messages:
        if m.get("role") == "system" and isinstance(m.get("content"), str):
            found = re.search(r"^SCRIPT: (.*)$", m["content"], re.M)
            if found:
                script = json.loads(found.group(1))
    if not script:
        return "no script", 0.0
    turn = sum(1 for m in messages if m.get("role") == "assistant")
    entry = script[min(turn, len(script) - 1)]
    delay = 0.0
    if isinstance(entry, dict) and "tool_calls" in entry:
        return entry["tool_calls"], 0.0
    if isinstance(entry, dict):
        entry, delay = entry["content"], float(entry.get("delay_s", 0))
    last = messages[-1].get("content") or ""
    task = next((m.get("content") or "" for m in messages if m.get("role") == "user"), "")
    return entry.replace("{last}", str(last)).replace("{task}", str(task)), delay
