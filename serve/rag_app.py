"""The RAG service as its own Serve application: retrieval, packing and cited answers.

The gateway authenticates and picks the chat model; this service retrieves and packs, then
generates through the gateway's own chat path (so generation gets the same backends, limits
and metrics as any chat request), or answers extractively when no chat model is given.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from config import settings_from_dict
from models.errors import NotFound
from serve.applications import replica_actor_options
from rag.errors import RagInvalidRequest
from rag.service import RagService

log = logging.getLogger(__name__)

# Answers of a RAG call are short: a few cited sentences.
RAG_MAX_TOKENS = 512


class IngestRequest(BaseModel):
    """`POST /v1/rag/ingest`: a source under rag.allowed_roots into a collection."""

    model_config = ConfigDict(extra="forbid")

    source: str
    collection: str | None = None
    rebuild: bool = False


@serve.deployment
class RagServer:
    def __init__(self, settings: dict[str, Any]):
        self.settings = settings_from_dict(settings)
        self.service = RagService(self.settings)
        # Ingest runs started through the API, by id. They live with this replica (the default
        # is one); `orfeas ingest` runs are Ray jobs with their own durable status.
        self.ingests: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _generate_with(self, model_id: str, loop: asyncio.AbstractEventLoop):
        from serve.applications import GATEWAY_APP

        timeout = self.settings.gateway.request_timeout_s
        gateway = serve.get_app_handle(GATEWAY_APP)

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
        generate = self._generate_with(model_id, asyncio.get_running_loop()) if model_id else None
        response = await asyncio.to_thread(self.service.query, body, generate=generate, generator=model_id)
        out = response.model_dump(mode="json")
        out["completion_tokens"] = self.service.count_tokens(response.answer)  # for the chat alias's usage
        return out

    def start_ingest(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        """Check the request (allowed roots, name, readable files) before anything is written,
        then run the Ray Data ingest on the cluster from a background thread."""
        from jobs.ingest import check_allowed, list_sources, run_ingest
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
    settings = settings_from_dict(args["settings"])
    return RagServer.options(
        name="RagServer",
        num_replicas=settings.rag.num_replicas,
        max_ongoing_requests=32,
        ray_actor_options=replica_actor_options(settings.serve.throughput_optimized, num_cpus=settings.rag.num_cpus),
    ).bind(settings.to_dict())
