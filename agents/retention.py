"""Retention across the platform (settings `retention`): expired documents of each collection
(rag/retention.py), conversation-thread messages (rag/threads.py), usage-ledger records
(analytics/ledger.py), finished workflow runs (the
coordinator, or the checkpoint store when the agents app is off) and log files
(observability/log_retention.py). `python -m jobs.retention` runs it; one audit entry records
what was removed. Like erasure this is the lowest room that sees every store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from config import Settings


def _expire_runs(settings: Settings, before: float) -> list[str]:
    import ray

    from agents.coordinator import checkpoint_root, coordinator

    if settings.agents.enabled:
        return ray.get(coordinator(settings).delete_runs.remote(None, "", before))
    from agents import scheduling as sch
    from agents.checkpoints import CheckpointStore
    from security.encryption import field_cipher

    store = CheckpointStore(checkpoint_root(settings), field_cipher(settings))
    gone = []
    for run_id in store.run_ids():
        run = store.load(run_id)
        if run is not None and run.status in sch.TERMINAL_RUN and (run.finished_at or run.created_at) < before:
            store.delete(run_id)
            gone.append(run_id)
    return gone


def log_dirs(settings: Settings) -> list[Path]:
    r = settings.retention
    return [Path(d) for d in r.log_dirs] if r.log_dirs else [settings.resolved_data_dir() / "logs"]


def enforce_retention(settings: Settings, *, now: float | None = None, actor: str = "job:retention") -> dict[str, Any]:
    """Remove what is older than its retention period; a period left null is skipped. Audited
    (`retention.enforce`; outcome error with the reason when a part failed, the parts done stay done)."""
    import ray

    from analytics.ledger import ledger
    from observability.log_retention import prune_logs
    from rag.retention import expire_documents
    from rag.store import open_store
    from rag.threads import call_sync
    from security.audit import audit_event

    r = settings.retention
    now = time.time() if now is None else now
    out: dict[str, Any] = {"now": now}
    try:
        if r.collections or r.collection_days is not None:
            out["collections"] = expire_documents(open_store(settings), r.collections, r.collection_days, now)
        if r.threads_days is not None:
            out["threads"] = call_sync(settings, "expire", now - r.threads_days * 86400)
        if r.usage_events_days is not None:
            out["usage_events"] = ray.get(ledger(settings.resolved_data_dir(), settings).expire.remote(
                now - r.usage_events_days * 86400))
        if r.workflow_runs_days is not None:
            out["workflow_runs"] = _expire_runs(settings, now - r.workflow_runs_days * 86400)
        if r.logs_days is not None:
            out["logs"] = prune_logs(log_dirs(settings), now - r.logs_days * 86400)
    except Exception as e:
        audit_event(settings, "retention.enforce", {**out, "reason": str(getattr(e, "cause", e))[:300]},
                    actor=actor, outcome="error", wait=True)
        raise
    audit_event(settings, "retention.enforce", out, actor=actor, wait=True)
    return out
