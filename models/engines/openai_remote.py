"""Any remote OpenAI-compatible endpoint (OpenAI, Anthropic's and Gemini's compatibility APIs,
a vLLM server elsewhere) as an engine, called from the gateway replica itself. Requests are
streamed upstream with every parameter the client set (`GenerationRequest.openai_body`) and the
stream passed through as events, log probabilities included; provider errors become typed API
errors (a provider that refuses a parameter answers 400, and so does the gateway)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator

import httpx

from config import ModelSpec
from models.engine import Engine, EngineStatus
from models.errors import APIError, InvalidRequest, UpstreamError, UpstreamTimeout
from models.protocol import GenerationEvent, GenerationKind, GenerationRequest, StreamReader

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
PATHS = {GenerationKind.CHAT: "/chat/completions", GenerationKind.COMPLETION: "/completions"}


class RateLimited(APIError):
    status, type, code = 429, "rate_limit_error", "upstream_rate_limited"
    retry_after_s: float | None = None  # the provider's Retry-After, in seconds, when it sent one


class RemoteOpenAIEngine(Engine):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.base_url = (spec.base_url or "").rstrip("/")
        self._client: httpx.AsyncClient | None = None

    def problem(self) -> str | None:
        """Why this engine cannot serve at all (configuration), or None."""
        if self.spec.api_key_env and not os.environ.get(self.spec.api_key_env):
            return f"environment variable {self.spec.api_key_env} (API key for {self.spec.id!r}) is not set"
        return None

    async def status(self) -> EngineStatus:
        # Only the configuration: a call to the provider per health period per replica would bill
        # and rate-limit. Probe rounds ask the provider itself.
        problem = self.problem()
        return EngineStatus.unhealthy(problem) if problem else EngineStatus.ready()

    async def probe(self) -> EngineStatus:
        problem = self.problem() or await self._probe_provider()
        return EngineStatus.unhealthy(problem) if problem else EngineStatus.ready()

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.spec.api_key_env or "", "")
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            t = self.spec.timeout_s
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(t, connect=min(t, 10.0)))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------ errors

    async def _raise_for_status(self, resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        body = (await resp.aread()).decode("utf-8", "replace")
        param = None
        try:
            error = json.loads(body)["error"]
            message = error["message"]
            param = error.get("param") if isinstance(error.get("param"), str) else None
        except (ValueError, KeyError, TypeError):
            message = body[:300] or resp.reason_phrase
        where = f"provider of {self.spec.id!r} answered {resp.status_code}"
        if resp.status_code in (400, 404, 422):
            raise InvalidRequest(f"{where}: {message}", param)
        if resp.status_code == 429:
            e = RateLimited(f"{where}: {message}")
            try:
                e.retry_after_s = float(resp.headers.get("retry-after", ""))
            except ValueError:
                pass
            raise e
        raise UpstreamError(f"{where}: {message}")

    def _transport_error(self, e: httpx.HTTPError) -> APIError:
        if isinstance(e, httpx.TimeoutException):
            return UpstreamTimeout(f"provider of {self.spec.id!r} did not answer within {self.spec.timeout_s:g}s")
        return UpstreamError(f"cannot reach the provider of {self.spec.id!r} at {self.base_url}: {type(e).__name__}")

    async def _probe_provider(self) -> str | None:
        """An active health probe: `GET /models` on the provider. None when it answers (a 404 or
        405 still proves it is up: some OpenAI-compatible servers do not list models), else why."""
        try:
            resp = await self.client.get(self.base_url + "/models", headers=self._headers(),
                                         timeout=min(self.spec.timeout_s, PROBE_TIMEOUT_S))
        except httpx.HTTPError as e:
            return self._transport_error(e).message
        if resp.status_code in (401, 403):
            return f"provider of {self.spec.id!r} rejected the API key ({resp.status_code})"
        if resp.status_code >= 500 or resp.status_code == 429:
            return f"provider of {self.spec.id!r} answered {resp.status_code} to a health probe"
        return None

    # ------------------------------------------------------------ generation

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        body = request.openai_body(self.spec.source)
        reader = StreamReader(request.kind)
        path = PATHS[request.kind]
        try:
            async with self.client.stream("POST", self.base_url + path, json=body, headers=self._headers()) as resp:
                await self._raise_for_status(resp)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise UpstreamError(f"provider of {self.spec.id!r} sent an unreadable stream event") from None
                    if "error" in chunk:
                        raise UpstreamError(f"provider of {self.spec.id!r} failed mid-stream: {chunk['error']}")
                    for event in reader.read(chunk):
                        yield event
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if reader.finish is None:
            raise UpstreamError(f"provider of {self.spec.id!r} ended the stream before finishing")
        yield reader.final()

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        body = {"model": self.spec.source, "input": texts}
        try:
            resp = await self.client.post(self.base_url + "/embeddings", json=body, headers=self._headers())
            await self._raise_for_status(resp)
            data = resp.json()
            vectors = [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]
            tokens = int((data.get("usage") or {}).get("prompt_tokens", 0))
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(f"provider of {self.spec.id!r} sent an unreadable embeddings response") from None
        # Providers report one total; spread it so per-input counts still add up.
        per = [tokens // len(texts)] * len(texts)
        per[0] += tokens - sum(per)
        return vectors, per
