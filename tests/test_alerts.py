"""Alert routing, pure (observability.alerts): severity and team routing, grouping, dedup, resolve,
silences, acknowledgement and escalation, and what goes on the wire."""

from __future__ import annotations

import pytest

from config import AlertsSettings
from observability import alerts as al

POLICY = AlertsSettings(escalate_after_s=600, repeat_after_s=3600)


def am(*alerts, status="firing"):
    return {"version": "4", "status": status, "alerts": [
        {"status": a.get("status", status), "labels": a["labels"], "annotations": a.get("annotations", {}),
         "startsAt": "2026-12-01T10:00:00Z", "fingerprint": a.get("fp", "")} for a in alerts]}


def alert(name="HighErrorRate", severity="critical", team="platform", status="firing", **labels):
    return {"labels": {"alertname": name, "severity": severity, "team": team, **labels},
            "annotations": {"summary": f"{name} summary"}, "status": status}


def test_severity_picks_channels_and_team_comes_from_labels():
    got = al.from_alertmanager(am(alert(), alert("Slow", "warning", "search"), alert("Note", "info", "data")))
    state, out = al.receive(al.AlertState(), got, 0, POLICY)
    assert sorted((n.channel, n.team, n.alerts[0].name) for n in out) == [
        ("email", "data", "Note"), ("pagerduty", "platform", "HighErrorRate"), ("slack", "platform", "HighErrorRate"),
        ("slack", "search", "Slow")]
    assert all(n.kind == "trigger" for n in out)


def test_alerts_of_one_name_and_team_are_grouped():
    got = al.from_alertmanager(am(alert(app="gateway"), alert(app="rag"), alert(team="other")))
    _, out = al.receive(al.AlertState(), got, 0, POLICY)
    slack = sorted((n for n in out if n.channel == "slack"), key=lambda n: n.team)
    assert [(n.team, len(n.alerts)) for n in slack] == [("other", 1), ("platform", 2)]
    assert "(+1 more)" in slack[1].title


def test_a_repeat_is_deduplicated_until_repeat_after_s():
    got = al.from_alertmanager(am(alert()))
    state, out = al.receive(al.AlertState(), got, 0, POLICY)
    assert len(out) == 2
    state, out = al.receive(state, got, 60, POLICY)
    assert out == []
    state, out = al.receive(state, got, 3600, POLICY)
    assert len(out) == 2


def test_resolve_tells_those_told_and_pagerduty_resolves_by_dedup_key():
    fired = al.from_alertmanager(am(alert()))
    state, out = al.receive(al.AlertState(), fired, 0, POLICY)
    trigger = next(n for n in out if n.channel == "pagerduty")
    state, out = al.receive(state, al.from_alertmanager(am(alert(status="resolved"), status="resolved")), 30, POLICY)
    resolve = next(n for n in out if n.channel == "pagerduty")
    assert resolve.kind == "resolve" and {n.channel for n in out} == {"slack", "pagerduty"}
    [t] = al.pagerduty_events(trigger, "rk")
    [r] = al.pagerduty_events(resolve, "rk")
    assert t["event_action"] == "trigger" and r["event_action"] == "resolve" and t["dedup_key"] == r["dedup_key"]
    assert t["payload"]["severity"] == "critical" and t["routing_key"] == "rk" and "payload" not in r
    # a resolve of something never seen sends nothing
    _, out = al.receive(al.AlertState(), al.from_alertmanager(am(alert("X", status="resolved"))), 0, POLICY)
    assert out == []


def test_silences_hold_matching_alerts_until_they_end():
    state, s = al.add_silence(al.AlertState(), {"alertname": "HighErrorRate"}, 100, "admin", 0)
    state, out = al.receive(state, al.from_alertmanager(am(alert(), alert("Other"))), 10, POLICY)
    assert {n.alerts[0].name for n in out} == {"Other"}
    state, out = al.receive(state, al.from_alertmanager(am(alert())), 200, POLICY)  # the silence ended
    assert {n.alerts[0].name for n in out} == {"HighErrorRate"}
    with pytest.raises(al.AlertError, match="matcher"):
        al.add_silence(state, {}, 10, "admin", 0)
    assert al.remove_silence(state, s.id).silences == ()
    with pytest.raises(KeyError):
        al.remove_silence(state, "nope")


def test_unacknowledged_alerts_escalate_once_and_acknowledged_ones_do_not():
    got = al.from_alertmanager(am(alert(), alert("Disk", "warning")))
    state, _ = al.receive(al.AlertState(), got, 0, POLICY)
    state, out = al.tick(state, 599, POLICY)
    assert out == []
    fp_disk = next(a.fingerprint for a in got if a.name == "Disk")
    state = al.acknowledge(state, fp_disk, "alice", 300)
    state, out = al.tick(state, 601, POLICY)
    assert [(n.channel, n.kind, n.alerts[0].name) for n in out] == [("pagerduty", "escalate", "HighErrorRate")]
    assert al.pagerduty_events(out[0], "k")[0]["payload"]["summary"].startswith("ESCALATED")
    state, out = al.tick(state, 1200, POLICY)
    assert out == []  # once
    with pytest.raises(KeyError):
        al.acknowledge(state, "nope", "alice", 0)
    # an acknowledged alert is not repeated either
    state, out = al.receive(state, [a for a in got if a.name == "Disk"], 4000, POLICY)
    assert out == []


def test_bad_webhooks_are_refused_with_what_is_wrong():
    for body, message in [([], "alerts' list"), ({"alerts": [{"labels": {}}]}, "alertname"),
                          ({"alerts": [{"nolabels": 1}]}, r"alerts\[0\]"),
                          ({"alerts": [{"labels": {"alertname": "x"}, "status": "odd"}]}, "status")]:
        with pytest.raises(al.AlertError, match=message):
            al.from_alertmanager(body)


def test_wire_formats():
    got = al.from_alertmanager(am(alert(app="gateway")))
    _, out = al.receive(al.AlertState(), got, 0, POLICY)
    slack = next(n for n in out if n.channel == "slack")
    body = al.slack_message(slack)
    assert body["text"].startswith("[FIRING] critical HighErrorRate (platform)")
    assert {"title": "app", "value": "gateway", "short": True} in body["attachments"][0]["fields"]
    msg = al.email_message(slack, "from@x", ["a@x", "b@x"])
    assert msg["To"] == "a@x, b@x" and "HighErrorRate" in msg["Subject"] and "app: gateway" in msg.get_content()
    anomaly = al.from_anomaly("ttft_p95{model=m}", "TTFT 3.1s, 6 sigma over its baseline", "critical", "search")
    assert anomaly.name == "OrfeasAnomaly" and anomaly.team == "search" and anomaly.source == "anomaly"
