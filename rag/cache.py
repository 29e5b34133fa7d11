"""The RAG answer caches (rag.cache): an exact cache, one entry per (tenant, collection version,
chat model, request), and a semantic cache that also answers a *similar* question, one whose
query embedding is within `similarity_threshold` (cosine) of a cached one with everything else
the same. Both keep entries `ttl_s` seconds, least recently used first out past `max_entries`.

The tenant is the caller's team, or its key when it has none (or always its key with
`per: key`): an entry is never served across tenants. The collection version is what
`VectorStore.collection_version` says: the physical collection the alias resolves to and, on
Qdrant Edge, a counter of every write to it under an id of the store's opening, so a rebuild (the
alias flips), a rollback, an ingest, a re-ingest that rewrites chunks in place with the same
count, an erasure or a re-encryption each make every older entry unreachable (on a Qdrant server
the token is the point count, and a same-count rewrite is caught by the TTL only). The semantic
cache drops a tenant's entries of a collection as soon as it sees that collection's new version.
Plain Python, thread-safe; the RAG app holds one of each per replica.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


def cache_key(tenant: str, version: str, model: str | None, request: dict[str, Any]) -> str:
    """A digest of everything an answer depends on; the request in canonical JSON (key order and
    spacing do not matter, every value does)."""
    body = json.dumps({"tenant": tenant, "version": version, "model": model or "", "request": request},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def collection_version(store, name: str) -> str:
    """What a cached answer of collection `name` is valid for (CollectionNotFound for an unknown
    name): one call to the store, which may live in another process."""
    return store.collection_version(name)


def tenant_of(team: str, key_id: str, per: str = "team") -> str:
    return f"team:{team}" if team and per == "team" else f"key:{key_id}"


@dataclass(frozen=True)
class CachedAnswer:
    """A cached response and what producing it cost: a hit saves that much (metrics)."""

    response: dict[str, Any]
    cost_usd: float = 0.0
    seconds: float = 0.0


class AnswerCache:
    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if self._clock() >= hit[0]:
                del self._entries[key]  # expired
                return None
            self._entries.move_to_end(key)
            return hit[1]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._entries[key] = (self._clock() + self.ttl_s, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def semantic_variant(model: str | None, embedder: str, request: dict[str, Any]) -> str:
    """Everything but the question that an answer depends on: the chat model, the embedder of the
    query vectors and every other request field (top_k, filters, mode, ...), as one digest."""
    rest = {k: v for k, v in request.items() if k != "query"}
    return cache_key("", embedder, model, rest)


@dataclass
class _Entry:
    partition: tuple[str, str]  # (tenant, collection name)
    version: str                # the collection's version when the answer was made
    variant: str                # semantic_variant(...)
    vector: np.ndarray          # the question's unit-length embedding
    expires: float
    value: Any


class SemanticCache:
    """Answers keyed by their question's embedding. `get` returns the most similar live entry of
    the same tenant, collection, version and variant whose cosine is at least `threshold`, with
    that similarity; entries of an older version of the collection are dropped when it is seen.
    Lookups scan only their own partition's entries (at most `max_entries`, a few hundred
    microseconds of numpy at the default 1024)."""

    def __init__(self, threshold: float, ttl_s: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < threshold <= 1:
            raise ValueError(f"similarity threshold must lie in (0, 1], not {threshold}")
        self.threshold, self.ttl_s, self.max_entries, self._clock = threshold, ttl_s, max_entries, clock
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._partitions: dict[tuple[str, str], set[int]] = {}
        self._next = 0
        self._lock = threading.Lock()

    @staticmethod
    def _unit(vector) -> np.ndarray:
        v = np.asarray(vector, dtype=np.float32).ravel()
        n = float(np.linalg.norm(v))
        if not np.isfinite(n) or n == 0:
            raise ValueError("a semantic cache vector must be finite and non-zero")
        return v / n

    def _drop(self, eid: int) -> None:
        e = self._entries.pop(eid)
        ids = self._partitions.get(e.partition)
        if ids is not None:
            ids.discard(eid)
            if not ids:
                del self._partitions[e.partition]

    def get(self, tenant: str, collection: str, version: str, variant: str, vector) -> tuple[Any, float] | None:
        q = self._unit(vector)
        now = self._clock()
        with self._lock:
            ids = self._partitions.get((tenant, collection), set())
            live = []
            for eid in list(ids):
                e = self._entries[eid]
                if e.expires <= now or e.version != version:
                    self._drop(eid)  # expired, or made from an older version of the collection
                elif e.variant == variant:
                    live.append((eid, e))
            if not live:
                return None
            sims = np.stack([e.vector for _, e in live]) @ q
            best = int(np.argmax(sims))
            if float(sims[best]) < self.threshold:
                return None
            eid, e = live[best]
            self._entries.move_to_end(eid)
            return e.value, float(sims[best])

    def put(self, tenant: str, collection: str, version: str, variant: str, vector, value: Any) -> None:
        q = self._unit(vector)
        with self._lock:
            eid, self._next = self._next, self._next + 1
            partition = (tenant, collection)
            self._entries[eid] = _Entry(partition, version, variant, q, self._clock() + self.ttl_s, value)
            self._partitions.setdefault(partition, set()).add(eid)
            while len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))

    def __len__(self) -> int:
        return len(self._entries)
