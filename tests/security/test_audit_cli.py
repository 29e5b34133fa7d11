"""`orfeas audit verify` and `orfeas audit export` on a log written in this process (no cluster:
an auditor runs them on the files, or a copy of them)."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from cluster.cli import app


def test_verify_and_export(tmp_path, monkeypatch):
    from config import Settings
    from security.audit import audit_dir, audit_event

    monkeypatch.delenv("ORFEAS_CONFIG", raising=False)
    config = tmp_path / "orfeas.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "audit": {"checkpoint_every": 2}}))
    settings = Settings(data_dir=tmp_path / "data", audit={"checkpoint_every": 2})
    for i in range(5):
        # wait: on the session cluster (when another module started it) the audit actor appends.
        audit_event(settings, "admin.key.create", {"n": i, "mail": "ops@example.com"}, actor="cli:test",
                    outcome="ok" if i != 3 else "denied", wait=True)
    run = CliRunner().invoke
    r = run(app, ["audit", "verify", "--config", str(config)])
    # Six: the first entry is the creation of the audit details' own data key.
    assert r.exit_code == 0 and "OK, 6 entries" in " ".join(r.stdout.split()), r.stdout

    r = run(app, ["audit", "export", "--config", str(config), "--action", "admin.*"])
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.exit_code == 0 and [e["details"]["n"] for e in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["details"]["mail"] == "<EMAIL_ADDRESS_1>"  # redacted before it was stored
    r = run(app, ["audit", "export", "--config", str(config), "--format", "syslog"])
    lines = r.stdout.splitlines()
    assert len(lines) == 6 and lines[4].startswith("<108>1 ") and 'outcome="denied"' in lines[4]
    assert run(app, ["audit", "export", "--config", str(config), "--format", "csv"]).exit_code == 2

    log = audit_dir(settings) / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    del lines[1]  # (this test's process no longer appends: the log is only read from here on)
    log.write_text("".join(lines))
    r = run(app, ["audit", "verify", "--config", str(config)])
    assert r.exit_code == 1 and "FAILED at position 2" in " ".join(r.stdout.split()), r.stdout
    r = run(app, ["audit", "verify", "--config", str(config), "--json"])
    assert json.loads(r.stdout)["first_bad"] == 2
