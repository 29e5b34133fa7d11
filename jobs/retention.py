"""Enforce the retention periods (settings `retention`): expired documents, usage-ledger
records, finished workflow runs and log files are removed.

    python -m jobs.retention [--config orfeas.yaml]
    ray job submit -- python -m jobs.retention

The work is `agents.retention.enforce_retention`, run as a Ray task on the node that holds the
data directory (the `orfeas_state` resource where a node advertises it: the KubeRay head with the
persistent volume), so it also works when this driver joins through Ray Client. It prints the
result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from config import load_settings
from config.names import ACTOR_NAMESPACE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.retention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="orfeas.yaml to read")
    parser.add_argument("--address", default=None, help="the cluster to join (default: ray.address; "
                        "ray://HOST:10001 reaches a serving cluster from a job's own one)")
    parser.add_argument("--actor", default="job:retention", help="who the audit log names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    from agents.retention import enforce_retention
    from config.actors import STATE_RESOURCE
    from security.log_redaction import install_log_redaction

    settings = load_settings(args.config)
    install_log_redaction(settings)
    if not ray.is_initialized():
        ray.init(address=args.address or settings.ray.address or None, namespace=ACTOR_NAMESPACE,
                 log_to_driver=False)
    options: dict = {"num_cpus": 0, "max_retries": 0}
    if ray.cluster_resources().get(STATE_RESOURCE):
        options["resources"] = {STATE_RESOURCE: 0.001}
    try:
        out = ray.get(ray.remote(enforce_retention).options(**options).remote(settings, actor=args.actor))
    except Exception as e:
        print(f"error: retention failed: {getattr(e, 'cause', e)}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
