"""The LLM-based graph extractor (`rag.graph.extractor: llm`) against the rules, on SciFact chunks.

    python -m benchmarks.graph_llm_extract --url http://127.0.0.1:8000/v1 --model smollm2-135m \
        --api-key-env ORFEAS_API_KEY [--chunks 20] [--dataset /work/shared/eval/scifact]

For each of the first `--chunks` corpus abstracts (cut to its first 150 words, about one ingest
chunk) it runs `rag.graph.extract` (the rules) and `rag.graph_llm.extract_llm` (one chat completion
per chunk at `--url`, any OpenAI-compatible endpoint: an ORFEAS gateway, a hosted provider), and
reports how many replies parsed (the rest fell back to the rules), the typed relations and the
entities the model added, and the seconds per chunk of each (the rules are the baseline measured
in the same run). Writes benchmarks/results/graph_llm_extract.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from rag import graph, graph_llm

DEFAULT_DATASET = "/work/shared/eval/scifact"


def chunks(dataset: Path, n: int, words: int = 150) -> list[str]:
    out = []
    with open(dataset / "corpus.jsonl") as f:
        for line in f:
            d = json.loads(line)
            out.append(" ".join(f"{d.get('title', '')}. {d['text']}".split()[:words]))
            if len(out) == n:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="OpenAI-compatible base URL, ending in /v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's key")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--dataset", default=DEFAULT_DATASET)
    args = ap.parse_args(argv)
    texts = chunks(Path(args.dataset), args.chunks)
    key = os.environ.get(args.api_key_env or "") or None

    t0 = time.perf_counter()
    rules = [graph.extract(t) for t in texts]
    rules_s = time.perf_counter() - t0

    before = dict(graph_llm.LLM_FALLBACKS)
    t0 = time.perf_counter()
    llm = [graph_llm.extract_llm(t, url=args.url, model=args.model, timeout=args.timeout, api_key=key) for t in texts]
    llm_s = time.perf_counter() - t0
    fell_back = {k: graph_llm.LLM_FALLBACKS[k] - before.get(k, 0) for k in ("http", "json")}

    typed = [p[2] for out in llm for p in out["r"] if len(p) == 3]
    added = sum(len(o["e"]) - len(r["e"]) for o, r in zip(llm, rules))
    result = {
        "benchmark": "graph_llm_extract", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
        "url": args.url, "model": args.model, "chunks": len(texts),
        "replies_parsed": len(texts) - sum(fell_back.values()), "fell_back": fell_back,
        "typed_relations": len(typed), "distinct_relation_names": sorted(set(typed))[:40],
        "entities_rules": sum(len(r["e"]) for r in rules), "entities_added_by_model": added,
        "rules_s_per_chunk": rules_s / len(texts), "llm_s_per_chunk": llm_s / len(texts),
        "llm_over_rules_time": (llm_s / rules_s) if rules_s else None,
        "example": {"text": texts[0][:300], "llm": llm[0]},
    }
    out = Path(__file__).parent / "results" / "graph_llm_extract.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "example"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
