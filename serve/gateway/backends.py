"""The gateway's view of each catalog model: how to reach it and whether it can serve now.

In-cluster engines are Serve applications reached through deployment handles; remote
providers are called over HTTPS from the gateway replica itself.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ray import serve
from ray.exceptions import RayTaskError

from config import ModelSpec, Settings
from models.engines.openai_remote import RemoteOpenAIEngine
from models.engines.vllm_engine import MISSING_EXTRA, stream_from_llm_server, vllm_available
from models.errors import APIError, ModelUnavailable
from models.protocol import GenerationEvent
from config.names import model_app_name

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 3.0


T = TypeVar("T")


class StaleWhileRevalidate(Generic[T]):
    """One value kept off the request path: the first read waits for `fetch`; later reads get the
    last value at once and, when it is older than `max_age_s`, start one background refresh. A
    failed refresh is logged and the last value kept (the next read after max_age_s tries again)."""

    def __init__(self, fetch: Callable[[], Awaitable[T]], max_age_s: float, what: str):
        self.fetch, self.max_age_s, self.what = fetch, max_age_s, what
        self._value: tuple[float, T] | None = None
        self._refresh: asyncio.Task | None = None

    async def get(self) -> T:
        if self._value is None:
            return self.set(await self.fetch())
        at, value = self._value
        if time.monotonic() - at > self.max_age_s and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._revalidate())
        return value

    def set(self, value: T) -> T:
        self._value = (time.monotonic(), value)
        return value

    def forget(self) -> None:
        self._value = None

    async def _revalidate(self) -> None:
        try:
            self.set(await self.fetch())
        except Exception as e:
            log.warning("%s refresh failed, keeping the last answer: %s", self.what, e)


@dataclass
class Health:
    status: str  # ready | loading | unhealthy
    error: str | None = None


def provider_params(params: dict[str, Any]) -> dict[str, Any]:
    """Sampling parameters as an OpenAI-compatible server takes them (unset ones left to it)."""
    return {k: v for k, v in params.items() if v is not None and k != "max_tokens_cap"}


def unwrap(e: BaseException) -> BaseException:
    """The API error a replica raised, out of Ray's wrapper."""
    if isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), APIError):
        return e.cause
    return e


class Backend(ABC):
    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @abstractmethod
    async def health(self) -> Health: ...

    async def probe(self) -> Health:
        """An active health check for the router's probe rounds (the same as `health` unless a
        backend has a dearer, more thorough one)."""
        return await self.health()

    @abstractmethod
    def stream(self, kind: str, payload: dict[str, Any], params: dict[str, Any]) -> AsyncIterator[GenerationEvent]:
        """Generation events for a chat (`messages`) or completion (`prompt`) payload."""

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        raise ModelUnavailable(f"model {self.spec.id!r} does not serve embeddings")


class ServeAppBackend(Backend):
    """A model hosted by our own deployment (`serve.model_apps`) in its own Serve application."""

    def __init__(self, spec: ModelSpec, serve_status):
        super().__init__(spec)
        self.app_name = model_app_name(spec.id)
        self._serve_status = serve_status
        self._handle = None
        self._ready = False

    @property
    def handle(self):
        if self._handle is None:
            self._handle = serve.get_app_handle(self.app_name)
        return self._handle

    async def health(self) -> Health:
        # A model that was ready is asked directly (one small actor call). Serve's status API is
        # the slow path (a controller round trip that pickles every app's config: a third of an
        # idle gateway's CPU when it ran every health period); it is needed only to tell
        # "loading" from "gone" when the replica does not answer.
        if self._ready:
            try:
                st = await asyncio.wait_for(self.handle.status.remote(), STATUS_TIMEOUT_S)
                if st["status"] == "ready":
                    return Health("ready")
            except Exception:  # fall through to Serve's view of the application
                pass
        h = await self._health_from_serve()
        self._ready = h.status == "ready"
        return h

    async def _health_from_serve(self) -> Health:
        apps = await self._serve_status()
        app = apps.get(self.app_name)
        if app is None:
            return Health("unhealthy", f"Serve application {self.app_name!r} is not deployed")
        if app.status in ("NOT_STARTED", "DEPLOYING"):
            return Health("loading")
        if app.status != "RUNNING":
            return Health("unhealthy", f"Serve application {self.app_name!r} is {app.status}: {app.message}"[:500])
        try:
            st = await asyncio.wait_for(self.handle.status.remote(), STATUS_TIMEOUT_S)
        except Exception as e:  # a replica that cannot answer its status is not serving
            return Health("unhealthy", f"status check failed: {type(e).__name__}")
        return Health(st["status"], st.get("error"))

    async def stream(self, kind, payload, params):
        try:
            async for event in self.handle.options(stream=True).generate.remote(kind, payload, params):
                yield GenerationEvent.model_validate(event)
        except Exception as e:
            raise unwrap(e) from None

    async def embed(self, texts):
        try:
            return await self.handle.embed.remote(texts)
        except Exception as e:
            raise unwrap(e) from None


