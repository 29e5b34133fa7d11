"""Metrics catalog, Grafana dashboards and Prometheus rules (kuberay/monitoring/), checked with the
real `promtool` from Debian's prometheus package (`make` installs it where apt-get can)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from observability import metrics

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "kuberay" / "monitoring"
RULES = MONITORING / "rules" / "orfeas.rules.yml"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
RAY_DASHBOARDS = Path(__import__("ray").__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards"
ROOMS = ("cluster", "serve", "jobs", "edge", "agents", "analytics", "scaling", "rag", "security", "observability",
         "models", "config")

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool is not installed (Debian: prometheus)")


def ray_metric_names() -> set[str]:
    """What Ray exports: every series its own Grafana dashboards chart."""
    names = set()
    for f in RAY_DASHBOARDS.glob("*.py"):
        names |= set(re.findall(r"\bray_[a-z][a-z0-9_]*[a-z0-9]", f.read_text()))
    return names


def recorded_names() -> set[str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def series_names(expr: str) -> set[str]:
    """The metric names an expression reads (label matchers, strings and grouping labels removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"\b(?:ray_[a-z0-9_]+|orfeas:[a-z0-9_:]+)", expr))


def panel_exprs() -> list[tuple[str, str, str]]:
    out = []
    for f in DASHBOARDS:
        d = json.loads(f.read_text())
        for p in d["panels"]:
            for t in p["targets"]:
                out.append((f.name, p["title"], t["expr"]))
    return out


def test_six_dashboards_cover_gateway_rag_ingest_agents_cost_and_cluster():
    titles = {json.loads(f.read_text())["title"] for f in DASHBOARDS}
    assert titles == {"ORFEAS: LLM gateway", "ORFEAS: RAG", "ORFEAS: ingest", "ORFEAS: agents and workflows",
                      "ORFEAS: cost and usage", "ORFEAS: cluster resources"}
    for f in DASHBOARDS:
        d = json.loads(f.read_text())
        assert d["uid"] == f.stem and d["panels"], f.name
        assert len({p["id"] for p in d["panels"]}) == len(d["panels"]), f.name


def test_every_panel_names_only_metrics_orfeas_or_ray_exports():
    known = metrics.exported_names() | ray_metric_names() | recorded_names()
    assert "ray_node_cpu_utilization" in known and "ray_orfeas_http_requests_total" in known
    unknown = [(f, title, n) for f, title, e in panel_exprs() for n in series_names(e) if n not in known]
    assert not unknown, unknown
    assert all(series_names(e) for _, _, e in panel_exprs())  # every panel reads some series


def test_the_name_check_catches_a_misspelt_metric():
    known = metrics.exported_names() | ray_metric_names()
    assert series_names('sum by (model) (rate(ray_orfeas_gateway_tokens{model="a"}[5m]))') == {
        "ray_orfeas_gateway_tokens"}
    assert "ray_orfeas_gateway_tokens" not in known  # a counter is exported with _total


@needs_promtool
def test_every_panel_expression_parses(tmp_path):
    exprs = panel_exprs()
    rules = {"groups": [{"name": "panels", "rules": [{"record": f"panel:{i}", "expr": e}
                                                      for i, (_, _, e) in enumerate(exprs)]}]}
    f = tmp_path / "panels.yml"
    f.write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout
    f.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": "sum(rate(x[5m])"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(f)], capture_output=True).returncode != 0


@needs_promtool
def test_rules_check_and_pass_their_unit_tests():
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", "orfeas.rules.test.yml"], cwd=MONITORING / "tests",
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_read_only_known_metrics_and_cover_the_required_alerts():
    doc = yaml.safe_load(RULES.read_text())
    known = metrics.exported_names() | ray_metric_names() | recorded_names()
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert all(n in known for r in rules for n in series_names(r["expr"]))
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert {"OrfeasTTFTBurnRateFast", "OrfeasHighErrorRate", "OrfeasBudgetBurn", "OrfeasUnhealthyReplicas",
            "OrfeasIngestFailures", "OrfeasAuditVerifyFailure", "OrfeasQueueSaturation"} <= set(alerts)
    assert all(r["labels"]["severity"] in ("critical", "warning", "info") for r in alerts.values())


def _defined_metrics() -> set[str]:
    """Every metric name the code hands to ray.util.metrics' Counter, Gauge or Histogram."""
    found = set()
    for room in ROOMS:
        for f in (ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                        "Counter", "Gauge", "Histogram") and node.args and isinstance(node.args[0], ast.Constant) \
                        and str(node.args[0].value).startswith("orfeas_"):
                    found.add(node.args[0].value)
    return found


def test_the_catalog_lists_every_metric_the_code_defines():
    defined_elsewhere = {m.name for m in metrics.CATALOG if m.defined_in != "observability.metrics"}
    assert _defined_metrics() == defined_elsewhere
    assert len(metrics.BY_NAME) == len(metrics.CATALOG)


def test_docs_table_is_the_catalog():
    assert metrics.markdown_table() in (ROOT / "docs" / "observability.md").read_text()


def test_bounded_label_keeps_the_first_values_and_calls_the_rest_other():
    label = metrics.BoundedLabel(2)
    assert [label(v) for v in ("a", "b", "c", "a", None, "")] == ["a", "b", "other", "a", "-", "-"]


def test_metrics_defined_elsewhere_are_not_made_twice():
    with pytest.raises(ValueError, match="serve.http.metrics"):
        metrics.metric("orfeas_http_requests")


@needs_promtool
@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool is not installed (Debian: prometheus-alertmanager)")
@pytest.mark.parametrize("interval_s", [1, 2.5, 5, 15])
def test_generated_configs_pass_promtool_and_amtool_for_any_scrape_interval(tmp_path, interval_s):
    """Durations are whole units: `5/3` once became "1.66667s", which Alertmanager refused at
    start (the alert end-to-end test then timed out waiting for it to be ready)."""
    from cluster import monitoring
    from config import Settings

    settings = Settings(data_dir=tmp_path / "data", monitoring={"scrape_interval_s": interval_s})
    prom, am = tmp_path / "prometheus.yml", tmp_path / "alertmanager.yml"
    prom.write_text(yaml.safe_dump(monitoring.prometheus_config(settings, ["127.0.0.1:9999"], [])))
    am.write_text(yaml.safe_dump(monitoring.alertmanager_config(settings, "http://127.0.0.1:1/hook")))
    for cmd in ([promtool, "check", "config", str(prom)], [shutil.which("amtool"), "check-config", str(am)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stdout + r.stderr)
