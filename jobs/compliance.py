"""A scheduled audit (settings `compliance`): the compliance check of a profile, with `audit
verify`, its report written (JSON and PDF under compliance.report_dir), and on failure a log line,
an audit entry and an alert through the alert receiver.

    python -m jobs.compliance [--config orfeas.yaml] [--profile soc2] [--manifests rendered.yaml]
    ray job submit -- python -m jobs.compliance

The work is `agents.compliance.scheduled_audit`, run as a Ray task on the node that holds the data
directory (the `orfeas_state` resource where a node advertises it: the KubeRay head with the
persistent volume, where the audit chain and the key file live), so it also works when this driver
joins through Ray Client. It prints the round's summary as one JSON line; exit status 1 when the
check failed (the RayJob then shows as failed too).
"""

from __future__ import annotations

import json
import sys

from jobs.cli import job_parser, job_settings


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("jobs.compliance", __doc__, address=True)
    parser.add_argument("--profile", default=None, help="gdpr, hipaa or soc2 (default: compliance.profile)")
    parser.add_argument("--manifests", default=None, help="rendered manifests to check as well (a YAML file)")
    parser.add_argument("--actor", default="job:compliance", help="who the audit log names")
    args = parser.parse_args(argv)
    settings = job_settings(args)
    from agents.compliance import scheduled_audit
    from jobs.state_node import run_on_state_node
    from security.compliance import ComplianceError, check_profile, load_manifests

    try:
        profile = check_profile(args.profile or settings.compliance.profile)
        manifests = load_manifests(args.manifests) if args.manifests else None
    except ComplianceError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        out = run_on_state_node(settings, args.address, scheduled_audit, settings, profile, manifests,
                                manifests_source=args.manifests or "", actor=args.actor)
    except Exception as e:
        print(f"error: the compliance check could not run: {getattr(e, 'cause', e)}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 1 if out["result"] == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
