"""The compliance controls over the real rendered manifests (security/compliance.py): what the
dev overlay does (TLS at the Ingress, Ray's intra-cluster TLS on every Ray pod, the retention
and compliance RayCronJobs, no wildcard Role) passes, what it does not (a backup Schedule for its
volumes) fails with evidence naming the objects; and a broken copy turns a passing control into a
failing one."""

from __future__ import annotations

from k8s_fixtures import fresh, rendered  # noqa: F401  (fixtures)

from cluster import k8s_render
from config import Settings
from security.compliance import evaluate, gather_facts


def controls(settings, objs):
    report = evaluate(settings, "soc2", objs, gather_facts(settings))
    return {c["id"]: c for c in report["controls"]}


def texts(c, ok):
    return [e["text"] for e in c["evidence"] if e["ok"] is ok]


def test_the_dev_overlay_against_the_controls(rendered, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    c = controls(settings, rendered["dev"])
    assert any(t.startswith("manifests: Ingress/orfeas-api terminates TLS for") for t in texts(c["encryption.in_transit.ingress"], True))
    assert c["encryption.in_transit.ray"]["status"] == "pass", c["encryption.in_transit.ray"]
    assert any("retention scheduled by RayCronJob/orfeas-retention" in t for t in texts(c["retention.set"], True))
    assert "manifests: every RayService pod reads ORFEAS_ENCRYPTION_KEY from a Secret" in texts(c["encryption.at_rest"], True)
    backups = texts(c["backups.durable_state"], False)
    assert any(t.startswith("manifests: 0 of") and "orfeas-data" in t for t in backups)
    assert any("grants no wildcard" in t for t in texts(c["access.least_privilege"], True))

    cron = k8s_render.find_object(rendered["dev"], "RayCronJob", "orfeas-compliance")
    assert cron["spec"]["jobTemplate"]["entrypoint"].startswith("python -m jobs.compliance ") and not cron["spec"]["suspend"]


def test_broken_manifests_fail_the_controls_they_break(fresh, tmp_path):
    objs = fresh("dev")
    for o in objs:
        if o["kind"] == "Ingress":
            o["spec"].pop("tls", None)
        if o["kind"] == "Role":
            o["rules"][0]["verbs"] = ["*"]
        if o["kind"] == "RayCronJob" and o["metadata"]["name"] == "orfeas-retention":
            o["spec"]["suspend"] = True
        if o["kind"] == "RayCronJob" and o["metadata"]["name"] == "orfeas-compliance":
            head = o["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            head["env"] = [e for e in head["env"] if e["name"] != "RAY_USE_TLS"]
    c = controls(Settings(data_dir=tmp_path / "data"), objs)
    assert any("terminates TLS for -" in t for t in texts(c["encryption.in_transit.ingress"], False))
    assert any("use a wildcard verb" in t for t in texts(c["access.least_privilege"], False))
    assert "manifests: no active RayCronJob runs jobs.retention" in texts(c["retention.set"], False)
    assert any("not in RayCronJob/orfeas-compliance head" in t for t in texts(c["encryption.in_transit.ray"], False))
