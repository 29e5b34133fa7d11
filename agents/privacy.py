"""A data subject's erasure across every store that holds them (GDPR art. 17): their documents
and chunks with their data key crypto-shredded and their conversation threads (rag/erasure.py),
their usage-ledger details
(analytics/ledger.py), their workflow runs with checkpoints and events (the coordinator), and
the user and name their API keys were given (the keys are revoked; security/keys.py).
This is the lowest room that sees all three, so the CLI (`orfeas privacy erase`) and the admin
API (`POST /v1/admin/privacy/erase`) both call it. One audit entry records the whole erasure.

The subject is an id: chunks tagged `<encryption.subject_tag_prefix><id>`, and the user id of
keys and principals (`user`): the ledger records and workflow runs of their keys or made for them.
"""

from __future__ import annotations

from typing import Any

from config import Settings


def subject_keys(settings: Settings, subject: str) -> list[str]:
    """Ids of the API keys that belong to the subject (their `user`)."""
    import ray

    from security.keys import keystore

    return [r["id"] for r in ray.get(keystore(settings.resolved_data_dir()).list.remote()) if r.get("user") == subject]


def _delete_runs(settings: Settings, keys: list[str], subject: str) -> list[str]:
    import ray

    from agents.coordinator import checkpoint_root, coordinator

    if settings.agents.enabled:  # the coordinator stops the runs it drives and forgets them
        return ray.get(coordinator(settings).delete_runs.remote(keys, subject))
    from agents.checkpoints import CheckpointStore
    from security.encryption import field_cipher

    store = CheckpointStore(checkpoint_root(settings), field_cipher(settings))
    gone = []
    for run_id in store.run_ids():
        run = store.load(run_id)
        if run is not None and (run.owner in keys or (run.caller is not None and run.caller.user == subject)):
            store.delete(run_id)
            gone.append(run_id)
    return gone


def erase_subject(settings: Settings, subject: str, *, actor: str = "", request_id: str = "",
                  source: str = "") -> dict[str, Any]:
    """Erase the subject everywhere; ValueError for an id that cannot name a subject. Audited
    (`privacy.erase`, outcome error with the reason when a part failed: the parts done stay done)."""
    import ray

    from analytics.ledger import ledger
    from rag.erasure import erase_subject as erase_documents
    from security.audit import audit_event
    from security.encryption import subject_scope
    from security.keyring import check_scope
    from security.keys import keystore

    scope = check_scope(subject_scope(subject))
    out: dict[str, Any] = {"subject": subject}
    where = {"actor": actor, "target": scope, "request_id": request_id, "source": source}
    try:
        out["keys"] = subject_keys(settings, subject)
        out.update(erase_documents(settings, subject, actor=actor, audit=False, key_ids=out["keys"]))
        out["ledger"] = ray.get(ledger(settings.resolved_data_dir(), settings).erase_subject.remote(subject,
                                                                                                     out["keys"]))
        out["workflow_runs"] = _delete_runs(settings, out["keys"], subject)
        out["keys_scrubbed"] = ray.get(keystore(settings.resolved_data_dir()).scrub_subject.remote(subject))
    except Exception as e:
        audit_event(settings, "privacy.erase", {**out, "reason": str(getattr(e, "cause", e))[:300]},
                    outcome="error", wait=True, **where)
        raise
    audit_event(settings, "privacy.erase", out, wait=True, **where)
    return out