class VLLMBackend(ServeAppBackend):
    """vLLM through `ray.serve.llm`'s LLMServer deployment."""

    async def health(self) -> Health:
        if not vllm_available():
            return Health("unhealthy", MISSING_EXTRA.format(id=self.spec.id))
        apps = await self._serve_status()
        app = apps.get(self.app_name)
        if app is None:
            return Health("unhealthy", f"Serve application {self.app_name!r} is not deployed")
        return Health({"RUNNING": "ready", "DEPLOYING": "loading"}.get(app.status, "unhealthy"), app.message or None)

    async def stream(self, kind, payload, params):
        body = {**payload, "model": self.spec.id, **provider_params(params)}
        try:
            async for event in stream_from_llm_server(self.handle, kind, body):
                yield event
        except Exception as e:
            raise unwrap(e) from None


class RemoteBackend(Backend):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.engine = RemoteOpenAIEngine(spec)

    async def health(self) -> Health:
        problem = self.engine.problem()
        return Health("unhealthy", problem) if problem else Health("ready")

    async def probe(self) -> Health:
        # Requests only check the configuration (a call per health period per replica would bill
        # and rate-limit); probe rounds ask the provider itself.
        problem = self.engine.problem() or await self.engine.probe()
        return Health("unhealthy", problem) if problem else Health("ready")

    async def stream(self, kind, payload, params):
        body = {**payload, **provider_params(params)}
        async for event in self.engine.stream(kind, body):
            yield event

    async def embed(self, texts):
        vectors, tokens = await self.engine.embed(texts)
        # Providers report one total; spread it so per-input counts still add up.
        per = [tokens // len(texts)] * len(texts)
        per[0] += tokens - sum(per)
        return vectors, per


class BackendRegistry:
    """One backend per catalog model, with health answers cached briefly.

    A stale answer is served while a fresh one is fetched in the background, so no request
    waits on Serve's controller or a replica's status call except the first for each model and
    the first after a failure (`forget_health`)."""

    def __init__(self, settings: Settings):
        self.cache_s = settings.gateway.health_cache_s
        self._apps = StaleWhileRevalidate(self._fetch_serve_status, self.cache_s, "Serve status")
        self._health: dict[str, StaleWhileRevalidate[Health]] = {}
        self.backends: dict[str, Backend] = {}
        for spec in settings.models:
            if spec.engine == "openai":
                self.backends[spec.id] = RemoteBackend(spec)
            elif spec.engine == "vllm":
                self.backends[spec.id] = VLLMBackend(spec, self._serve_status)
            else:
                self.backends[spec.id] = ServeAppBackend(spec, self._serve_status)

    async def _fetch_serve_status(self) -> dict[str, Any]:
        status = await asyncio.to_thread(serve.status)
        return {name: _AppState(a.status.value if hasattr(a.status, "value") else str(a.status), a.message)
                for name, a in status.applications.items()}

    async def _serve_status(self) -> dict[str, Any]:
        return await self._apps.get()

    async def app_health(self, app_name: str) -> Health:
        """Health of a Serve application that is not a model (the RAG service)."""
        app = (await self._serve_status()).get(app_name)
        if app is None:
            return Health("unhealthy", f"Serve application {app_name!r} is not deployed")
        state = {"RUNNING": "ready", "DEPLOYING": "loading", "NOT_STARTED": "loading"}.get(app.status, "unhealthy")
        return Health(state, None if state != "unhealthy" else f"{app.status}: {app.message}"[:500])

    def get(self, model_id: str) -> Backend | None:
        return self.backends.get(model_id)

    def _cached_health(self, model_id: str) -> StaleWhileRevalidate[Health]:
        if model_id not in self._health:
            self._health[model_id] = StaleWhileRevalidate(self.backends[model_id].health, self.cache_s,
                                                          f"health of {model_id!r}")
        return self._health[model_id]

    async def health(self, model_id: str) -> Health:
        return await self._cached_health(model_id).get()

    async def probe(self, model_id: str) -> Health:
        """A fresh, active check (the router's probe rounds); it also refreshes the cached answer."""
        return self._cached_health(model_id).set(await self.backends[model_id].probe())

    def forget_health(self, model_id: str) -> None:
        if model_id in self._health:
            self._health[model_id].forget()


@dataclass
class _AppState:
    status: str
    message: str
