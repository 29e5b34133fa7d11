"""The exact response cache for RAG answers: one entry per (tenant, collection version, chat
model, request), kept `ttl_s` seconds, least recently used first out past `max_entries`.

The tenant is the caller's team, or its key when it has none: an entry is never served across
tenants. The collection version is the physical collection the alias resolves to and its point
count, so a rebuild (the alias flips), a rollback or an ingest that adds or removes chunks makes
every older entry unreachable; a re-ingest that rewrites chunks in place with the same count is
caught by the TTL only. Plain Python, thread-safe; the RAG app holds one per replica.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Any, Callable


def cache_key(tenant: str, version: str, model: str | None, request: dict[str, Any]) -> str:
    """A digest of everything an answer depends on; the request in canonical JSON (key order and
    spacing do not matter, every value does)."""
    body = json.dumps({"tenant": tenant, "version": version, "model": model or "", "request": request},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def collection_version(store, name: str) -> str:
    """What a cached answer of collection `name` is valid for: the physical collection its alias
    resolves to and that collection's point count (CollectionNotFound for an unknown name)."""
    resolved = store.resolve(name)
    return f"{resolved}:{store.count(resolved)}"


def tenant_of(team: str, key_id: str) -> str:
    return f"team:{team}" if team else f"key:{key_id}"


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
