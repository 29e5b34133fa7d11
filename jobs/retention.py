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

import json
import sys

from jobs.cli import job_parser, job_settings


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("jobs.retention", __doc__, address=True)
    parser.add_argument("--actor", default="job:retention", help="who the audit log names")
    args = parser.parse_args(argv)
    settings = job_settings(args)
    from agents.retention import enforce_retention
    from jobs.state_node import run_on_state_node

    try:
        out = run_on_state_node(settings, args.address, enforce_retention, settings, actor=args.actor)
    except Exception as e:
        print(f"error: retention failed: {getattr(e, 'cause', e)}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
