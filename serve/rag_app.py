"""The RAG service as its own Serve application: retrieval, packing and cited answers (no
postponed annotations: FastAPI reads the route signatures at class-decoration time).

    POST /v1/rag/query             a cited answer, or ranked passages with "answer": false
    POST /v1/rag/ingest            collections:ingest (admin, developer): ingest a source under rag.allowed_roots (202, a run)
    GET  /v1/rag/ingest/{run_id}   collections:ingest: that run's status and summary
    GET  /v1/rag/collections/{name}/graph   collections:query: the knowledge graph (entities,
                                   an entity's neighbours, a path between two: rag/graph.py)

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
from typing import Any, Literal

from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from config import settings_from_dict
from config.names import GATEWAY_APP, RAG_APP
from models.errors import NotFound, UpstreamTimeout
from observability import metrics, tracing
from rag.cache import (AnswerCache, CachedAnswer, SemanticCache, cache_key, collection_version,
                       semantic_variant, tenant_of)
from rag.errors import PromptInjectionDetected
from rag.conversation import HistoryMessage
from rag.errors import RagInvalidRequest
from rag.graph import GraphView, graph_view
from rag.injection import is_injection
from rag.service import EXTRACTIVE_MODEL, RagQueryRequest, RagQueryResponse, RagService, parse_request
from rag import threads
from rag.sync import ChangeFeed, ChangesPage, EdgeWrite, PointsRequest, apply_edge_write
from rag.lineage import cited
from security.audit import audit_event
from security.auth import Principal
from scaling.serve_options import replica_count
from serve.applications import RAG_DEPLOYMENT, replica_actor_options
from serve.http import admin, authenticated, catalog_label, http_app, label_model, permitted

log = logging.getLogger(__name__)

# Answers of a RAG call are short: a few cited sentences.
RAG_MAX_TOKENS = 512


class IngestRequest(BaseModel):
    """`POST /v1/rag/ingest`: a source under rag.allowed_roots into a collection."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="A file or directory under rag.allowed_roots.")
    collection: str | None = Field(None, description="The logical collection (default rag.collection).")
    rebuild: bool = Field(False, description="Build a new version from scratch instead of adding to the current.")


class IngestRun(BaseModel):
    """An ingest run started through the API, as `GET /v1/rag/ingest/{run_id}` reports it."""

    id: str
    object: Literal["rag.ingest"] = "rag.ingest"
    status: Literal["running", "succeeded", "failed"]
    source: str
    collection: str
    rebuild: bool
    files: int = Field(description="Ingestible files found under the source when the run started.")
    owner: str = Field(description="The API key id that started the run.")
    created: int
    finished: int | None = None
    summary: dict[str, Any] | None = Field(None, description="The ingest summary once the run succeeded.")
    error: str | None = None


class RagAnswer(RagQueryResponse):
    """`POST /v1/rag/query`'s answer."""

    completion_tokens: int = Field(description="Tokens in the answer (the `rag` chat alias's usage).")


rag_api = http_app("ORFEAS RAG", name=RAG_APP)


