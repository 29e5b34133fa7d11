"""The gateway's view of each catalog model: the `Engine` that reaches it, and whether it can
serve now (cached).

In-cluster engines are Serve applications reached through deployment handles (our own model
apps: `ServeAppEngine`; vLLM's LLMServer: `VLLMAppEngine`); remote providers are called over
HTTPS from the gateway replica itself (`RemoteOpenAIEngine`, used as it is).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from config import ModelSpec, Settings
from config.names import model_app_name
from models.engine import Engine, EngineStatus
from models.errors import ModelOverloaded, ReplicaLost
from models.engines.openai_remote import RemoteOpenAIEngine
from models.engines.vllm_engine import MISSING_EXTRA, VLLMEngine, max_model_len, vllm_available
from models.protocol import GenerationEvent, GenerationRequest
from observability import tracing
from security.remote_prompts import guarded
from serve.http import unwrap

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


class ServeAppEngine(Engine):
    """A model hosted by our own deployment (`serve.model_apps`) in its own Serve application,
    reached through the application's handle: the request goes to the replica as JSON."""

    def __init__(self, spec: ModelSpec, serve_status: Callable[[], Awaitable[dict[str, Any]]]):
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

    async def status(self) -> EngineStatus:
        # A model that was ready is asked directly (one small actor call). Serve's status API is
        # the slow path (a controller round trip that pickles every app's config: a third of an
        # idle gateway's CPU when it ran every health period); it is needed only to tell
        # "loading" from "gone" when the replica does not answer.
        if self._ready:
            try:
                st = EngineStatus.model_validate(await asyncio.wait_for(self.handle.status.remote(),
                                                                        STATUS_TIMEOUT_S))
                if st.status == "ready":
                    return st
            except Exception:  # fall through to Serve's view of the application
                pass
        h = await self._status_from_serve()
        self._ready = h.status == "ready"
        return h

    async def _app_state(self) -> EngineStatus | None:
        """Serve's view of the application when it cannot be serving yet (or at all), else None."""
        app = (await self._serve_status()).get(self.app_name)
        if app is None:
            return EngineStatus.unhealthy(f"Serve application {self.app_name!r} is not deployed")
        if app.status in ("NOT_STARTED", "DEPLOYING"):
            return EngineStatus(status="loading")
        if app.status != "RUNNING":
            return EngineStatus.unhealthy(f"Serve application {self.app_name!r} is {app.status}: {app.message}"[:500])
        return None

    async def _status_from_serve(self) -> EngineStatus:
        state = await self._app_state()
        if state is not None:
            return state
        try:
            st = await asyncio.wait_for(self.handle.status.remote(), STATUS_TIMEOUT_S)
        except (TimeoutError, BackPressureError):
            # Busy, not broken: the status call queues behind the replicas' requests, while Serve
            # (whose own health checks reach each replica on the controller's path, past that
            # queue) says the application is RUNNING. Load must never read as failure.
            return EngineStatus(status="ready", max_context=self.spec.max_context)
        except Exception as e:  # a replica that cannot answer its status is not serving
            return EngineStatus.unhealthy(f"status check failed: {type(e).__name__}")
        return EngineStatus.model_validate(st)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        try:
            carrier = tracing.inject()  # the current span (the router's attempt) parents the replica's
            call = self.handle.options(stream=True).generate
            body = request.model_dump(mode="json")
            async for event in (call.remote(body, trace=carrier) if carrier else call.remote(body)):
                yield GenerationEvent.model_validate(event)
        except Exception as e:
            raise serve_error(self.spec.id, unwrap(e)) from None

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        try:
            return await self.handle.embed.remote(texts)
        except Exception as e:
            raise serve_error(self.spec.id, unwrap(e)) from None


def serve_error(model_id: str, e: BaseException) -> BaseException:
    """A Serve handle's failure as the typed error it means: a full queue is capacity (503 at
    once, never a breaker failure); a replica that died is lost (retried on another one)."""
    if isinstance(e, BackPressureError):
        return ModelOverloaded(f"model {model_id!r} is at capacity (its request queue is full); retry shortly",
                               "model")
    if isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return ReplicaLost(f"the replica serving model {model_id!r} was lost: {type(e).__name__}", "model")
    return e


