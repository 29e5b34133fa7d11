"""The one way ORFEAS makes a detached actor: named, in the one namespace, got if it exists.

Actors that hold durable state (keys, ledger, vector store owner, workflow checkpoints) ask for
`durable=True`: where a node advertises the `STATE_RESOURCE` custom resource (the KubeRay head,
which mounts the persistent volume) they are placed there; on a local cluster every node sees
the data directory and no placement is needed.
"""

from __future__ import annotations

from typing import Any

from config.names import ACTOR_NAMESPACE

# A node that mounts the data directory's persistent volume advertises this resource.
STATE_RESOURCE = "orfeas_state"


def detached_actor(cls: type | Any, name: str, *args: Any, durable: bool = False, **options: Any):
    """Get or create the detached actor `name` of `cls` (a class or a `ray.remote` class) with
    `args`; it restarts on loss and takes no CPU unless `options` say otherwise."""
    import ray

    remote = cls if hasattr(cls, "options") and hasattr(cls, "remote") else ray.remote(cls)
    opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, **options}
    if durable and ray.cluster_resources().get(STATE_RESOURCE):
        opts["resources"] = {**opts.get("resources", {}), STATE_RESOURCE: 0.001}
    return remote.options(name=name, namespace=ACTOR_NAMESPACE, lifetime="detached", get_if_exists=True,
                          **opts).remote(*args)
