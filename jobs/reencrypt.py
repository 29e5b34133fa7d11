"""Rotate a collection's data key and re-encrypt its chunks under the new one.

    python -m jobs.reencrypt COLLECTION [--config orfeas.yaml]
    ray job submit -- python -m jobs.reencrypt COLLECTION

The work is `rag.reencrypt.reencrypt_collection`; this prints its result as one JSON line.
"""

from __future__ import annotations

import json
import sys

from jobs.cli import job_parser, job_settings, join_cluster


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("jobs.reencrypt", __doc__)
    parser.add_argument("collection", help="the logical collection")
    parser.add_argument("--actor", default="job:reencrypt", help="who the audit log names")
    args = parser.parse_args(argv)
    settings = job_settings(args)
    from rag.reencrypt import reencrypt_collection

    join_cluster(settings)
    try:
        out = reencrypt_collection(settings, args.collection, actor=args.actor)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
