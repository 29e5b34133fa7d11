"""Retrieval quality on a BEIR dataset (nDCG@10, Recall@100, MRR@10) as JSON.

    python -m jobs.eval_retrieval --dataset DIR --split train [--output FILE]

The evaluation is `rag.evaluation.evaluate`; this entrypoint prints its RESULT line for `orfeas eval`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.cli import job_parser, job_settings, join_cluster
from rag.evaluation import DEFAULT_VARIANTS, GRAPH_VARIANTS, RESULT_TAG, SECOND_VARIANTS, evaluate, weight_variants


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("jobs.eval_retrieval", __doc__)
    parser.add_argument("--dataset", required=True, help="BEIR directory (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--collection", default=None)
    parser.add_argument("--reuse", action="store_true", help="query an existing collection instead of re-ingesting")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--graph", action="store_true", help="also graph-augmented hybrid retrieval (rag.graph)")
    parser.add_argument("--weights", choices=["dbsf", "rrf", "dbsf-doc"], default=None,
                        help="with rag.second_dense: also three-way fusion over a grid of weights")
    parser.add_argument("--max-queries", type=int, default=None, help="only the first N queries (a quick look)")
    args = parser.parse_args(argv)
    settings = job_settings(args)
    import ray

    from models.errors import APIError

    join_cluster(settings)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        variants = dict(DEFAULT_VARIANTS)
        if settings.rag.second_dense.enabled:
            variants.update(SECOND_VARIANTS)
            if args.weights:
                variants.update(weight_variants(args.weights))
        if args.graph:
            variants.update(GRAPH_VARIANTS)
        result = evaluate(args.dataset, args.split, settings=settings, collection=args.collection, reuse=args.reuse,
                          variants=variants, max_queries=args.max_queries)
    except APIError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)
    print(text, flush=True)
    return 0



if __name__ == "__main__":
    sys.exit(main())
