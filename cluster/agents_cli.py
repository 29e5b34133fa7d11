"""`orfeas workflows ...` and `orfeas agents ...`: talk to the coordinator actor directly (the
CLI is an operator's tool, like `orfeas keys`). `cluster/cli.py` calls `register(app)`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from cluster.console import ConfigOpt, JsonOpt, connected, console, fail, print_json, table
from security.auth import operator_principal

workflows_app = typer.Typer(help="Run, inspect, approve, cancel and resume durable workflows.", no_args_is_help=True)
agents_app = typer.Typer(help="The agent registry.", no_args_is_help=True)

CLI_OWNER = "cli"


def register(app: typer.Typer) -> None:
    app.add_typer(workflows_app, name="workflows")
    app.add_typer(agents_app, name="agents")


def _call(config: Path | None, method: str, *args, **kwargs) -> Any:
    """Call a coordinator method; its typed errors become CLI errors (2 for bad input)."""
    import ray

    from agents.coordinator import coordinator
    from models.errors import APIError

    coord = coordinator(connected(config))
    try:
        return ray.get(getattr(coord, method).remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, APIError):
            fail(cause.message, 2 if cause.status < 500 else 1)
        raise


def _parse_inputs(pairs: list[str] | None, inputs_json: str | None) -> dict:
    inputs: dict[str, Any] = {}
    if inputs_json:
        try:
            inputs = json.loads(inputs_json)
        except ValueError as e:
            fail(f"--inputs-json is not valid JSON: {e}", 2)
        if not isinstance(inputs, dict):
            fail("--inputs-json must be a JSON object", 2)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--input takes KEY=VALUE, not {pair!r}", 2)
        try:
            inputs[key] = json.loads(value)
        except ValueError:
            inputs[key] = value
    return inputs


def _definition(workflow: str) -> str:
    path = Path(workflow)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.exists():
            fail(f"{workflow} does not exist", 2)
        return path.read_text()
    return workflow  # a registered workflow's name


def _run_table(run: dict) -> Table:
    steps = table("step", "status", "attempts", "time s", "agent", "error")
    for sid, st in run["steps"].items():
        steps.add_row(sid, st["status"], str(st["attempts"]), f"{st['run_time_s']:.2f}", st.get("agent") or "",
                      (st.get("error") or "")[:60])
    return steps


@workflows_app.command("run")
def run_cmd(workflow: Annotated[str, typer.Argument(help="A YAML file or a registered workflow's name.")],
            input: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="KEY=VALUE (repeatable).")] = None,
            inputs_json: Annotated[Optional[str], typer.Option(help="Inputs as a JSON object.")] = None,
            wait: Annotated[bool, typer.Option(help="Follow events until the run ends.")] = False,
            config: ConfigOpt = None, as_json: JsonOpt = False):
    """Start a run."""
    inputs = _parse_inputs(input, inputs_json)
    run = _call(config, "start_run", _definition(workflow), inputs, CLI_OWNER,
                caller=operator_principal(connected(config)))  # its model calls are the CLI caller's
    if not wait:
        print_json(run) if as_json else console.print(f"started {run['id']} ({run['workflow']})")
        return
    _follow(config, run["id"])
    final = _call(config, "get_run", run["id"])
    print_json(final) if as_json else console.print(_run_table(final))
    if final["status"] != "succeeded":
        raise typer.Exit(1)


def _follow(config: Path | None, run_id: str) -> None:
    after = 0
    while True:
        batch = _call(config, "events_after", run_id, after, 5.0)
        for e in batch["events"]:
            after = e["seq"]
            detail = {k: v for k, v in e.items() if k not in ("seq", "event", "time")}
            console.print(f"{time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['event']} "
                          f"{json.dumps(detail, default=str)[:160]}", highlight=False)
        if batch["done"] and not batch["events"]:
            return


@workflows_app.command("list")
def list_cmd(config: ConfigOpt = None, as_json: JsonOpt = False):
    """Runs, newest first."""
    runs = _call(config, "list_runs")
    if as_json:
        return print_json(runs)
    rows = table("run", "workflow", "owner", "status", "created")
    for r in runs:
        rows.add_row(r["id"], r["workflow"], r["owner"], r["status"],
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])))
    console.print(rows)


@workflows_app.command("status")
def status_cmd(run_id: str, config: ConfigOpt = None, as_json: JsonOpt = False):
    """A run's status, steps and analytics."""
    run = _call(config, "get_run", run_id)
    if as_json:
        return print_json(run)
    console.print(f"{run['id']} ({run['workflow']}): [bold]{run['status']}[/]" +
                  (f" — {run['error']}" if run["error"] else ""))
    console.print(_run_table(run))
    a = run["analytics"]
    console.print(f"retries {a['retries']}, model calls {a['model_calls']}, ~{a['tokens']} tokens, cost {a['cost']}")


