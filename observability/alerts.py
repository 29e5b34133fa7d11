"""Alert routing, pure: alerts in (Alertmanager webhooks, ORFEAS's own anomaly alerts), the
notifications to send out (Slack incoming webhooks, PagerDuty Events v2, email), and the state
between (what fires, what was sent, acknowledgements, silences, escalations).

    state = AlertState()
    state, out = receive(state, from_alertmanager(body), now, policy)   # notifications to deliver
    state = acknowledge(state, fingerprint, "alice", now)
    state, out = tick(state, now, policy)                                # escalations due now

No I/O here: `serve/alerts_app.py` delivers what these functions return. Routing: the alert's
severity picks the channels (`AlertsSettings.routes`), its `team` label picks the destination on
each channel (a team's own Slack webhook or PagerDuty routing key, else the default). Alerts of one
call to `receive` that share channel, team and alert name go out as one notification (grouping);
an alert already firing and notified is not sent again until `repeat_after_s` (dedup); a resolved
alert sends a resolve (PagerDuty: same dedup key). A firing alert nobody acknowledged within
`escalate_after_s` is sent again on the escalation channels, once.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from typing import Any, Literal

from config.settings import AlertsSettings

Status = Literal["firing", "resolved"]
SEVERITIES = ("critical", "warning", "info")


class AlertError(ValueError):
    """An alert payload or request that cannot be used; the message says what is wrong."""


@dataclass(frozen=True)
class Alert:
    fingerprint: str
    name: str
    severity: str
    team: str
    status: Status
    summary: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    starts_at: str = ""
    source: str = "alertmanager"


def fingerprint(labels: dict[str, str]) -> str:
    """A stable id of an alert from its labels (what Alertmanager's fingerprint is for)."""
    return hashlib.sha256(json.dumps(sorted(labels.items())).encode()).hexdigest()[:16]


def _alert(labels: dict[str, Any], annotations: dict[str, Any], status: str, starts_at: str, source: str,
           fp: str | None, default_team: str) -> Alert:
    labels = {str(k): str(v) for k, v in labels.items()}
    annotations = {str(k): str(v) for k, v in (annotations or {}).items()}
    name = labels.get("alertname")
    if not name:
        raise AlertError("an alert has no 'alertname' label")
    if status not in ("firing", "resolved"):
        raise AlertError(f"alert {name!r}: status must be 'firing' or 'resolved', not {status!r}")
    severity = labels.get("severity", "warning")
    if severity not in SEVERITIES:
        severity = "warning"
    return Alert(fp or fingerprint(labels), name, severity, labels.get("team") or default_team, status,  # type: ignore[arg-type]
                 annotations.get("summary") or annotations.get("description") or name, labels, annotations,
                 starts_at, source)


def from_alertmanager(body: Any, default_team: str = "platform") -> list[Alert]:
    """The alerts of an Alertmanager webhook (version 4 payload)."""
    if not isinstance(body, dict) or not isinstance(body.get("alerts"), list):
        raise AlertError("not an Alertmanager webhook: a JSON object with an 'alerts' list is expected")
    out = []
    for i, a in enumerate(body["alerts"]):
        if not isinstance(a, dict) or not isinstance(a.get("labels"), dict):
            raise AlertError(f"alerts[{i}] has no 'labels' object")
        out.append(_alert(a["labels"], a.get("annotations") or {}, a.get("status") or body.get("status", "firing"),
                          str(a.get("startsAt", "")), "alertmanager", a.get("fingerprint") or None, default_team))
    return out


def from_anomaly(series: str, detail: str, severity: str = "warning", team: str = "platform",
                 status: Status = "firing", labels: dict[str, str] | None = None) -> Alert:
    """An alert from ORFEAS's anomaly detection (observability.anomaly) on one series."""
    return _alert({"alertname": "OrfeasAnomaly", "series": series, "severity": severity, "team": team,
                   **(labels or {})}, {"summary": detail}, status, "", "anomaly", None, team)


@dataclass(frozen=True)
class Silence:
    id: str
    matchers: dict[str, str]  # label -> value; every one must match
    until: float
    by: str
    comment: str = ""

    def matches(self, alert: Alert, now: float) -> bool:
        labels = {**alert.labels, "alertname": alert.name, "severity": alert.severity, "team": alert.team}
        return now < self.until and all(labels.get(k) == v for k, v in self.matchers.items())


@dataclass(frozen=True)
class Tracked:
    alert: Alert
    first_seen: float
    last_sent: float | None = None
    acked_by: str | None = None
    acked_at: float | None = None
    escalated: bool = False


@dataclass(frozen=True)
class AlertState:
    alerts: dict[str, Tracked] = field(default_factory=dict)  # fingerprint -> the alert as last seen
    silences: tuple[Silence, ...] = ()


@dataclass(frozen=True)
class Notification:
    channel: Literal["slack", "pagerduty", "email"]
    team: str
    kind: Literal["trigger", "resolve", "escalate"]
    alerts: tuple[Alert, ...]

    @property
    def title(self) -> str:
        a = self.alerts[0]
        more = f" (+{len(self.alerts) - 1} more)" if len(self.alerts) > 1 else ""
        prefix = {"trigger": "FIRING", "resolve": "RESOLVED", "escalate": "ESCALATED, unacknowledged"}[self.kind]
        return f"[{prefix}] {a.severity} {a.name} ({self.team}): {a.summary}{more}"


def channels(policy: AlertsSettings, alert: Alert) -> list[str]:
    return list(policy.routes.get(alert.severity, []))


def _group(items: list[tuple[str, str, Alert]]) -> list[Notification]:
    """(channel, kind, alert) -> one notification per channel, team, kind and alert name."""
    groups: dict[tuple[str, str, str, str], list[Alert]] = {}
    for channel, kind, a in items:
        groups.setdefault((channel, a.team, kind, a.name), []).append(a)
    return [Notification(c, team, kind, tuple(alerts)) for (c, team, kind, _), alerts in groups.items()]  # type: ignore[arg-type]


def silenced(state: AlertState, alert: Alert, now: float) -> bool:
    return any(s.matches(alert, now) for s in state.silences)


def receive(state: AlertState, alerts: list[Alert], now: float, policy: AlertsSettings
            ) -> tuple[AlertState, list[Notification]]:
    tracked = dict(state.alerts)
    out: list[tuple[str, str, Alert]] = []
    for a in alerts:
        t = tracked.get(a.fingerprint)
        if a.status == "resolved":
            if t is not None and t.alert.status == "firing":
                if t.last_sent is not None:  # tell those who were told it fired
                    out += [(c, "resolve", a) for c in channels(policy, t.alert)]
                tracked[a.fingerprint] = replace(t, alert=a)
            continue
        if t is None or t.alert.status == "resolved":
            t = Tracked(a, now)  # a new firing (or one that fired again after resolving)
        else:
            t = replace(t, alert=a)
        due = t.last_sent is None or now - t.last_sent >= policy.repeat_after_s
        if due and t.acked_by is None and not silenced(state, a, now):
            out += [(c, "trigger", a) for c in channels(policy, a)]
            t = replace(t, last_sent=now)
        tracked[a.fingerprint] = t
    return replace(state, alerts=tracked), _group(out)


def tick(state: AlertState, now: float, policy: AlertsSettings) -> tuple[AlertState, list[Notification]]:
    """Escalations due now, and forgetting resolved alerts and silences long past."""
    tracked, out = {}, []
    for fp, t in state.alerts.items():
        a = t.alert
        if a.status == "resolved" and now - (t.last_sent or t.first_seen) > policy.forget_after_s:
            continue
        if (a.status == "firing" and t.acked_by is None and not t.escalated and t.last_sent is not None
                and now - t.first_seen >= policy.escalate_after_s and not silenced(state, a, now)
                and a.severity in policy.escalate_severities):
            out += [(c, "escalate", a) for c in policy.escalate_to]
            t = replace(t, escalated=True)
        tracked[fp] = t
    silences = tuple(s for s in state.silences if s.until > now)
    return AlertState(tracked, silences), _group(out)


def acknowledge(state: AlertState, fp: str, by: str, now: float) -> AlertState:
    t = state.alerts.get(fp)
    if t is None:
        raise KeyError(fp)
    return replace(state, alerts={**state.alerts, fp: replace(t, acked_by=by, acked_at=now)})


def add_silence(state: AlertState, matchers: dict[str, str], duration_s: float, by: str, now: float,
                comment: str = "") -> tuple[AlertState, Silence]:
    if not matchers:
        raise AlertError("a silence needs at least one matcher (label: value)")
    if duration_s <= 0:
        raise AlertError("a silence's duration_s must be positive")
    s = Silence(uuid.uuid4().hex[:12], dict(matchers), now + duration_s, by, comment)
    return replace(state, silences=(*state.silences, s)), s


def remove_silence(state: AlertState, silence_id: str) -> AlertState:
    kept = tuple(s for s in state.silences if s.id != silence_id)
    if len(kept) == len(state.silences):
        raise KeyError(silence_id)
    return replace(state, silences=kept)


# ------------------------------------------------------------------ what goes on the wire

SLACK_COLOURS = {"critical": "#d00000", "warning": "#f2c744", "info": "#439fe0"}


def slack_message(n: Notification) -> dict[str, Any]:
    """A Slack incoming-webhook body."""
    colour = "#2eb886" if n.kind == "resolve" else SLACK_COLOURS.get(n.alerts[0].severity, "#cccccc")
    return {"text": n.title, "attachments": [
        {"color": colour, "title": f"{a.name} ({a.severity})", "text": a.summary,
         "fields": [{"title": k, "value": v, "short": True} for k, v in sorted(a.labels.items())
                    if k not in ("alertname", "severity")]} for a in n.alerts]}


PD_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}


