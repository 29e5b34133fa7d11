"""Ingest documents into a versioned collection with Ray Data.

    python -m jobs.ingest PATH_OR_URI --collection NAME [--rebuild]
    ray job submit -- python -m jobs.ingest PATH_OR_URI --collection NAME

The pipeline is `rag.ingest.run_ingest`; this entrypoint prints PROGRESS and SUMMARY lines that
`orfeas ingest` reads.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from jobs.cli import job_parser, job_settings, join_cluster
from rag.ingest import PROGRESS_TAG, SUMMARY_TAG, format_summary, run_ingest


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("jobs.ingest", __doc__)
    parser.add_argument("source", help="file, directory, glob, or s3:// gs:// abfs:// URI")
    parser.add_argument("--collection", default=None)
    parser.add_argument("--rebuild", action="store_true", help="write a new version, flip the alias when done")
    parser.add_argument("--enforce-roots", action="store_true", help="refuse sources outside rag.allowed_roots")
    args = parser.parse_args(argv)
    settings = job_settings(args)
    import ray

    from models.errors import APIError
    from observability import tracing

    tracing.configure(settings.tracing, "ingest")
    join_cluster(settings)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False

    def progress(p: dict[str, Any]) -> None:
        print(f"{PROGRESS_TAG} {json.dumps(p)}", flush=True)

    try:
        summary = run_ingest(args.source, args.collection, settings=settings, rebuild=args.rebuild,
                             enforce_roots=args.enforce_roots, progress=progress)
    except APIError as e:
        print(f"error: {e.message}", file=sys.stderr, flush=True)
        return 2
    tracing.flush()
    print(f"{SUMMARY_TAG} {summary.model_dump_json()}", flush=True)
    print(format_summary(summary), flush=True)
    return 0



if __name__ == "__main__":
    sys.exit(main())
