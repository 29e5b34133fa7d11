"""`orfeas monitoring up|down|status`: the local Prometheus and Alertmanager (cluster.monitoring)."""

from __future__ import annotations

import time

import typer

from cluster import monitoring
from cluster.console import ConfigOpt, JsonOpt, connected, console, fail, print_json, settings_or_exit, table


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


def _view(snap: dict):
    from rich.console import Group

    nodes = table("node", "CPU", "memory", "object store", "GPUs")
    for n in snap["nodes"]:
        gpus = ", ".join(f"{g['index']}: {g['utilization']:.0f}% {g['memory_used_mb']:.0f}/{g['memory_total_mb']:.0f} MB"
                         for g in n["gpus"]) or "-"
        nodes.add_row(n["address"], f"{n['cpu_percent']:.0f}% of {n['cpus']:g}",
                      f"{n['memory_percent']:.0f}% of {n['memory_total'] / 2**30:.1f} GiB",
                      f"{n['object_store_percent']:.0f}% of {n['object_store_total'] / 2**30:.1f} GiB", gpus)
    deps = table("deployment", "replicas", "ongoing", "queued", "utilisation")
    for d in snap["deployments"]:
        util = "-" if d["utilization"] is None else f"{100 * d['utilization']:.0f}%"
        deps.add_row(f"{d['app']}/{d['name']}", f"{d['running']}/{d['replicas']}", f"{d['ongoing']:.0f}",
                     f"{d['queued']:.0f}", util)
    words = "\n".join(f"[red]•[/] {b}" for b in snap["bottlenecks"]) or "[green]no bottleneck[/]"
    return Group(nodes, deps, words)


def top(config: ConfigOpt = None, once: bool = typer.Option(False, "--once", help="Print one snapshot and exit."),
        interval: float = typer.Option(1.0, help="Seconds between refreshes.")) -> None:
    """A live view of nodes, deployments and bottlenecks (scaling.resources), refreshed every second."""
    import ray
    from rich.live import Live

    from scaling.resources import resource_monitor

    settings = connected(config)
    monitor = resource_monitor(settings)
    if once:
        console.print(_view(ray.get(monitor.snapshot.remote(), timeout=60)))
        return
    with Live(console=console, refresh_per_second=4) as live:
        try:
            while True:
                live.update(_view(ray.get(monitor.snapshot.remote(), timeout=60)))
                time.sleep(interval)
        except KeyboardInterrupt:
            pass


def register(app: typer.Typer) -> None:
    app.command("top")(top)
    monitoring_app = typer.Typer(help="A local Prometheus and Alertmanager for the cluster.", no_args_is_help=True)
    monitoring_app.command("up")(up)
    monitoring_app.command("down")(down)
    monitoring_app.command("status")(status)
    app.add_typer(monitoring_app, name="monitoring")
