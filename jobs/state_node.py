"""What the maintenance jobs (`jobs.retention`, `jobs.compliance`) share: joining the cluster and
running their work as one task on the state node, the node with the persistent volume where the
ledger, the workflow checkpoints, the audit chain and the key file live."""

from __future__ import annotations

from typing import Any, Callable

from config import Settings
from config.actors import STATE_RESOURCE
from jobs.cli import join_cluster


def run_on_state_node(settings: Settings, address: str | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` as a Ray task on the state node (anywhere on a cluster without one),
    never retried: a maintenance pass that failed half-way is run again whole by its schedule."""
    import ray

    join_cluster(settings, address)
    options: dict = {"num_cpus": 0, "max_retries": 0}
    if ray.cluster_resources().get(STATE_RESOURCE):
        options["resources"] = {STATE_RESOURCE: 0.001}
    return ray.get(ray.remote(fn).options(**options).remote(*args, **kwargs))
