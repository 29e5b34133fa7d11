"""The maintenance jobs' entry points as a RayCronJob runs them (`python -m jobs.retention`,
`python -m jobs.compliance`), here in-process on the session cluster: their work runs as a task
through jobs/state_node.py, they print one JSON line and exit 0, 1 (a failing check) or 2 (bad
input, refused before anything runs)."""

import json

import yaml

from jobs import compliance, retention


def config(tmp_path, **over) -> str:
    path = tmp_path / "orfeas.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "rag": {"enabled": False},
                                    "agents": {"enabled": False}, "pii": {"audit": "off"}, **over}))
    return str(path)


def test_retention_job_runs_its_pass_as_a_task_and_prints_what_it_removed(ray_cluster, tmp_path, capsys):
    assert retention.main(["--config", config(tmp_path, retention={"usage_events_days": 31})]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Each part with a period ran (an empty data directory: nothing to remove).
    assert {"usage_events", "workflow_runs", "logs"} <= out.keys(), out


def test_compliance_job_reports_a_failing_profile_and_refuses_a_bad_one(ray_cluster, tmp_path, capsys):
    cfg = config(tmp_path)
    assert compliance.main(["--config", cfg, "--profile", "nope"]) == 2
    assert "unknown compliance profile 'nope'" in capsys.readouterr().err
    # No TLS, no retention, no backups on this data directory: soc2 fails, and the report is written.
    assert compliance.main(["--config", cfg, "--profile", "soc2"]) == 1
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["result"] == "fail" and "encryption.in_transit.ingress" in out["failed"], out
    assert out["report"]["json"].endswith(".json") and out["report"]["pdf"].endswith(".pdf")
