"""The RAG service as its own Serve application: retrieval, packing and cited answers (no
postponed annotations: FastAPI reads the route signatures at class-decoration time).

    POST /v1/rag/query             a cited answer, or ranked passages with "answer": false
    POST /v1/rag/ingest            admin: ingest a source under rag.allowed_roots (202, a run)
    GET  /v1/rag/ingest/{run_id}   admin: that run's status and summary

The app serves its routes itself under the `/v1/rag` prefix, with the same API keys as every
/v1 route: a query pays one Serve hop, not two through the gateway. Answers are generated
through the gateway's chat path (same backends, router, limits and cost ledger as any chat
request); the gateway names the usable chat model, or none and the answer is extractive. The
gateway's `rag` chat alias calls `query` through this app's handle.
"""

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from config import settings_from_dict
from models.errors import AdminRequired, APIError, NotFound, UpstreamTimeout
from rag.errors import RagInvalidRequest
from rag.service import RagService
from config.names import GATEWAY_APP
from serve.applications import replica_actor_options
from security.auth import Authenticator, Principal
from serve.gateway.backends import unwrap
from serve.gateway.body import read_json
from serve.gateway.errors import error_response, install_error_handlers
from serve.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# Answers of a RAG call are short: a few cited sentences.
RAG_MAX_TOKENS = 512


class IngestRequest(BaseModel):
    """`POST /v1/rag/ingest`: a source under rag.allowed_roots into a collection."""

    model_config = ConfigDict(extra="forbid")

    source: str
    collection: str | None = None
    rebuild: bool = False


rag_api = FastAPI(title="ORFEAS RAG", docs_url="/docs", redoc_url=None)
install_error_handlers(rag_api)


def _require_admin(principal: Principal, what: str) -> None:
    if not principal.is_admin:
        raise AdminRequired(f"only admin keys may {what}")


