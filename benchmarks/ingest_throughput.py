"""Ingest throughput: the full Ray Data ingest job (parse, chunk, embed dense + BM25, upsert into
Qdrant Edge through its owner actor) against a bare single-process sentence-transformers
encode loop over the same chunks, in one run. Writes JSON under benchmarks/results/.

    python -m benchmarks.ingest_throughput [--corpus /work/shared/eval/scifact/corpus.jsonl] [--limit N]

The ratio is job chunks/s over bare-loop chunks/s (target >= 0.9): how much of the encoder's own
speed survives the platform's plumbing.

With `rag.embed_pool: warm` (`--embed-pool warm`) the embedding actors outlive a job, so the measured job
follows a warm-up job (300 documents, enough to grow the pool), as on a cluster that has ingested
before (its seconds are reported apart). `--cold` skips it: the first job on a fresh cluster, which loads the model.
`--embed-pool both` measures the two in one run against the same bare loop: first a `job`-pool job
(it loads the model, as every such job does), then the warm-up job and the `warm`-pool job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("benchmarks.ingest_throughput")
DEFAULT_CORPUS = "/work/shared/eval/scifact/corpus.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N documents (0: all)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--cold", action="store_true", help="no warm-up job: the first job on a fresh cluster")
    parser.add_argument("--embed-pool", choices=["warm", "job", "both"], default=None,
                        help="rag.embed_pool for the job (both: a job-pool job, then a warm-pool one, same run)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    import torch

    from config import Settings
    from config.names import ACTOR_NAMESPACE
    from rag.ingest import run_ingest
    from rag.chunking import Chunker, embedding_text, load_tokenizer
    from rag.documents import parse_bytes
    from models.embedders import DenseEmbedder
    from rag.embedding import embedder_dir

    load_bench_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="orfeas-bench-"))
    corpus = Path(args.corpus)
    if args.limit:
        lines = corpus.read_text().splitlines()[: args.limit]
        corpus = work / "corpus.jsonl"
        corpus.write_text("\n".join(lines) + "\n")
    settings = Settings(data_dir=work / "data")
    pools = ["job", "warm"] if args.embed_pool == "both" else [args.embed_pool or settings.rag.embed_pool]
    r = settings.rag
    model_dir = embedder_dir(settings)

    # The same chunks the job will embed.
    chunker = Chunker(load_tokenizer(model_dir), r.chunk_tokens, r.chunk_overlap)
    docs = parse_bytes(str(corpus), corpus.read_bytes())
    texts = [embedding_text(c.title, c.section, c.text) for d in docs for c in chunker.split(d)]
    log.info("%d documents, %d chunks", len(docs), len(texts))

    # Baseline: bare single-process encode loop (model load excluded).
    model = DenseEmbedder(model_dir, batch_size=r.embed_batch_size)
    model.embed(texts[:8])
    t0 = time.perf_counter()
    for i in range(0, len(texts), 1024):
        model.embed(texts[i:i + 1024])
    bare_s = time.perf_counter() - t0
    bare_cps = len(texts) / bare_s
    log.info("bare encode loop: %.1f s, %.1f chunks/s", bare_s, bare_cps)
    del model

    # The job: Ray Data end to end, through the Edge owner actor, model load included.
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             namespace=ACTOR_NAMESPACE)
    ray.data.DataContext.get_current().enable_progress_bars = False
    jobs = {}
    for pool in pools:
        r.embed_pool = pool
        warmup = None
        if not args.cold and pool == "warm":
            few = work / "warmup.jsonl"
            few.write_text("\n".join(Path(args.corpus).read_text().splitlines()[:300]) + "\n")
            t0 = time.perf_counter()
            run_ingest(str(few), "warmup", settings=settings)
            warmup = round(time.perf_counter() - t0, 2)
            log.info("warm-up job (300 documents): %.1f s", warmup)
        load_start = os.getloadavg()
        t0 = time.perf_counter()
        summary = run_ingest(str(corpus), f"bench-{pool}", settings=settings, rebuild=True)
        job_s = time.perf_counter() - t0
        job_cps = summary.chunks / job_s
        jobs[pool] = {"chunks": summary.chunks, "seconds": round(job_s, 2), "chunks_per_s": round(job_cps, 2),
                      "documents": summary.documents, "failed": len(summary.failed), "ratio": round(job_cps / bare_cps, 3),
                      "warmup_job_seconds": warmup, "load_average": {"job_start": load_start, "end": os.getloadavg()}}
        log.info("%s-pool job: %.1f s, %.1f chunks/s, ratio %.3f", pool, job_s, job_cps, job_cps / bare_cps)
    ray.shutdown()
    last = jobs[pools[-1]]
    result = {
        "benchmark": "ingest_throughput",
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "corpus": str(args.corpus), "documents": len(docs), "chunks": len(texts),
        "job": {k: last[k] for k in ("chunks", "seconds", "chunks_per_s", "documents", "failed")},
        "bare_encode_loop": {"chunks": len(texts), "seconds": round(bare_s, 2), "chunks_per_s": round(bare_cps, 2)},
        "ratio": last["ratio"],
        "embed_pool": pools[-1], "warmup_job_seconds": last["warmup_job_seconds"],
        "jobs_by_pool": jobs,
        "load_average": {"start": load_bench_start, "job_start": last["load_average"]["job_start"], "end": os.getloadavg()},
        "target_ratio": 0.9,
        "config": {"chunk_tokens": r.chunk_tokens, "chunk_overlap": r.chunk_overlap, "embed_batch_size": r.embed_batch_size,
                   "embed_call_rows": r.embed_call_rows,
                   "embed_actors": r.embed_actors, "embed_threads": r.embed_threads, "upsert_batch_size": r.upsert_batch_size},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ingest_throughput-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