def pagerduty_events(n: Notification, routing_key: str, source: str = "orfeas") -> list[dict[str, Any]]:
    """PagerDuty Events API v2 bodies: one per alert, its fingerprint the dedup key (so a resolve
    closes the incident its trigger opened)."""
    out = []
    for a in n.alerts:
        event: dict[str, Any] = {"routing_key": routing_key, "dedup_key": a.fingerprint,
                                 "event_action": "resolve" if n.kind == "resolve" else "trigger"}
        if n.kind != "resolve":
            event["payload"] = {"summary": (("ESCALATED: " if n.kind == "escalate" else "") + a.summary)[:1024],
                                "source": a.labels.get("instance") or source, "severity": PD_SEVERITY[a.severity],
                                "component": a.labels.get("app") or a.labels.get("model") or None,
                                "group": a.team, "class": a.name, "custom_details": a.labels}
        out.append(event)
    return out


def email_message(n: Notification, sender: str, to: list[str]) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = n.title[:200], sender, ", ".join(to)
    lines = []
    for a in n.alerts:
        lines.append(f"{a.name} [{a.severity}, team {a.team}] {a.status}: {a.summary}")
        lines += [f"  {k}: {v}" for k, v in sorted(a.labels.items())]
    msg.set_content("\n".join(lines) + "\n")
    return msg


def view(t: Tracked, now: float, state: AlertState) -> dict[str, Any]:
    """One tracked alert as the API shows it."""
    a = t.alert
    return {"fingerprint": a.fingerprint, "name": a.name, "severity": a.severity, "team": a.team,
            "status": a.status, "summary": a.summary, "labels": a.labels, "source": a.source,
            "first_seen": t.first_seen, "last_sent": t.last_sent, "acknowledged_by": t.acked_by,
            "acknowledged_at": t.acked_at, "escalated": t.escalated, "silenced": silenced(state, a, now)}
