"""The compliance check and the scheduled audit across the platform: the controls
(security/compliance.py) over the settings, the data directory and the rendered manifests, with
the collections' PII inventory (rag/inventory.py) for the privacy impact assessment. Like erasure
and retention this is the lowest room that sees every store; `orfeas compliance check|schedule`
and `python -m jobs.compliance` (the RayCronJob orfeas-compliance) call it.

A scheduled audit that fails (a required control fails, `audit verify` among them) is logged as an
error and audited (`compliance.audit_failed`), and raised as an alert through the alert receiver
(serve/alerts_app.py, routed to Slack/PagerDuty/email by observability/alerts.py) when alerts are
on: an Alertmanager-format webhook, so the receiver's grouping, dedup and escalation apply.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from config import Settings

log = logging.getLogger(__name__)
ALERT_NAME = "OrfeasComplianceCheckFailed"


def inventory(settings: Settings) -> list[dict[str, Any]]:
    """The collections' PII inventory, read through the configured (decrypting) store."""
    from rag.inventory import collection_inventory
    from rag.store import open_store
    from security.pii import detector

    return collection_inventory(open_store(settings), detector(settings), settings.compliance.pii_sample,
                                settings.encryption.subject_tag_prefix)


def run_check(settings: Settings, profile: str, manifests: list[dict[str, Any]] | None = None, *,
              manifests_source: str = "", scan: bool = True, actor: str = "", now: float | None = None
              ) -> dict[str, Any]:
    """The report (security.compliance.evaluate) with the inventory when `scan` and the store can
    be reached (else the PIA says why not). Audited (`compliance.check`)."""
    from security.audit import audit_event
    from security.compliance import check_profile, evaluate, gather_facts

    check_profile(profile)
    facts = gather_facts(settings)
    inv, why_not = None, "not asked for (--no-scan)"
    if scan:
        try:
            inv = inventory(settings)
        except Exception as e:  # no cluster, no store: the report says so and goes on
            why_not = f"{type(e).__name__}: {str(getattr(e, 'cause', e))[:200]}"
    report = evaluate(settings, profile, manifests, facts, inv, manifests_source=manifests_source, now=now)
    if inv is None:
        report["privacy_impact"]["risks"].append(f"collections not scanned: {why_not}")
    failed = [c["id"] for c in report["controls"] if c["required"] and c["status"] == "fail"]
    audit_event(settings, "compliance.check", {"profile": profile, "result": report["result"], "failed": failed},
                actor=actor, outcome="ok")
    return report


def alert_url(settings: Settings) -> str | None:
    if settings.compliance.alert_url:
        return settings.compliance.alert_url
    if not settings.alerts.enabled:
        return None
    host = "127.0.0.1" if settings.serve.host in ("0.0.0.0", "::", "") else settings.serve.host
    return f"http://{host}:{settings.serve.port}/v1/alerts/alertmanager"


def raise_alert(settings: Settings, profile: str, failed: list[str], tampered: bool, summary: str) -> dict[str, Any]:
    """Post the failure to the alert receiver; {sent, url[, error]} (never raises: the caller
    logs and audits the failure either way)."""
    import httpx

    url = alert_url(settings)
    if url is None:
        return {"sent": False, "url": None, "error": "alerts are off (alerts.enabled, compliance.alert_url)"}
    headers = {}
    env = settings.alerts.webhook_token_env
    if env and os.environ.get(env):
        headers["Authorization"] = f"Bearer {os.environ[env]}"
    labels = {"alertname": ALERT_NAME, "severity": "critical" if tampered else "warning", "team": "security",
              "profile": profile}
    body = {"version": "4", "status": "firing", "receiver": "orfeas-compliance", "groupLabels": {},
            "commonLabels": labels, "alerts": [{
                "status": "firing", "labels": labels,
                "annotations": {"summary": summary, "description": "failed controls: " + ", ".join(failed)},
                "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]}
    try:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        r.raise_for_status()
        return {"sent": True, "url": url, "notifications": r.json().get("notifications")}
    except (httpx.HTTPError, ValueError) as e:
        return {"sent": False, "url": url, "error": f"{type(e).__name__}: {e}"[:300]}


def scheduled_audit(settings: Settings, profile: str | None = None, manifests: list[dict[str, Any]] | None = None,
                    *, manifests_source: str = "", scan: bool = True, actor: str = "job:compliance",
                    out_dir: str | None = None) -> dict[str, Any]:
    """One scheduled round: the check (with `audit verify`), the report written (JSON and PDF), and
    on failure a log line, an audit entry and an alert. Returns the round's summary."""
    from security.audit import audit_event
    from security.compliance_report import report_dir, write_report

    profile = profile or settings.compliance.profile
    report = run_check(settings, profile, manifests, manifests_source=manifests_source, scan=scan, actor=actor)
    paths = write_report(report, out_dir or report_dir(settings))
    failed = [c["id"] for c in report["controls"] if c["required"] and c["status"] == "fail"]
    verify = next(c for c in report["controls"] if c["id"] == "audit.verify")
    out: dict[str, Any] = {"profile": profile, "result": report["result"], "failed": failed,
                           "audit_verify": {"status": verify["status"], "evidence": verify["evidence"][0]["text"]},
                           "report": paths}
    if report["result"] == "fail":
        tampered = verify["status"] == "fail" and "fails at position" in out["audit_verify"]["evidence"]
        summary = (f"compliance check ({profile}) failed: {', '.join(failed)}"
                   + (f"; {out['audit_verify']['evidence']}" if verify["status"] == "fail" else ""))
        out["alert"] = raise_alert(settings, profile, failed, tampered, summary)
        log.error("%s (report %s; alert %s)", summary, paths["json"],
                  "sent" if out["alert"]["sent"] else f"not sent: {out['alert'].get('error')}")
        audit_event(settings, "compliance.audit_failed", {**{k: out[k] for k in ("profile", "failed", "report")},
                    "audit_verify": out["audit_verify"]["evidence"], "alert": out["alert"]},
                    actor=actor, outcome="error", wait=True)
    return out
