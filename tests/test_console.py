"""The helpers every `orfeas` command shares (cluster/console.py): how a command ends on bad
configuration, on no cluster, on any error; JSON and tables. No Ray cluster is started here."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cluster.console import fail, print_json, table
from harness import free_port

ROOT = Path(__file__).resolve().parent.parent
ORFEAS = str(Path(sys.executable).with_name("orfeas"))
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("ORFEAS_", "RAY_ADDRESS"))}

# One command of each CLI module: cli, agents_cli, rag_cli.
COMMANDS = [["status"], ["keys", "list"], ["usage"], ["workflows", "list"], ["agents", "list"], ["collections"],
            ["ask", "anything"]]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=120)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_bad_config_names_the_field_and_reason_and_exits_2(command, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  port: -1\nrag:\n  top_k: many\n")
    r = run(ORFEAS, *command, "--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: invalid configuration in {bad}")
    assert "serve.port: Input should be greater than or equal to 1" in r.stderr
    assert "rag.top_k" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_missing_config_file_exits_2(tmp_path):
    r = run(ORFEAS, "status", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == f"error: configuration file {tmp_path / 'nope.yaml'} does not exist\n"


def test_make_demo_with_bad_config_exits_2_without_a_traceback(tmp_path):
    (tmp_path / "orfeas.yaml").write_text("auth:\n  enabled: maybe\n")
    r = subprocess.run([sys.executable, "-m", "cluster.demo"], capture_output=True, text=True, cwd=tmp_path,
                       env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "auth.enabled" in r.stderr and "Traceback" not in r.stderr


def test_no_cluster_running_exits_1_and_says_how_to_start_one(tmp_path):
    port = free_port()  # nothing listens there
    cfg = tmp_path / "orfeas.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nray:\n  gcs_port: {port}\n")
    for command in (["status"], ["workflows", "list"], ["collections"]):
        r = run(ORFEAS, *command, "--config", str(cfg), cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert r.stderr == f"error: no ORFEAS cluster is running at 127.0.0.1:{port}: start it with `orfeas up`\n"


def _app(message: str, code: int) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def go() -> None:
        fail(message, code)

    return app


def test_fail_prints_the_message_as_written_and_exits_with_its_code():
    message = "unknown overlay [dev]; [bold]not markup[/bold] " + "x" * 200  # longer than any terminal
    r = CliRunner().invoke(_app(message, 3), [])
    assert r.exit_code == 3
    assert r.stderr == f"error: {message}\n" and r.stdout == ""


def test_print_json_and_table(capsys):
    print_json({"when": dt.datetime(2025, 1, 2, 3, 4, 5), "n": 1})
    assert json.loads(capsys.readouterr().out) == {"when": "2025-01-02 03:04:05", "n": 1}
    t = table("a", "b")
    assert [c.header for c in t.columns] == ["a", "b"] and t.box is None and not t.pad_edge
