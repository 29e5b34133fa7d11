"""Server-side conversation threads (`/v1/threads`): each thread belongs to the API key that
made it, and only that key sees it (any other gets 404, as for a thread that does not exist).

One JSON file per thread under `<data_dir>/rag/threads/`, written atomically; with encryption on
its user content (title and messages) is one field-cipher token bound to the thread id (scope
`store:threads`), the owner, collection and times stay plain. The store is a detached actor
(`thread_store`), placed where the data directory is, so gateway and RAG replicas share it
and a replica restart (or the actor's own) loses nothing. Sizes are bounded by
`rag.conversation` (threads per key, messages per thread, characters per message).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from config.actors import detached_actor
from models.errors import APIError, InvalidRequest, NotFound

THREADS_SCOPE = "store:threads"
THREAD_ID = r"^thr_[0-9a-f]{24}$"
MAX_TITLE_CHARS = 200
ENC = "orfeas_encrypted"


class ThreadFull(APIError):
    """A thread at rag.conversation.max_thread_messages, or a key at max_threads: 409."""

    status, type, code = 409, "invalid_request_error", "thread_full"


class Citation(BaseModel):
    """What an answer in a thread cited (the full citation is in the answer's response)."""

    index: int
    source: str
    title: str = ""
    doc_id: str = ""


class ThreadMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str
    created: int
    standalone_question: str | None = Field(None, description="A question: what retrieval used.")
    model: str | None = Field(None, description="An answer: the model that wrote it (or extractive).")
    citations: list[Citation] = Field(default_factory=list)


class ThreadSummary(BaseModel):
    id: str
    object: Literal["thread"] = "thread"
    title: str
    collection: str | None = None
    created: int
    updated: int
    message_count: int


class Thread(ThreadSummary):
    messages: list[ThreadMessage]


class ThreadList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ThreadSummary]


class ThreadDeleted(BaseModel):
    id: str
    object: Literal["thread.deleted"] = "thread.deleted"
    deleted: bool = True


class ThreadsErased(BaseModel):
    """What a data subject's erasure removed from the thread store."""

    deleted: list[str] = Field(description="Their threads (made with their keys or for them), deleted.")
    turns_removed: int = Field(description="Answers in other people's threads that cited their documents, "
                               "removed with the questions they answered.")


