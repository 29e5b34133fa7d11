"""`orfeas k8s ...`: render and validate the KubeRay manifests, submit RayJobs.

The lead's CLI mounts this as `app.add_typer(k8s_app, name="k8s")`; it also runs on its own:
`python -m cluster.k8s_cli render --overlay dev`.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from cluster import k8s_render
from cluster.console import fail

k8s_app = typer.Typer(
    name="k8s",
    help="KubeRay manifests: render them from orfeas.yaml, validate them offline, submit RayJobs.",
    no_args_is_help=True,
    add_completion=False,
)

JOBS = ("ingest", "reindex")


def _overlays(name: str) -> list[str]:
    if name == "all":
        return list(k8s_render.OVERLAYS)
    if name not in (*k8s_render.OVERLAYS, "jobs"):
        fail(f"unknown overlay {name!r}; choose one of {', '.join(k8s_render.OVERLAYS)}, jobs or all")
    return [name]


@k8s_app.command()
def render(
    overlay: str = typer.Option("dev", "--overlay", "-o", help="dev, gpu, aws, gcp, azure, jobs, or all"),
    out: Optional[Path] = typer.Option(None, "--out", help="Write <overlay>.yaml files here instead of printing."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The orfeas.yaml to render from."),
    check: bool = typer.Option(False, "--check", help="Only check that the generated serveConfigV2 files are current."),
) -> None:
    """Regenerate each RayService's serveConfigV2 from orfeas.yaml, then build the overlay."""
    from config import ConfigError

    try:
        if check:
            stale = k8s_render.stale_generated(config)
            if stale:
                fail("stale generated files (run `orfeas k8s render`): " + ", ".join(str(p) for p in stale))
            typer.echo("generated serveConfigV2 files are current", err=True)
            return
        for path in k8s_render.write_generated(config):
            typer.echo(f"wrote {path.relative_to(k8s_render.REPO_ROOT)}", err=True)
        names = _overlays(overlay)
        if out is None and len(names) > 1:
            fail("--overlay all needs --out DIR")
        for name in names:
            text = k8s_render.render_yaml(name)
            if out is None:
                sys.stdout.write(text)
            else:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{name}.yaml").write_text(text)
                typer.echo(f"wrote {out / f'{name}.yaml'}", err=True)
    except (ConfigError, k8s_render.RenderError) as e:
        fail(str(e))


@k8s_app.command()
def validate(
    overlay: str = typer.Option("all", "--overlay", "-o", help="dev, gpu, aws, gcp, azure, jobs, or all"),
) -> None:
    """Validate rendered overlays offline: Kubernetes and KubeRay schemas, then policy."""
    from cluster import k8s_validate

    names = _overlays(overlay) + (["jobs"] if overlay == "all" else [])
    failed = 0
    for name in names:
        try:
            problems = k8s_validate.validate(k8s_render.render(name))
        except (k8s_render.RenderError, FileNotFoundError) as e:
            problems = [str(e)]
        for p in problems:
            typer.echo(f"{name}: {p}")
        failed += bool(problems)
        typer.echo(f"{name}: {'FAILED' if problems else 'ok'} ({len(problems)} problems)", err=True)
    problems = k8s_validate.text_problems()
    for p in problems:
        typer.echo(p)
    if failed or problems:
        raise typer.Exit(1)


def job_object(job: str, source: str | None = None, name: str | None = None) -> dict[str, Any]:
    """The RayJob `orfeas k8s submit-job JOB` creates: kuberay/jobs/rayjob-JOB.yaml, uniquely named."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; choose one of {', '.join(JOBS)}")
    obj = next(o for o in k8s_render.render("jobs") if o["metadata"]["name"] == f"orfeas-{job}")
    obj["metadata"]["name"] = name or f"orfeas-{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    if source is not None:
        obj["spec"]["entrypoint"] = obj["spec"]["entrypoint"].replace('"$ORFEAS_INGEST_SOURCE"', shlex.quote(source))
    return obj


def create_rayjob(obj: dict[str, Any], namespace: str, context: str | None = None) -> dict[str, Any]:
    """Create the RayJob through the Kubernetes API; errors come back as one clear sentence."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError

    try:
        config.load_kube_config(context=context)
    except (ConfigException, FileNotFoundError) as kube_err:
        try:
            if context:
                raise
            config.load_incluster_config()
        except (ConfigException, FileNotFoundError):
            raise K8sUnavailable(
                f"no Kubernetes cluster configured: kubeconfig: {kube_err}; not running inside a cluster either"
            ) from None
    api_client = client.ApiClient()
    api_client.rest_client.pool_manager.connection_pool_kw["retries"] = False
    api = client.CustomObjectsApi(api_client)
    host = api_client.configuration.host
    try:
        return api.create_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayjobs", obj, _request_timeout=(5, 30)
        )
    except ApiException as e:
        reason = e.reason
        if e.status == 404:
            reason = "not found: is the KubeRay operator installed (RayJob CRD) and does the namespace exist?"
        raise K8sUnavailable(f"the Kubernetes API at {host} refused the RayJob ({e.status}): {reason}") from None
    except (HTTPError, OSError) as e:
        raise K8sUnavailable(f"the Kubernetes API at {host} is unreachable: {type(e).__name__}: {e}") from None


class K8sUnavailable(Exception):
    """The cluster could not be reached or refused the request."""


@k8s_app.command("submit-job")
def submit_job(
    job: str = typer.Argument(..., help="ingest or reindex"),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="Documents to read (default: the cluster's ORFEAS_INGEST_SOURCE)."),
    namespace: str = typer.Option("orfeas", "--namespace", "-n"),
    name: Optional[str] = typer.Option(None, "--name", help="RayJob name (default: orfeas-JOB-<timestamp>)."),
    context: Optional[str] = typer.Option(None, "--context", help="kubeconfig context"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the RayJob instead of creating it."),
) -> None:
    """Create a RayJob (its own autoscaling Ray cluster, deleted when the job ends)."""
    try:
        obj = job_object(job, source, name)
    except (ValueError, k8s_render.RenderError) as e:
        fail(str(e))
    obj["metadata"]["namespace"] = namespace
    if dry_run:
        sys.stdout.write(yaml.dump(obj, Dumper=k8s_render._LiteralDumper, sort_keys=False, width=120))
        return
    try:
        created = create_rayjob(obj, namespace, context)
    except K8sUnavailable as e:
        fail(str(e))
    typer.echo(f"created RayJob {namespace}/{created['metadata']['name']}; follow it with: "
               f"kubectl -n {namespace} get rayjob {created['metadata']['name']} -w")


if __name__ == "__main__":
    k8s_app()