@serve.deployment
@serve.ingress(rag_api)
class RagServer:
    def __init__(self, settings: dict[str, Any]):
        self.settings = settings_from_dict(settings)
        self.service = RagService(self.settings)
        rag_api.state.configure(self.settings, model_label=catalog_label(self.settings, EXTRACTIVE_MODEL))
        self._gateway = None
        # Ingest runs started through the API, by id. They live with this replica (the default
        # is one); `orfeas ingest` runs are Ray jobs with their own durable status.
        self.ingests: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.feed = ChangeFeed(self.service.store)  # edge sync (rag.sync)
        c = self.settings.rag.cache
        self.cache = AnswerCache(c.ttl_s, c.max_entries) if c.enabled else None
        self.semantic = (SemanticCache(c.similarity_threshold, c.ttl_s, c.max_entries)
                         if c.enabled and c.semantic else None)
        self._lookups = {"rag": [0, 0], "rag_semantic": [0, 0]}  # cache -> [hits, lookups] (hit ratio)

    @property
    def gateway(self):
        if self._gateway is None:
            self._gateway = serve.get_app_handle(GATEWAY_APP)
        return self._gateway

    @rag_api.post("/query", response_model=RagAnswer)
    async def query_http(self, req: RagQueryRequest, request: Request,
                         principal: Principal = Depends(authenticated)) -> JSONResponse:
        label_model(request, req.model)
        principal.require("collections:query", req.collection or self.settings.rag.collection, "collection")
        model = None
        # Only a generating answer needs the gateway: it checks the key against the named model
        # (or picks rag.chat_model when it is healthy); retrieval and extractive answers do not.
        if req.answer and (req.model or self.settings.rag.chat_model):
            timeout = self.settings.gateway.request_timeout_s
            try:
                model = await asyncio.wait_for(self.gateway.rag_generator.remote(req.model, principal), timeout)
            except TimeoutError:
                raise UpstreamTimeout(f"the gateway did not name a chat model within {timeout:g}s") from None
        # (a thread's next question moves on with its history: never answered from a cache)
        cached = self.cache is not None and not req.thread
        found, headers, put = await self._cached(req, model, principal) if cached else (None, None, None)
        if found is not None:  # the same answer, but a response of its own: its id leads to this query's lineage
            out = {**found.response, "id": f"rag-{uuid.uuid4().hex[:24]}", "created": int(time.time())}
        else:
            made = await self.answer(req, model, principal)  # generated on this key's behalf (scopes, budget, ledger)
            out = made.response
            if put and not (out["diagnostics"]["fallback_reason"] or "").startswith("generation failed"):
                put(made)  # a transient failure's fallback is not kept
        label_model(request, out["model"])
        # What the answer cited goes into its audit entry: its lineage (rag/lineage.py, `orfeas lineage`).
        audit_event(self.settings, "data.query", {"mode": req.mode, "top_k": req.top_k, **cited(out)},
                    actor=principal.key_id,
                    target=f"collection:{req.collection or self.settings.rag.collection}",
                    source=request.client.host if request.client else "",
                    request_id=getattr(request.state, "request_id", "") or "")
        return JSONResponse(out, headers=headers)  # built from a RagQueryResponse: no second validation

    def _looked_up(self, cache: str, hit: bool) -> None:
        counts = self._lookups[cache]
        counts[0] += hit
        counts[1] += 1
        metrics.cache_lookup(cache, hit)
        metrics.cache_hit_ratio(cache, counts[0] / counts[1])

    async def _cached(self, req: RagQueryRequest, model: str | None, principal: Principal):
        """The cached answer for this request (exact, else semantic when rag.cache.semantic is on),
        the response headers that say which, and a function that caches a fresh answer (None when
        the collection cannot be resolved: the query reports why, uncached)."""
        c = self.settings.rag.cache
        tenant = tenant_of(principal.team, principal.key_id, c.per)
        collection = req.collection or self.settings.rag.collection
        try:  # the physical collection its alias names and its write version (rag.cache)
            version = await asyncio.to_thread(collection_version, self.service.store, collection)
        except Exception:  # noqa: BLE001 - unknown collection, store restarting: answer uncached
            return None, {"x-orfeas-cache": "miss"}, None
        body = req.model_dump(mode="json")
        key = cache_key(tenant, version, model, body)
        found = self.cache.get(key)
        self._looked_up("rag", found is not None)
        if found is not None:
            metrics.cache_saved("rag", found.cost_usd, found.seconds)
            return found, {"x-orfeas-cache": "hit", "x-orfeas-cache-match": "exact"}, None
        vector, variant = None, None
        question = req.query.strip() if isinstance(req.query, str) else ""
        # A question that reads as an injection takes the normal path, which refuses or flags it.
        if self.semantic is not None and question and not is_injection(question):
            retriever = self.service.retriever
            with tracing.span("rag.cache.lookup", {"orfeas.cache": "rag_semantic"}) as span:
                # the retrieval of a miss reuses this vector (Retriever.query_vectors keeps it)
                vector = (await asyncio.to_thread(retriever.query_vectors, question))[0]
                variant = semantic_variant(model, retriever.embedder, body)
                similar = self.semantic.get(tenant, collection, version, variant, vector)
                span.set_attribute("orfeas.cache.hit", similar is not None)
            self._looked_up("rag_semantic", similar is not None)
            if similar is not None:
                found, similarity = similar
                metrics.cache_saved("rag_semantic", found.cost_usd, found.seconds)
                return found, {"x-orfeas-cache": "hit", "x-orfeas-cache-match": "semantic",
                               "x-orfeas-cache-similarity": f"{similarity:.4f}"}, None

        def put(made: CachedAnswer) -> None:
            self.cache.put(key, made)
            if vector is not None:
                self.semantic.put(tenant, collection, version, variant, vector, made)

        return None, {"x-orfeas-cache": "miss"}, put

    @rag_api.post("/ingest", response_model=IngestRun, status_code=202)
    async def ingest_http(self, req: IngestRequest, request: Request,
                          principal: Principal = Depends(permitted("collections:ingest"))) -> IngestRun:
        principal.require("collections:ingest", req.collection or self.settings.rag.collection, "collection")
        run = IngestRun.model_validate(await asyncio.to_thread(self.start_ingest, req, principal.key_id))
        audit_event(self.settings, "data.ingest", {"source": req.source, "run_id": run.id},
                    actor=principal.key_id, target=f"collection:{req.collection or self.settings.rag.collection}",
                    source=request.client.host if request.client else "",
                    request_id=getattr(request.state, "request_id", "") or "")
        return run

    @rag_api.get("/ingest/{run_id}", response_model=IngestRun, dependencies=[Depends(permitted("collections:ingest"))])
    async def ingest_status_http(self, run_id: str) -> IngestRun:
        return IngestRun.model_validate(self.ingest_status(run_id))

    @rag_api.get("/collections/{name}/graph", response_model=GraphView)
    async def graph_http(self, name: str,
                         entity: str | None = Query(None, max_length=200, description="An entity (name or key): "
                                                    "it and its neighbours, strongest relation first."),
                         to: str | None = Query(None, max_length=200, description="With `entity`: a shortest "
                                                "path from it to this one."),
                         q: str = Query("", max_length=200, description="Without `entity`: entities whose name "
                                        "has a word starting so."),
                         limit: int = Query(25, ge=1, le=500, description="Most entities (or neighbours)."),
                         principal: Principal = Depends(authenticated)) -> GraphView:
        principal.require("collections:query", name, "collection")

        def view() -> GraphView:
            physical = self.service.store.resolve(name)
            return graph_view(self.service.retriever.graphs.get(physical), name, physical, entity=entity, to=to,
                              prefix=q, limit=limit)

        return await asyncio.to_thread(view)

    # --- edge sync (rag.sync: a content-addressed change feed, pages of one version)
    @rag_api.get("/collections/{name}/changes", response_model=ChangesPage, dependencies=[Depends(authenticated)])
    async def changes_http(self, name: str, since: str | None = None, cursor: int = 0, version: str | None = None,
                           limit: int = 2000) -> ChangesPage:
        return await asyncio.to_thread(self.feed.changes, name, since, cursor, version, limit)

    @rag_api.post("/collections/{name}/points", dependencies=[Depends(authenticated)])
    async def points_http(self, name: str, req: PointsRequest) -> dict[str, Any]:
        return {"object": "list", "data": await asyncio.to_thread(self.feed.points, name, req.ids)}

    @rag_api.post("/collections/{name}/edge-writes", dependencies=[Depends(admin)])
    async def edge_write_http(self, name: str, req: EdgeWrite) -> dict[str, Any]:
        return await asyncio.to_thread(apply_edge_write, self.service.store, self.settings, name, req)

    def _generate_with(self, model_id: str, loop: asyncio.AbstractEventLoop, principal: Principal | None = None,
                       spent: list[float] | None = None):
        timeout = self.settings.gateway.request_timeout_s
        gateway = self.gateway

        def generate(messages: list[dict], max_tokens: int = RAG_MAX_TOKENS) -> str:
            # Called from the worker thread that runs the query. The handle call itself is made on
            # the replica's event loop: in Serve's throughput mode handles route on that loop.
            carrier = tracing.inject()  # the thread's current span (rag.generate) parents the chat

            async def call() -> dict:
                if carrier:
                    return await gateway.chat_message.remote(model_id, messages, max_tokens, principal=principal,
                                                             trace=carrier)
                return await gateway.chat_message.remote(model_id, messages, max_tokens, principal=principal)

            future = asyncio.run_coroutine_threadsafe(call(), loop)
            try:
                message = future.result(timeout=timeout)
                if spent is not None:
                    spent.append(float(message.get("cost_usd") or 0.0))  # what a cache hit saves
                return message["content"] or ""
            except TimeoutError:  # the wait ran out (concurrent.futures raises the builtin since 3.11)
                future.cancel()  # stop the chat call too, not just the wait for it
                raise TimeoutError(f"chat model {model_id!r} did not answer within {timeout:g}s") from None

        return generate

    async def query(self, body: RagQueryRequest | dict[str, Any], model_id: str | None,
                    principal: Principal | None = None, trace: dict[str, str] | None = None) -> dict[str, Any]:
        """One RAG query (also the gateway's `rag` chat alias, through this app's handle); with a
        principal, the answer is generated on that key's behalf and its collection scope applies
        (an agent's kb_search passes its run's caller). `trace`: the caller's W3C carrier."""
        return (await self.answer(body, model_id, principal, trace)).response

    async def answer(self, body: RagQueryRequest | dict[str, Any], model_id: str | None,
                     principal: Principal | None = None, trace: dict[str, str] | None = None) -> CachedAnswer:
        """`query`'s answer with what it cost (chat usage in USD) and took: what caching it saves."""
        if trace:
            with tracing.attached(trace):
                return await self.answer(body, model_id, principal)
        thread = body.get("thread") if isinstance(body, dict) else body.thread
        if thread:  # its messages are the history (the caller's own thread only)
            body = await self._with_thread(parse_request(body), principal)
        if principal is not None:
            collection = (body.get("collection") if isinstance(body, dict) else body.collection)
            principal.require("collections:query", collection or self.settings.rag.collection, "collection")
        spent: list[float] = []
        generate = self._generate_with(model_id, asyncio.get_running_loop(), principal, spent) if model_id else None
        t0 = time.perf_counter()

        def run() -> dict[str, Any]:
            try:
                response = self.service.query(body, generate=generate, generator=model_id)
            except PromptInjectionDetected:
                metrics.rag_injection("input", "block")
                raise
            d = response.diagnostics
            for found in d.injections:
                metrics.rag_injection(found.where, found.action)
            q = response.quality
            metrics.rag_query(d.retrieval.mode, d.retrieve_ms / 1000, d.generation, q.groundedness if q else None)
            if q is not None:
                metrics.rag_answer_quality(d.generation, q.citation_coverage, q.groundedness, q.context_relevance,
                                           d.gate.action if d.gate else None)
            out = response.model_dump(mode="json")
            out["completion_tokens"] = self.service.count_tokens(response.answer)  # the chat alias's usage
            return out

        out = await asyncio.to_thread(run)
        if thread:
            await self._record_turn(body, out, principal)
        return CachedAnswer(out, cost_usd=sum(spent), seconds=time.perf_counter() - t0)

    async def _with_thread(self, req: RagQueryRequest, principal: Principal | None) -> RagQueryRequest:
        """The request with its thread's messages as the history (and the thread's collection when
        it names none); a thread that is not this caller's is not found, a full one refused."""
        if principal is None:
            raise RagInvalidRequest("a thread belongs to a caller: a query naming one must say whose it is", "thread")
        if req.history:
            raise RagInvalidRequest("name a thread or send history, not both", "history")
        turn = [{"role": "user", "content": req.query}, {"role": "assistant", "content": ""}]
        t = await threads.call(self.settings, "room", principal.key_id, req.thread, turn)
        update: dict[str, Any] = {"history": [HistoryMessage(role=m["role"], content=m["content"])
                                              for m in t["messages"]]}
        if req.collection is None and t["collection"]:
            update["collection"] = t["collection"]
        return req.model_copy(update=update)

    async def _record_turn(self, req: RagQueryRequest, out: dict[str, Any], principal: Principal) -> None:
        """The question (with what retrieval used) and its answer, added to the thread."""
        conv = out["diagnostics"].get("conversation") or {}
        turn = [{"role": "user", "content": req.query,
                 "standalone_question": conv.get("standalone_question") or " ".join(req.query.split())}]
        if out["answer"]:
            turn.append({"role": "assistant", "content": out["answer"], "model": out["model"],
                         "citations": [{k: c.get(k, "") for k in ("index", "source", "title", "doc_id")}
                                       for c in out["citations"]]})
        await threads.call(self.settings, "append", principal.key_id, req.thread, turn)

    def start_ingest(self, req: IngestRequest, owner: str) -> dict[str, Any]:
        """Check the request (allowed roots, name, readable files) before anything is written,
        then run the Ray Data ingest on the cluster from a background thread."""
        from rag.ingest import check_allowed, list_sources, run_ingest
        from rag.errors import SourceUnreadable
        from rag.versions import check_logical_name

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
        name=RAG_DEPLOYMENT,
        **replica_count(settings.autoscaling, RAG_APP, num_replicas=settings.rag.num_replicas,
                        target_ongoing_requests=settings.autoscaling.api_target_ongoing_requests),
        max_ongoing_requests=32,
        ray_actor_options=replica_actor_options(settings.serve, num_cpus=settings.rag.num_cpus),
    ).bind(settings.to_dict())
