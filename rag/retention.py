"""Retention of documents: a collection keeps documents for `retention.collections[name]` days
(else `retention.collection_days`); a document whose date (the record's own, else its file's
modification time, set at ingest) is older is removed from every version of the collection.
A document without a date is kept (and counted, so a report can say so)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from rag.store import VectorStore
from rag.versions import parse_physical


def _when(date: str | None) -> float | None:
    if not date:
        return None
    try:
        d = datetime.fromisoformat(str(date).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()


def expire_documents(store: VectorStore, days_of: dict[str, float], default_days: float | None,
                     now: float) -> dict[str, Any]:
    """Remove expired documents from every physical collection whose logical collection has a
    period. Returns {"removed": {physical: documents}, "undated": {physical: documents}}."""
    removed: dict[str, int] = {}
    undated: dict[str, int] = {}
    for c in store.list_collections():
        logical = (parse_physical(c) or (c, 0))[0]
        days = days_of.get(logical, default_days)
        if days is None:
            continue
        cutoff = now - days * 86400
        dates: dict[str, float | None] = {}
        for p in store.scroll_payloads(c, ["doc_id", "date"]):
            dates.setdefault(p["doc_id"], _when(p.get("date")))
        old = sorted(d for d, t in dates.items() if t is not None and t < cutoff)
        if old:
            store.delete_docs(c, old)
            store.flush(c)
            removed[c] = len(old)
        n_undated = sum(1 for t in dates.values() if t is None)
        if n_undated:
            undated[c] = n_undated
    return {"removed": removed, "undated": undated}
