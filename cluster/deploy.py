"""Deploy the configured Serve applications onto a connected Ray cluster and wait for them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ray import serve
from ray.serve.schema import ApplicationStatus

from config import Settings
from models.engines.vllm_engine import MISSING_EXTRA, vllm_available
from serve.applications import (GATEWAY_APP, IngressError, applications, check_tls_files, controller_options,
                                resolve_ingress)

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    pass


@dataclass
class Refusal:
    model_id: str
    reason: str


def refused_models(settings: Settings) -> list[Refusal]:
    """Catalog entries this machine cannot run at all (vLLM without the gpu extra)."""
    return [Refusal(m.id, MISSING_EXTRA.format(id=m.id)) for m in settings.models
            if m.engine == "vllm" and not vllm_available()]


def deploy(settings: Settings, *, skip: set[str] = frozenset()) -> list[str]:
    """Start Serve's HTTP ingress where the config says and (re)deploy every application.

    `skip` names model ids left out (refused ones). Returns the deployed application names.
    The ingress (`serve.ingress`) is chosen when Serve starts; a running Serve keeps its own.
    """
    try:
        settings = resolve_ingress(settings)
        options = check_tls_files(settings.serve)
    except IngressError as e:
        raise DeployError(str(e)) from None
    serve.start(http_options=options,
                controller_options=controller_options(settings.serve))
    apps = [a for a in applications(settings)
            if not (a.name != GATEWAY_APP and a.args.get("model", {}).get("id") in skip)]
    targets = [serve.RunTarget(a.build(), name=a.name, route_prefix=a.route_prefix) for a in apps]
    serve.run_many(targets, wait_for_applications_running=False)
    return [a.name for a in apps]


def audit_config(settings: Settings) -> None:
    """Audit the settings this deploy changed, by name (security/config_changes.py); `orfeas up`
    calls it after `deploy` (the test harness's deploys do not). Never fails a deploy."""
    import getpass
    import logging

    from security.config_changes import record_deploy

    try:
        record_deploy(settings, actor=f"cli:{getpass.getuser()}")
    except Exception:
        logging.getLogger(__name__).exception("could not audit the deployed configuration")


def wait_running(names: list[str], timeout_s: float = 300.0,
                 progress: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """Wait until every named application is RUNNING (or has failed); returns name -> status."""
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: (apps[n].status.value if n in apps else "NOT_STARTED") for n in names}
        if progress:
            progress(states)
        settled = all(s in (ApplicationStatus.RUNNING.value, ApplicationStatus.DEPLOY_FAILED.value,
                            ApplicationStatus.UNHEALTHY.value) for s in states.values())
        if settled:
            return states
        if time.monotonic() > deadline:
            raise DeployError(f"applications not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.5)
