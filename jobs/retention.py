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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.retention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="orfeas.yaml to read")
    parser.add_argument("--address", default=None, help="the cluster to join (default: ray.address; "
                        "ray://HOST:10001 reaches a serving cluster from a job's own one)")
    parser.add_argument("--actor", default="job:retention", help="who the audit log names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agents.retention import enforce_retention
    from jobs.state_node import run_on_state_node
    from security.log_redaction import install_log_redaction

    settings = load_settings(args.config)
    install_log_redaction(settings)
    try:
        out = run_on_state_node(settings, args.address, enforce_retention, settings, actor=args.actor)
    except Exception as e:
        print(f"error: retention failed: {getattr(e, 'cause', e)}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