@serve.deployment
@serve.ingress(rag_api)
class RagServer:
    def __init__(self, settings: dict[str, Any]):
        self.settings = settings_from_dict(settings)
        self.service = RagService(self.settings)
        self.auth = Authenticator(self.settings)
        self.metrics = GatewayMetrics()  # the same request metrics as the gateway's routes
        self._gateway = None
        # Ingest runs started through the API, by id. They live with this replica (the default
        # is one); `orfeas ingest` runs are Ray jobs with their own durable status.
        self.ingests: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @property
    def gateway(self):
        if self._gateway is None:
            self._gateway = serve.get_app_handle(GATEWAY_APP)
        return self._gateway

    async def _http(self, route: str, request: Request, work) -> JSONResponse:
        """Authenticate, run `work(principal)` -> (body, status), and record the request's metrics."""
        start = time.perf_counter()
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"))
            body, status = await work(principal)
        except APIError as e:
            self.metrics.record(route, "-", e.status, time.perf_counter() - start, e.type)
            return error_response(e)
        self.metrics.record(route, "-", status, time.perf_counter() - start)
        return JSONResponse(body, status_code=status)

    @rag_api.post("/query")
    async def query_http(self, request: Request) -> JSONResponse:
        async def work(principal: Principal):
            body = await read_json(request, self.settings.limits.max_body_bytes)
            model = None
            named = body.get("model") if isinstance(body.get("model"), str) else None  # else a 400 below
            # Only a generating answer needs the gateway: it checks the key against the named model
            # (or picks rag.chat_model when it is healthy); retrieval and extractive answers do not.
            if body.get("answer") is not False and (named or self.settings.rag.chat_model):
                timeout = self.settings.gateway.request_timeout_s
                try:
                    model = await asyncio.wait_for(self.gateway.rag_generator.remote(named, principal), timeout)
                except TimeoutError:
                    raise UpstreamTimeout(f"the gateway did not name a chat model within {timeout:g}s") from None
                except Exception as e:
                    raise unwrap(e) from None
            return await self.query(body, model), 200

        return await self._http("rag", request, work)

    @rag_api.post("/ingest")
    async def ingest_http(self, request: Request) -> JSONResponse:
        async def work(principal: Principal):
            _require_admin(principal, "ingest")
            body = await read_json(request, self.settings.limits.max_body_bytes)
            return await asyncio.to_thread(self.start_ingest, body, principal.key_id), 202

        return await self._http("rag-ingest", request, work)

    @rag_api.get("/ingest/{run_id}")
    async def ingest_status_http(self, run_id: str, request: Request) -> JSONResponse:
        async def work(principal: Principal):
            _require_admin(principal, "ingest")
            return self.ingest_status(run_id), 200

        return await self._http("rag-ingest", request, work)

    def _generate_with(self, model_id: str, loop: asyncio.AbstractEventLoop):
        timeout = self.settings.gateway.request_timeout_s
        gateway = self.gateway

        def generate(messages: list[dict]) -> str:
            # Called from the worker thread that runs the query. The handle call itself is made on
            # the replica's event loop: in Serve's throughput mode handles route on that loop.
            async def call() -> str:
                return await gateway.complete_chat.remote(model_id, messages, RAG_MAX_TOKENS)

            future = asyncio.run_coroutine_threadsafe(call(), loop)
            try:
                return future.result(timeout=timeout)
            except TimeoutError:  # the wait ran out (concurrent.futures raises the builtin since 3.11)
                future.cancel()  # stop the chat call too, not just the wait for it
                raise TimeoutError(f"chat model {model_id!r} did not answer within {timeout:g}s") from None

        return generate

    async def query(self, body: dict[str, Any], model_id: str | None) -> dict[str, Any]:
        """One RAG query (also the gateway's `rag` chat alias, through this app's handle)."""
        generate = self._generate_with(model_id, asyncio.get_running_loop()) if model_id else None

        def run() -> dict[str, Any]:
            response = self.service.query(body, generate=generate, generator=model_id)
            out = response.model_dump(mode="json")
            out["completion_tokens"] = self.service.count_tokens(response.answer)  # the chat alias's usage
            return out

        return await asyncio.to_thread(run)

    def start_ingest(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        """Check the request (allowed roots, name, readable files) before anything is written,
        then run the Ray Data ingest on the cluster from a background thread."""
        from rag.ingest import check_allowed, list_sources, run_ingest
        from rag.errors import SourceUnreadable
        from rag.versions import check_logical_name

        try:
            req = IngestRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise RagInvalidRequest(f"invalid value for '{param}': {first.get('msg')}", param) from None
        collection = req.collection or self.settings.rag.collection
        check_logical_name(collection)
        check_allowed(req.source, self.settings)
        files, _ = list_sources(req.source)
        if not files:
            raise SourceUnreadable(f"no ingestible files under {req.source!r}", "source")
        run = {"id": f"ingest-{uuid.uuid4().hex[:16]}", "object": "rag.ingest", "status": "running",
               "source": req.source, "collection": collection, "rebuild": req.rebuild, "files": len(files),
               "owner": owner, "created": int(time.time()), "finished": None, "summary": None, "error": None}
        with self._lock:
            self.ingests[run["id"]] = run

        def work() -> None:
            try:
                summary = run_ingest(req.source, collection, settings=self.settings, rebuild=req.rebuild,
                                     store=self.service.store, enforce_roots=True)
                update = {"status": "succeeded", "summary": summary.model_dump(mode="json")}
            except Exception as e:  # reported through GET, never lost in a log
                log.exception("API ingest %s failed", run["id"])
                update = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
            with self._lock:
                run.update(update, finished=int(time.time()))

        threading.Thread(target=work, name=run["id"], daemon=True).start()
        return dict(run)

    def ingest_status(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            run = self.ingests.get(run_id)
            if run is None:
                raise NotFound(f"no ingest run {run_id!r}", "id")
            return dict(run)


def build_app(args: dict[str, Any]):
    """Serve application builder for the RAG service (see serve.applications)."""
    settings = settings_from_dict(args["settings"])
    return RagServer.options(
        name="RagServer",
        num_replicas=settings.rag.num_replicas,
        max_ongoing_requests=32,
        ray_actor_options=replica_actor_options(settings.serve, num_cpus=settings.rag.num_cpus),
    ).bind(settings.to_dict())