@workflows_app.command("events")
def events_cmd(run_id: str, follow: Annotated[bool, typer.Option("--follow", "-f")] = False, config: ConfigOpt = None):
    """A run's events (with --follow, until it ends)."""
    if follow:
        return _follow(config, run_id)
    for e in _call(config, "events_after", run_id, 0, 0.0)["events"]:
        console.print(json.dumps(e, default=str), highlight=False)


@workflows_app.command("cancel")
def cancel_cmd(run_id: str, config: ConfigOpt = None):
    """Cancel a run and its running steps."""
    run = _call(config, "cancel", run_id)
    console.print(f"{run_id}: {run['status']}")


@workflows_app.command("approve")
def approve_cmd(run_id: str, step: Annotated[Optional[str], typer.Option(help="The gate (default: the waiting one).")] = None,
                reject: Annotated[bool, typer.Option("--reject")] = False,
                comment: Annotated[str, typer.Option()] = "", config: ConfigOpt = None):
    """Approve (or --reject) a run's approval gate."""
    run = _call(config, "approve", run_id, step, CLI_OWNER, not reject, comment)
    console.print(f"{run_id}: {'rejected' if reject else 'approved'}; run is {run['status']}")


@workflows_app.command("resume")
def resume_cmd(run_id: str, config: ConfigOpt = None):
    """Continue a run from its last checkpoint (after a coordinator or cluster restart)."""
    run = _call(config, "resume", run_id)
    if run["resumed"]:
        console.print(f"{run_id}: resumed from its checkpoint")
    else:
        console.print(f"{run_id}: not resumed ({run['reason']})")


@workflows_app.command("register")
def register_cmd(path: Path, config: ConfigOpt = None):
    """Register a workflow definition (YAML) under its name."""
    if not path.exists():
        fail(f"{path} does not exist", 2)
    out = _call(config, "register_workflow", path.read_text())
    console.print(f"registered {out['name']} ({out['steps']} steps)")


@workflows_app.command("definitions")
def definitions_cmd(config: ConfigOpt = None, as_json: JsonOpt = False):
    """Registered workflow definitions."""
    defs = _call(config, "workflows")
    if as_json:
        return print_json(defs)
    for d in defs:
        console.print(f"{d['name']}: {d.get('error') or ', '.join(d['steps'])}")


@agents_app.command("list")
def agents_list(capability: Annotated[Optional[str], typer.Option(help="Only agents with this capability.")] = None,
                config: ConfigOpt = None, as_json: JsonOpt = False):
    """Registered agents: capabilities, tools, model, load."""
    agents = _call(config, "agents", capability)
    if as_json:
        return print_json(agents)
    rows = table("agent", "role", "capabilities", "tools", "model", "replicas", "load")
    for a in agents:
        rows.add_row(a["name"], a["role"], ",".join(a["capabilities"]), ",".join(a["tools"]), a["model"] or "-",
                     str(a["replicas"]), str(a["load"]))
    console.print(rows)
