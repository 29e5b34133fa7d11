"""`orfeas monitoring up|down|status`: the local Prometheus and Alertmanager (cluster.monitoring)."""

from __future__ import annotations

import typer

from cluster import monitoring
from cluster.console import ConfigOpt, JsonOpt, connected, console, fail, print_json, settings_or_exit


def up(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Start Prometheus and Alertmanager on 127.0.0.1, scraping the cluster's metrics with ORFEAS's rules."""
    settings = connected(config)
    try:
        out = monitoring.up(settings)
    except monitoring.MonitoringError as e:
        fail(str(e))
    if as_json:
        print_json(out)
        return
    console.print(f"Prometheus   {out['prometheus']}  (scraping {', '.join(out['targets']) or 'nothing yet'})")
    console.print(f"Alertmanager {out['alertmanager']}  (alerts to {out['receiver']})")


def down(config: ConfigOpt = None) -> None:
    """Stop the local Prometheus and Alertmanager."""
    stopped = monitoring.down(settings_or_exit(config))
    console.print("stopped " + ", ".join(stopped) if stopped else "nothing was running")


def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Whether the local Prometheus and Alertmanager run."""
    out = monitoring.status(settings_or_exit(config))
    if as_json:
        print_json(out)
        return
    for name, s in out.items():
        console.print(f"{name:13} {'running' if s['running'] else 'stopped'}")


def register(app: typer.Typer) -> None:
    monitoring_app = typer.Typer(help="A local Prometheus and Alertmanager for the cluster.", no_args_is_help=True)
    monitoring_app.command("up")(up)
    monitoring_app.command("down")(down)
    monitoring_app.command("status")(status)
    app.add_typer(monitoring_app, name="monitoring")