class NewMessage(BaseModel):
    """A message appended to a thread as it is (no answer is made)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str = Field(min_length=1, max_length=1_000_000, description="Up to rag.conversation.max_message_chars.")


class ThreadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field("", max_length=MAX_TITLE_CHARS)
    collection: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
                                   description="The collection the thread's questions go to (default rag.collection).")
    messages: list[NewMessage] = Field(default_factory=list, max_length=10_000,
                                       description="Earlier messages to start from (oldest first).")


class ThreadStore:
    """The plain-Python store over a directory; `limits` is a RagConversationSettings."""

    def __init__(self, root: str | Path, limits: Any, cipher: Any = None):
        self.root, self.limits, self.cipher = Path(root), limits, cipher
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # id -> owner, read once: listing and ownership need no decryption
        self.owners: dict[str, str] = {}
        for p in self.root.glob("thr_*.json"):
            try:
                self.owners[p.stem] = json.loads(p.read_text())["owner"]
            except (OSError, ValueError, KeyError):
                continue  # a torn or foreign file is not a thread

    # --- files
    def _path(self, thread_id: str) -> Path:
        return self.root / f"{thread_id}.json"

    def _write(self, doc: dict[str, Any]) -> None:
        content = {"title": doc["title"], "messages": doc["messages"]}
        stored = {k: v for k, v in doc.items() if k not in content}
        if self.cipher is not None:
            stored[ENC] = self.cipher.encrypt_json(content, scope=THREADS_SCOPE, record_id=doc["id"], field="content")
        else:
            stored.update(content)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".thread.")
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(doc["id"]))

    def _read(self, thread_id: str) -> dict[str, Any]:
        stored = json.loads(self._path(thread_id).read_text())
        if ENC in stored:
            if self.cipher is None:
                from security.crypto import NotEncrypted

                raise NotEncrypted(f"thread {thread_id!r} is encrypted but encryption is off (encryption.enabled)")
            stored.update(self.cipher.decrypt_json(stored.pop(ENC), scope=THREADS_SCOPE, record_id=thread_id,
                                                   field="content"))
        return stored

    def _owned(self, owner: str, thread_id: str) -> dict[str, Any]:
        """The thread if `owner` made it; anyone else is told it does not exist."""
        if self.owners.get(thread_id) != owner:
            raise NotFound(f"no thread {thread_id!r}", "thread_id")
        return self._read(thread_id)

    # --- checks
    def _check_messages(self, messages: list[dict[str, Any]], have: int) -> None:
        most = self.limits.max_message_chars
        for i, m in enumerate(messages):
            if len(m["content"]) > most:
                raise InvalidRequest(f"message {i} has {len(m['content'])} characters, over the limit of {most} "
                                     "(rag.conversation.max_message_chars)", "content")
        if have + len(messages) > self.limits.max_thread_messages:
            raise ThreadFull(f"the thread holds {have} messages; {len(messages)} more would pass the limit of "
                             f"{self.limits.max_thread_messages} (rag.conversation.max_thread_messages): start "
                             "a new thread", "messages")

    # --- the API
    def create(self, owner: str, title: str = "", collection: str | None = None,
               messages: list[dict[str, Any]] | None = None, user: str = "") -> dict[str, Any]:
        """A new thread of key `owner`; `user` (the person behind the key, when known) is kept
        beside it so a data subject's erasure finds threads of credentials other than API keys."""
        now = int(time.time())
        msgs = [{"role": m["role"], "content": m["content"], "created": now} for m in messages or []]
        self._check_messages(msgs, 0)
        with self._lock:
            mine = sum(1 for o in self.owners.values() if o == owner)
            if mine >= self.limits.max_threads:
                raise ThreadFull(f"this key keeps {mine} threads, the limit (rag.conversation.max_threads): "
                                 "delete one first", "threads")
            doc = {"id": f"thr_{secrets.token_hex(12)}", "owner": owner, "user": user, "collection": collection,
                   "created": now, "updated": now, "title": title, "messages": msgs}
            self._write(doc)
            self.owners[doc["id"]] = owner
        return _public(doc)

    def list(self, owner: str) -> list[dict[str, Any]]:
        with self._lock:
            ids = [i for i, o in self.owners.items() if o == owner]
            docs = [self._read(i) for i in ids]
        return sorted((_summary(d) for d in docs), key=lambda d: (-d["updated"], d["id"]))

    def get(self, owner: str, thread_id: str) -> dict[str, Any]:
        with self._lock:
            return _public(self._owned(owner, thread_id))

    def room(self, owner: str, thread_id: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The thread, when `messages` would fit it (else the error): checked before a question is answered."""
        with self._lock:
            doc = self._owned(owner, thread_id)
        self._check_messages(messages, len(doc["messages"]))
        return _public(doc)

    def append(self, owner: str, thread_id: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        now = int(time.time())
        msgs = [{**m, "created": now} for m in messages]
        with self._lock:
            doc = self._owned(owner, thread_id)
            self._check_messages(msgs, len(doc["messages"]))
            doc["messages"].extend(msgs)
            doc["updated"] = now
            self._write(doc)
        return _public(doc)

    def delete(self, owner: str, thread_id: str) -> bool:
        with self._lock:
            self._owned(owner, thread_id)
            self._drop(thread_id)
        return True

    # --- erasure and retention (rag/erasure.py, agents/retention.py)
    def _drop(self, thread_id: str) -> None:
        self._path(thread_id).unlink(missing_ok=True)
        self.owners.pop(thread_id, None)

    def erase_subject(self, user: str, key_ids: list[str], doc_ids: list[str]) -> dict[str, Any]:
        """A data subject's erasure: the threads that belong to them (made with one of `key_ids`,
        or for `user`) are deleted; in everyone else's threads, each turn whose answer cited one
        of their erased documents (`doc_ids`, whatever the collection: a collision errs towards
        erasing) loses that answer and the question that drew it, which may name them too."""
        keys, docs = set(key_ids), set(doc_ids)
        deleted, turns = [], 0
        with self._lock:
            for tid, owner in sorted(self.owners.items()):
                if owner in keys:
                    self._drop(tid)
                    deleted.append(tid)
                    continue
                doc = self._read(tid)
                if user and doc.get("user") == user:
                    self._drop(tid)
                    deleted.append(tid)
                    continue
                if not docs:
                    continue
                kept: list[dict[str, Any]] = []
                cut = 0
                for m in doc["messages"]:
                    if m["role"] == "assistant" and any(c.get("doc_id") in docs for c in m.get("citations") or ()):
                        cut += 1
                        if kept and kept[-1]["role"] == "user":
                            kept.pop()  # the question this answer was made for
                        continue
                    kept.append(m)
                if cut:
                    doc["messages"] = kept
                    self._write(doc)
                    turns += cut
        return {"deleted": deleted, "turns_removed": turns}

    def expire(self, before: float) -> dict[str, int]:
        """Retention: messages written before `before` (epoch seconds) are dropped; a thread left
        without messages and last updated before it is deleted."""
        dropped = deleted = 0
        with self._lock:
            for tid in sorted(self.owners):
                doc = self._read(tid)
                kept = [m for m in doc["messages"] if m["created"] >= before]
                if not kept and doc["updated"] < before:
                    self._drop(tid)
                    deleted += 1
                    dropped += len(doc["messages"])
                elif len(kept) < len(doc["messages"]):
                    dropped += len(doc["messages"]) - len(kept)
                    doc["messages"] = kept
                    self._write(doc)
        return {"messages": dropped, "threads": deleted}


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    return {"id": doc["id"], "object": "thread", "title": doc["title"], "collection": doc.get("collection"),
            "created": doc["created"], "updated": doc["updated"], "message_count": len(doc["messages"])}


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {**_summary(doc), "messages": doc["messages"]}


class ThreadStoreActor(ThreadStore):
    """The store as the cluster's one actor (settings as a dict: its data directory, encryption
    and rag.conversation limits)."""

    def __init__(self, settings: dict[str, Any]):
        from config import settings_from_dict
        from security.encryption import field_cipher

        conf = settings_from_dict(settings)
        super().__init__(threads_dir(conf), conf.rag.conversation, field_cipher(conf))


def threads_dir(settings) -> Path:
    return Path(settings.resolved_data_dir()) / "rag" / "threads"


_HANDLES: dict[str, Any] = {}


def thread_store(settings):
    """The data directory's thread-store actor (made by the first caller, with its settings)."""
    where = str(threads_dir(settings).resolve())
    handle = _HANDLES.get(where)
    if handle is None:
        name = "orfeas-threads-" + hashlib.sha1(where.encode()).hexdigest()[:10]
        handle = _HANDLES[where] = detached_actor(ThreadStoreActor, name, settings.to_dict(), durable=True)
    return handle


def call_sync(settings, method: str, *args: Any) -> Any:
    """`call` for a driver outside the event loop (erasure, retention)."""
    import ray
    from ray.exceptions import ActorDiedError

    try:
        return ray.get(getattr(thread_store(settings), method).remote(*args))
    except ActorDiedError:
        _HANDLES.pop(str(threads_dir(settings).resolve()), None)
        return ray.get(getattr(thread_store(settings), method).remote(*args))


async def call(settings, method: str, *args: Any) -> Any:
    """`method` of the thread store, awaited. A store actor that was killed for good (not
    restarted: an operator, a redeploy) is made again from its files, once."""
    from ray.exceptions import ActorDiedError

    try:
        return await getattr(thread_store(settings), method).remote(*args)
    except ActorDiedError:
        _HANDLES.pop(str(threads_dir(settings).resolve()), None)
        return await getattr(thread_store(settings), method).remote(*args)
