"""Conversation threads of the gateway: a key's own server-side RAG conversations. The store is
rag/threads.py (a detached actor over files, encrypted at rest); a question asked in a thread is
answered by the RAG app with the thread's messages as its history (rag/conversation.py), and the
question and answer are added to it.

    POST   /v1/threads                      a new thread (title, collection, earlier messages)
    GET    /v1/threads                      this key's threads, most recently updated first
    GET    /v1/threads/{thread_id}          one thread with its messages
    POST   /v1/threads/{thread_id}/messages append a message as it is (no answer)
    POST   /v1/threads/{thread_id}/ask      ask in the thread: a cited RAG answer
    DELETE /v1/threads/{thread_id}          delete it

Every route needs `collections:query`; a thread of another key answers 404, like one that does
not exist.
"""

from typing import Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from rag.service import RagQueryResponse
from rag import threads
from rag.threads import THREAD_ID, NewMessage, Thread, ThreadCreate, ThreadDeleted, ThreadList
from security.auth import Principal
from serve.http import http_state, label_model, permitted

router = APIRouter(prefix="/v1/threads", tags=["threads"])
may_query = permitted("collections:query")
# Named per route, as the admin API does: the layer's automatic scheme does not reach routes of
# an included router (FastAPI nests them).
SECURED = {"security": [{"bearer": []}]}
ThreadId = Path(pattern=THREAD_ID, description="A thread id (`thr_` and 24 hex digits).")


class ThreadAsk(BaseModel):
    """A question asked in a thread (the RAG query's options, without history: the thread is it)."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=32_000)
    collection: str | None = Field(None, description="Default: the thread's collection, else rag.collection.")
    top_k: int | None = None
    mode: Literal["dense", "sparse", "hybrid"] | None = None
    model: str | None = Field(None, description="Chat model to generate with (default rag.chat_model).")
    max_context_tokens: int | None = Field(None, ge=64, le=1_000_000)
    include_passages: bool = False


async def _store(request: Request, method: str, *args):
    return await threads.call(http_state(request.app).settings, method, *args)


@router.post("", response_model=Thread, openapi_extra=SECURED)
async def create_thread(body: ThreadCreate, request: Request, principal: Principal = Depends(may_query)) -> Thread:
    if body.collection:
        principal.require("collections:query", body.collection, "collection")
    return Thread.model_validate(await _store(
        request, "create", principal.key_id, body.title, body.collection, [m.model_dump() for m in body.messages],
        principal.user))


@router.get("", response_model=ThreadList, openapi_extra=SECURED)
async def list_threads(request: Request, principal: Principal = Depends(may_query)) -> ThreadList:
    return ThreadList.model_validate({"data": await _store(request, "list", principal.key_id)})


@router.get("/{thread_id}", response_model=Thread, openapi_extra=SECURED)
async def get_thread(request: Request, thread_id: str = ThreadId, principal: Principal = Depends(may_query)) -> Thread:
    return Thread.model_validate(await _store(request, "get", principal.key_id, thread_id))


@router.post("/{thread_id}/messages", response_model=Thread, openapi_extra=SECURED)
async def append_message(body: NewMessage, request: Request, thread_id: str = ThreadId,
                         principal: Principal = Depends(may_query)) -> Thread:
    return Thread.model_validate(await _store(request, "append", principal.key_id, thread_id,
                                                     [body.model_dump()]))


@router.post("/{thread_id}/ask", response_model=RagQueryResponse, openapi_extra=SECURED)
async def ask_in_thread(body: ThreadAsk, request: Request, thread_id: str = ThreadId,
                        principal: Principal = Depends(may_query)) -> JSONResponse:
    label_model(request, body.model)
    rag = http_state(request.app).rag_alias  # the gateway's RagAlias (picks the generator, calls the RAG app)
    out = await rag.query({**body.model_dump(exclude_none=True), "thread": thread_id}, body.model, principal)
    label_model(request, out["model"])
    return JSONResponse(out)


@router.delete("/{thread_id}", response_model=ThreadDeleted, openapi_extra=SECURED)
async def delete_thread(request: Request, thread_id: str = ThreadId,
                        principal: Principal = Depends(may_query)) -> ThreadDeleted:
    await _store(request, "delete", principal.key_id, thread_id)
    return ThreadDeleted(id=thread_id)