class VLLMAppEngine(VLLMEngine):
    """vLLM's LLMServer deployment (`ray.serve.llm`) in the model's Serve application."""

    def __init__(self, spec: ModelSpec, serve_status: Callable[[], Awaitable[dict[str, Any]]]):
        self.app_name = model_app_name(spec.id)
        self._serve_status = serve_status
        self._app_handle = None
        super().__init__(spec, self._get_handle)

    def _get_handle(self):
        if self._app_handle is None:
            self._app_handle = serve.get_app_handle(self.app_name)
        return self._app_handle

    async def status(self) -> EngineStatus:
        if not vllm_available():
            return EngineStatus.unhealthy(MISSING_EXTRA.format(id=self.spec.id))
        app = (await self._serve_status()).get(self.app_name)
        if app is None:
            return EngineStatus.unhealthy(f"Serve application {self.app_name!r} is not deployed")
        state = {"RUNNING": "ready", "DEPLOYING": "loading", "NOT_STARTED": "loading"}.get(app.status, "unhealthy")
        return EngineStatus(status=state, error=(app.message or None) if state != "ready" else None,
                            max_context=max_model_len(self.spec))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        try:
            async for event in super().stream(request):
                yield event
        except Exception as e:
            raise unwrap(e) from None


class BackendRegistry:
    """One engine per catalog model, with health answers cached briefly.

    A stale answer is served while a fresh one is fetched in the background, so no request
    waits on Serve's controller or a replica's status call except the first for each model and
    the first after a failure (`forget_health`)."""

    def __init__(self, settings: Settings):
        self.cache_s = settings.gateway.health_cache_s
        self._apps = StaleWhileRevalidate(self._fetch_serve_status, self.cache_s, "Serve status")
        self._health: dict[str, StaleWhileRevalidate[EngineStatus]] = {}
        self.backends: dict[str, Engine] = {}
        for spec in settings.models:
            if spec.engine == "openai":
                # Prompts leaving for a remote provider may be redacted first (pii.remote_prompts).
                self.backends[spec.id] = guarded(RemoteOpenAIEngine(spec), settings)
            elif spec.engine == "vllm":
                self.backends[spec.id] = VLLMAppEngine(spec, self._serve_status)
            else:
                self.backends[spec.id] = ServeAppEngine(spec, self._serve_status)

    async def _fetch_serve_status(self) -> dict[str, Any]:
        status = await asyncio.to_thread(serve.status)
        return {name: _AppState(a.status.value if hasattr(a.status, "value") else str(a.status), a.message)
                for name, a in status.applications.items()}

    async def _serve_status(self) -> dict[str, Any]:
        return await self._apps.get()

    async def app_health(self, app_name: str) -> EngineStatus:
        """Health of a Serve application that is not a model (the RAG service)."""
        app = (await self._serve_status()).get(app_name)
        if app is None:
            return EngineStatus.unhealthy(f"Serve application {app_name!r} is not deployed")
        state = {"RUNNING": "ready", "DEPLOYING": "loading", "NOT_STARTED": "loading"}.get(app.status, "unhealthy")
        return EngineStatus(status=state, error=None if state != "unhealthy" else f"{app.status}: {app.message}"[:500])

    def get(self, model_id: str) -> Engine | None:
        return self.backends.get(model_id)

    def _cached_health(self, model_id: str) -> StaleWhileRevalidate[EngineStatus]:
        if model_id not in self._health:
            self._health[model_id] = StaleWhileRevalidate(self.backends[model_id].status, self.cache_s,
                                                          f"health of {model_id!r}")
        return self._health[model_id]

    async def health(self, model_id: str) -> EngineStatus:
        return await self._cached_health(model_id).get()

    async def probe(self, model_id: str) -> EngineStatus:
        """A fresh, active check (the router's probe rounds); it also refreshes the cached answer."""
        return self._cached_health(model_id).set(await self.backends[model_id].probe())

    def forget_health(self, model_id: str) -> None:
        if model_id in self._health:
            self._health[model_id].forget()


@dataclass
class _AppState:
    status: str
    message: str
